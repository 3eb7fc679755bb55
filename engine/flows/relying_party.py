"""Relying-party flows: authenticate a stream, open a session, fetch a result."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable
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


async def authenticated(ctx: Context, conn: Conn) -> RelyingParty:
    """The connection's relying party, if it is still active."""
    if conn.rp is None:
        raise NotAuthenticated()
    return await ctx.relying_party(conn.rp.rp_id)


async def _counted(ctx: Context, step: Awaitable[None]) -> None:
    """Await a step that takes from a quota; a refusal is counted in the metrics."""
    try:
        await step
    except RateLimited:
        ctx.metrics.rate_limited.inc()
        raise


async def handle_open_session(ctx: Context, conn: Conn, req: P.OpenSession) -> P.SessionOpened:
    from ..challenge import new_challenge

    rp = await authenticated(ctx, conn)
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
    # the open_session quota is taken in the same step as the session is kept
    await _counted(ctx, ctx.state.open(session, now=now, max_open=lim.max_open_sessions, quota=rp.quota_per_minute))
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
    rp = await authenticated(ctx, conn)
    # a bucket of its own: a relying party at its open_session quota still collects its results
    await _counted(ctx, ctx.quotas.take(rp.rp_id, "fetch", int(rp.quota_per_minute * ctx.config.limits.fetch_quota_factor), ctx.clock()))
    sealed = await ctx.state.result(req.session_id, rp.rp_id)
    return P.ResultMsg(id=req.id, session_id=req.session_id, sealed=sealed)
