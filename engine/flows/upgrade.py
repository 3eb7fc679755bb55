"""The acceptance point's flow: a signed attestation raises a credential to ``high``."""

from __future__ import annotations

import hmac

from engine.wire import protocol as P
from ..crypto import verify_signature
from ..errors import BadSignature, InvalidMessage, UnknownAcceptancePoint, UnknownCredential
from ..store import raise_unless_active
from .context import Context
from .relying_party import Conn

__all__ = ["handle_upgrade"]

#: How old (seconds) an attestation may be, and how far in the future its clock may run.
ATTESTATION_MAX_AGE = 86400.0
ATTESTATION_MAX_SKEW = 300.0


async def handle_upgrade(ctx: Context, conn: Conn, req: P.Upgrade) -> P.Upgraded:
    att = P.decode_signed(req.attestation, P.Attestation)
    ap = await ctx.db(ctx.store.get_acceptance_point, att.ap_id)
    if ap is None or ap.status != "active":
        raise UnknownAcceptancePoint()
    verify_signature(ap.sign_key, req.attestation.payload, req.attestation.sig)
    if att.level != "high":
        raise InvalidMessage("an attestation can only upgrade a credential to 'high'")
    now = ctx.clock()
    if not (now - ATTESTATION_MAX_AGE <= att.checked_at <= now + ATTESTATION_MAX_SKEW):
        raise InvalidMessage("attestation is not recent")
    cred = await ctx.db(ctx.store.get_credential, att.credential_id)
    if cred is None:
        raise UnknownCredential()
    if not hmac.compare_digest(cred.card_number, att.card_number):
        raise BadSignature("attestation does not match the credential")
    raise_unless_active(cred)
    new = await ctx.db(ctx.store.set_level, cred.credential_id, att.level, actor=att.ap_id, now=now, attestation=P.encode(req.attestation))
    return P.Upgraded(id=req.id, credential_id=new.credential_id, level=new.level)
