"""The holder's other flows: a new phone (rebind), a lost card, the credential's status.

A rebind and a lost-card report need a fresh face + voice check against the
credential's templates; the store's transitions then decide any race.
"""

from __future__ import annotations

from engine.wire import protocol as P
from ..crypto import device_box_key, sha256, verify_signature
from ..errors import VerificationFailed
from ..store import Credential, raise_unless_active
from .context import Context, gather
from .relying_party import Conn

__all__ = ["fresh_check", "handle_rebind", "handle_report_lost", "handle_status", "report_lost"]


async def fresh_check(ctx: Context, cred: Credential, req: P.Rebind | P.ReportLost, action: str) -> None:
    """The fresh face + voice check that a rebind or a lost-card report needs."""
    (f, (v, _said)) = await gather(lambda: ctx.face(req.face), lambda: ctx.voice(req.voice, req.audio_format))
    m = await ctx.match(cred.credential_id, f, v)
    if not m.decision.passed:
        await ctx.audit(actor="holder", action=action, subject=cred.credential_id, outcome="refused", detail={"reason": "verification_failed"})
        raise VerificationFailed()


async def handle_rebind(ctx: Context, conn: Conn, req: P.Rebind) -> P.Rebound:
    tbs = P.rebind_message(req.credential_id, req.new_device_key, sha256(req.face), sha256(req.voice))
    verify_signature(req.new_device_key, tbs, req.sig)
    device_box_key(req.new_device_key)
    cred = raise_unless_active(await ctx.db(ctx.store.get_credential, req.credential_id))
    expected = cred.device_key
    await fresh_check(ctx, cred, req, "rebind")
    new = await ctx.db(
        ctx.store.rebind_device, cred.credential_id, expected_device_key=expected, new_device_key=req.new_device_key, actor="holder", now=ctx.clock()
    )
    return P.Rebound(id=req.id, credential_id=new.credential_id)


async def handle_report_lost(ctx: Context, conn: Conn, req: P.ReportLost) -> P.ReportedLost:
    tbs = P.report_lost_message(req.credential_id, sha256(req.face), sha256(req.voice))
    verify_signature(req.device_key, tbs, req.sig)
    cred = await ctx.active_credential(req.credential_id, req.device_key)
    await fresh_check(ctx, cred, req, "report_lost")
    suspended = await report_lost(ctx, cred.card_number, actor="holder")
    return P.ReportedLost(id=req.id, suspended=len(suspended))


async def report_lost(ctx: Context, card_number: str, *, actor: str) -> list[str]:
    """Card → lost, its credentials → suspended (and out of the duplicate search)."""
    suspended = await ctx.db(ctx.store.report_card_lost, card_number, actor=actor, now=ctx.clock())
    for cid in suspended:
        await ctx.db(ctx.duplicates.remove_owner, cid)
    await ctx.refresh_credential_gauge()
    return suspended


async def handle_status(ctx: Context, conn: Conn, req: P.Status) -> P.StatusReply:
    verify_signature(req.device_key, P.status_message(req.credential_id, req.nonce), req.sig)
    cred = await ctx.bound_credential(req.credential_id, req.device_key)
    return P.StatusReply(id=req.id, credential_id=cred.credential_id, status=cred.status, level=cred.level)
