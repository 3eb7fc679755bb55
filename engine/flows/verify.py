"""The holder's verification, the hot path: check the session, the signature and the
credential, run the models, match 1:1, and send the result to both sides.

The session is claimed (single use) once the request is known to come from the key
bound to an active credential; a verify that ends before any result through the
engine's fault (overload, deadline) releases it, so the holder may retry.
"""

from __future__ import annotations

import logging

import trio

from engine.wire import protocol as P
from ..crypto import device_box_key, seal, sha256, verify_signature
from ..errors import (
    BadSignature,
    CredentialError,
    DeadlineExceeded,
    EngineError,
    LevelTooLow,
    Overloaded,
    SampleError,
)
from ..state import Session
from ..store import Credential
from .context import Context, gather
from .relying_party import Conn

__all__ = ["REASONS", "handle_verify"]

log = logging.getLogger("engine.flows")

#: Coarse reason classes a relying party may see.
REASONS = (
    "match", "biometric_mismatch", "challenge_mismatch", "sample_quality", "credential_inactive", "level_too_low",
    "too_many_attempts", "error",
)


async def handle_verify(ctx: Context, conn: Conn, req: P.Verify) -> P.Verified:
    try:
        tbs = P.verify_message(req.session_id, req.nonce, req.credential_id, sha256(req.face), sha256(req.voice))
        verify_signature(req.device_key, tbs, req.sig)
        cred = await ctx.active_credential(req.credential_id, req.device_key)
    except (BadSignature, CredentialError) as exc:
        # Not signed by the key bound to an active credential (a stranger who saw the QR
        # code, an old phone, a voided credential): answered to its sender only, with the
        # session's own error if it is not open; the session stays open for its holder, up
        # to max_failed_attempts.
        await _failed_attempt(ctx, req, exc)
        raise
    device_box = device_box_key(req.device_key)
    session = await ctx.state.claim(req.session_id, req.nonce, ctx.clock())  # single use from here on
    delivered = False
    try:
        await ctx.relying_party(session.rp_id)  # disabled since opening?
        result, outcome, detail = await _verify_claimed(ctx, session, cred, req)
        delivered = True
    except _Answered as answered:
        delivered = True
        if answered.reply is None:
            raise answered.error from None
        return answered.reply
    finally:
        if not delivered:
            await ctx.state.release(session.session_id)  # aborted before any result: the holder may retry
    with trio.CancelScope(shield=True):  # the result is out: the holder must get its copy
        await ctx.audit(actor=session.rp_id, action="verify", subject=cred.credential_id, outcome=outcome, detail={"reason": detail})
    return P.Verified(id=req.id, session_id=session.session_id, sealed=seal(device_box, result))


class _Answered(Exception):
    """A verify that ended with a ``fail`` result sent: its reply to the holder, or the error."""

    def __init__(self, reply: P.Verified | None, error: EngineError) -> None:
        self.reply = reply
        self.error = error


async def _verify_claimed(ctx: Context, session: Session, cred: Credential, req: P.Verify) -> tuple[bytes, str, str]:
    """Models, match and the result, once the session is claimed: (signed result, outcome, audit detail)."""
    try:
        if P.level_rank(cred.level) < P.level_rank(session.level):
            raise LevelTooLow()
        challenge = session.challenge if ctx.config.challenge.check else None
        (face, (voice, said)) = await gather(lambda: ctx.face(req.face), lambda: ctx.voice(req.voice, req.audio_format, challenge))
        # the credential as it is now: a card lost meanwhile refuses with its code, and a
        # rebind to a new phone meanwhile retires this key (credential_deleted)
        m = await ctx.match(cred.credential_id, face, voice)
        await ctx.active_credential(cred.credential_id, req.device_key, m.credential)
    except (Overloaded, DeadlineExceeded):
        raise  # the engine's fault, not the holder's: the session stays usable
    except EngineError as exc:
        result = ctx.signed_result(session, cred, "fail", _reason_for(exc))
        await ctx.deliver(session, result)
        with trio.CancelScope(shield=True):
            await ctx.audit(actor=session.rp_id, action="verify", subject=req.credential_id, outcome="fail", detail={"reason": exc.code})
        reply = None
        if isinstance(exc, LevelTooLow):
            reply = P.Verified(id=req.id, session_id=session.session_id, sealed=seal(device_box_key(req.device_key), result))
        raise _Answered(reply, exc) from exc
    if not m.decision.passed:
        outcome, reason, detail = "fail", "biometric_mismatch", m.decision.reason
    elif said is not None and not said.passed:
        outcome, reason, detail = "fail", "challenge_mismatch", "challenge_mismatch"
    else:
        outcome, reason, detail = "pass", "match", "match"
    result = ctx.signed_result(session, cred, outcome, reason)
    await ctx.deliver(session, result)
    log.debug("verify %s: face=%.3f voice=%.3f %s", session.session_id, m.face, m.voice, detail)
    return result, outcome, detail


async def _failed_attempt(ctx: Context, req: P.Verify, exc: EngineError) -> None:
    """Count a verify that did not count (``UnknownSession``, ``SessionUsed`` or
    ``SessionExpired`` instead if the session is not open with the request's nonce); the
    one that reaches the limit closes the session with a ``fail`` (``too_many_attempts``)
    to the relying party."""
    closed = await ctx.state.count_failure(req.session_id, req.nonce, ctx.clock(), limit=ctx.config.limits.max_failed_attempts)
    ctx.metrics.failed_attempts.labels(code=exc.code).inc()
    if closed is None:
        return
    ctx.metrics.failed_attempts.labels(code="too_many_attempts").inc()
    with trio.CancelScope(shield=True):
        await ctx.deliver(closed, ctx.signed_result(closed, None, "fail", "too_many_attempts"))
        await ctx.audit(actor=closed.rp_id, action="verify", subject=closed.session_id, outcome="fail", detail={"reason": "too_many_attempts"})


def _reason_for(exc: EngineError) -> str:
    if isinstance(exc, LevelTooLow):
        return "level_too_low"
    if isinstance(exc, SampleError):
        return "sample_quality"
    if isinstance(exc, CredentialError):
        return "credential_inactive"
    return "error"
