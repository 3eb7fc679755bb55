"""Relying-party flows: authenticate a stream, open a session, fetch a result."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import trio

from engine.wire import protocol as P
from ..crypto import verify_signature
from ..errors import LevelNotAllowed, NotAuthenticated, RateLimited
from ..state import Session
from ..store import RelyingParty
from .context import Context

__all__ = ["Conn", "handle_auth", "handle_fetch_result", "handle_open_session"]


@dataclass
class Conn:
    """What the engine knows about one connection."""

    nonce: bytes
    outbox: trio.MemorySendChannel
    rp: RelyingParty | None = None


async def handle_auth(ctx: Context, conn: Conn, req: P.Auth) -> P.Authenticated:
    rp = await ctx.relying_party(req.rp_id, fresh=True)
    verify_signature(rp.sign_key, P.auth_message(conn.nonce, req.rp_id), req.sig)
    if conn.rp is not None:
        ctx.state.unsubscribe(conn.rp.rp_id, conn.outbox)
    conn.rp = rp
    ctx.state.subscribe(rp.rp_id, conn.outbox)
    await ctx.audit(actor=rp.rp_id, action="rp_connect", subject=rp.rp_id, outcome="ok")
    return P.Authenticated(id=req.id, rp_id=rp.rp_id, display_name=rp.display_name, max_level=rp.max_level)


async def rp_for(ctx: Context, conn: Conn, bucket: str) -> RelyingParty:
    """The connection's relying party, one request taken from its ``bucket`` quota:
    ``open`` (open_session, the registered quota) or ``fetch`` (fetch_result, its own
    bucket of ``fetch_quota_factor`` times that)."""
    if conn.rp is None:
        raise NotAuthenticated()
    rp = await ctx.relying_party(conn.rp.rp_id)
    per_minute = rp.quota_per_minute
    if bucket == "fetch":
        per_minute = int(per_minute * ctx.config.limits.fetch_quota_factor)
    try:
        await ctx.quotas.take(rp.rp_id, bucket, per_minute, ctx.clock())
    except RateLimited:
        ctx.metrics.rate_limited.inc()
        raise
    return rp


async def handle_open_session(ctx: Context, conn: Conn, req: P.OpenSession) -> P.SessionOpened:
    from ..challenge import new_challenge

    rp = await rp_for(ctx, conn, "open")
    if P.level_rank(req.level) > P.level_rank(rp.max_level):
        raise LevelNotAllowed()
    lim, ch = ctx.config.limits, ctx.config.challenge
    now = ctx.clock()
    session = Session(
        session_id=secrets.token_urlsafe(18),
        rp_id=rp.rp_id,
        level=req.level,
        purpose=req.purpose,
        nonce=secrets.token_bytes(16),
        challenge=new_challenge(kind=ch.kind, length=ch.length, phrases=ch.phrases),
        created_at=now,
        expires_at=now + lim.session_ttl,
    )
    await ctx.state.open(session, now=now, max_open=lim.max_open_sessions)
    qr = P.QrPayload(
        session_id=session.session_id,
        rp_name=rp.display_name,
        nonce=session.nonce,
        expires_at=session.expires_at,
        challenge=session.challenge,
        level=session.level,
        purpose=session.purpose,
    )
    body = P.encode(qr)
    signed = P.Signed(payload=body, sig=ctx.keys.sign(body))
    return P.SessionOpened(id=req.id, session_id=session.session_id, qr=signed, expires_at=session.expires_at)


async def handle_fetch_result(ctx: Context, conn: Conn, req: P.FetchResult) -> P.ResultMsg:
    rp = await rp_for(ctx, conn, "fetch")
    sealed = await ctx.state.result(req.session_id, rp.rp_id)
    return P.ResultMsg(id=req.id, session_id=req.session_id, sealed=sealed)
