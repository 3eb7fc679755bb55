"""Enrollment: a holder's card, faces and voices become a credential bound to their phone.

The faces must match the card's photo; then, inside the store's enrollment lock, the
1:N duplicate search and the issue of the credential happen as one step, so that two
enrollments of one face cannot both miss each other.
"""

from __future__ import annotations

import numpy as np
import trio

from engine.wire import protocol as P
from ..crypto import device_box_key, sha256, verify_signature
from ..errors import CardNotValid, CardPhotoMismatch, DuplicateIdentity
from engine.inference.speaker import SpeakerEmbedding
from ..store import CardRecord, Credential, raise_unless_card_valid
from .context import Context, gather
from .relying_party import Conn

__all__ = ["CARD_PHOTO_FMR", "handle_enroll"]

#: Target false-match rate of the faces against the card photo (not the main decision):
#: a card photo is older and of lower quality than a live capture.
CARD_PHOTO_FMR = 1e-4


async def handle_enroll(ctx: Context, conn: Conn, req: P.Enroll) -> P.Enrolled:
    tbs = P.enroll_message(req.card_number, req.device_key, [sha256(f) for f in req.faces], [sha256(v) for v in req.voices])
    verify_signature(req.device_key, tbs, req.sig)
    device_box_key(req.device_key)  # a usable key for the holder's sealed copies
    card = await ctx.db(ctx.store.get_card, req.card_number)
    raise_unless_card_valid(None if card is None else card.status)
    if card.photo_template is None:
        raise CardNotValid()
    card_vec = ctx.templates.open_card(card.photo_template, card.card_number)

    thunks = [lambda f=f: ctx.face(f) for f in req.faces]
    thunks += [lambda a=a: ctx.voice(a, req.audio_format) for a in req.voices]
    out = await gather(*thunks)
    faces = np.stack(out[: len(req.faces)])
    voices: list[SpeakerEmbedding] = [v for v, _said in out[len(req.faces):]]

    if float((faces @ card_vec).min()) < ctx.scores.threshold("face", CARD_PHOTO_FMR):
        await ctx.audit(actor="holder", action="enroll", subject=card.card_number, outcome="refused", detail={"reason": "card_photo_mismatch"})
        raise CardPhotoMismatch()
    templates = [("face", ctx.templates.seal_face(v, card.card_number)) for v in faces]
    templates += [("voice", ctx.templates.seal_voice(v, card.card_number)) for v in voices]
    cred = await trio.to_thread.run_sync(_search_and_issue, ctx, card, req.device_key, faces, templates, limiter=ctx.enroll_limiter)
    await ctx.refresh_credential_gauge()
    return P.Enrolled(id=req.id, credential_id=cred.credential_id, version=cred.version, level=cred.level)


def _search_and_issue(ctx: Context, card: CardRecord, device_key: bytes, faces: np.ndarray, templates: list[tuple[str, bytes]]) -> Credential:
    """In a worker thread, under the store's enrollment lock: refuse a face enrolled on
    another card, else issue the credential and index its faces."""
    store = ctx.store
    with store.enrollment_lock():
        for owner in ctx.duplicates.search(faces):
            other = store.get_credential(owner)
            if other is not None and other.card_number != card.card_number:
                store.audit(actor="holder", action="enroll", subject=card.card_number, outcome="refused",
                            detail={"reason": "duplicate_identity"}, now=ctx.clock())
                raise DuplicateIdentity()
        cred, rows, voided = store.issue_credential(
            card_number=card.card_number, device_key=device_key, templates=templates, actor="holder", now=ctx.clock()
        )
        for old in voided:
            ctx.duplicates.remove_owner(old)
        ctx.duplicates.add(cred.credential_id, [r.template_id for r in rows if r.modality == "face"], faces)
    return cred
