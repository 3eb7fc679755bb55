"""The engine's flows: enroll, open session, verify, rebind, report lost, upgrade.

:class:`Engine` owns the durable store, the keys, the template indexes, the
batchers in front of the models, the session store and the result hub. The
server calls its ``handle_*`` methods with typed requests; they return typed
replies or raise an :class:`~engine.errors.EngineError`. Blocking work (the
store, FAISS, audio decoding) runs in worker threads; model work goes through
the batchers.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import trio

from . import protocol as P
from .batcher import Batcher
from .config import EngineConfig
from .crypto import EngineKeys, TemplateCipher, device_box_key, seal, sha256, verify_signature
from .errors import (
    BadSignature,
    CardNotValid,
    CardPhotoMismatch,
    CredentialDeleted,
    CredentialError,
    DeadlineExceeded,
    DuplicateIdentity,
    EngineError,
    InvalidMessage,
    LevelNotAllowed,
    LevelTooLow,
    NotAuthenticated,
    Overloaded,
    RateLimited,
    RelyingPartyDisabled,
    ResultPending,
    SampleError,
    SessionError,
    UnknownAcceptancePoint,
    UnknownCredential,
    UnknownRelyingParty,
    UnknownSession,
    VerificationFailed,
    WrongDeviceKey,
)
from .extract import Extractors
from .index import TemplateIndex
from .metrics import Metrics
from .sessions import MemorySessionStore, ResultHub, Session
from .speaker import SpeakerEmbedding, enrollment_band, pack_template, unpack_template
from .store import Credential, RelyingParty, Store, raise_unless_active as _raise_unless_active, raise_unless_card_valid

log = logging.getLogger("engine.service")

__all__ = ["Engine", "Conn", "REASONS"]

#: Coarse reason classes a relying party may see.
REASONS = (
    "match", "biometric_mismatch", "challenge_mismatch", "sample_quality", "credential_inactive", "level_too_low",
    "too_many_attempts", "error",
)

#: Target false-match rates for the checks that are not the main decision.
CARD_PHOTO_FMR = 1e-4  # a card photo is older and of lower quality than a live capture
DUPLICATE_FMR = 1e-6  # 1:N search: strict, so that no honest resident is refused


@dataclass
class Conn:
    """What the engine knows about one connection."""

    nonce: bytes
    outbox: trio.MemorySendChannel
    rp: RelyingParty | None = None


class _Quota:
    """Token buckets (requests per minute), one per relying party and kind of request.

    A bucket holds a minute's worth: a relying party that was quiet can spend its whole
    minute's quota in a burst, then one request per 60/quota seconds."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}

    def take(self, key: tuple[str, str], per_minute: int, now: float) -> None:
        if per_minute <= 0:
            return
        rate = per_minute / 60.0
        tokens, last = self._buckets.get(key, (float(per_minute), now))
        tokens = min(float(per_minute), tokens + (now - last) * rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            raise RateLimited(retry_after_ms=int((1.0 - tokens) / rate * 1000) + 1)
        self._buckets[key] = (tokens - 1.0, now)


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        *,
        store: Store,
        keys: EngineKeys,
        cipher: TemplateCipher,
        extractors: Extractors,
        scores: Any,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.keys = keys
        self.cipher = cipher
        self.x = extractors
        self.scores = scores
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.sessions = MemorySessionStore()
        self.hub = ResultHub()
        self.face_index = TemplateIndex(extractors.face_dim)
        self.voice_index = TemplateIndex(extractors.voice_dim)
        self._voice_band: dict[str, str] = {}  # credential id -> band of its enrollment
        self._store_limiter = trio.CapacityLimiter(config.store_threads)
        self._decode_limiter = trio.CapacityLimiter(2)
        self._quota = _Quota()
        self._rp_cache: dict[str, tuple[float, RelyingParty | None]] = {}
        self.face_batcher = Batcher("face", extractors.face_batch, config.face_batch, metrics=self.metrics)
        self.voice_batcher = Batcher("voice", extractors.voice_batch, config.voice_batcher, metrics=self.metrics)
        self.challenge_batcher = Batcher("challenge", extractors.challenge_batch, config.challenge_batch, metrics=self.metrics)
        self._biometric = 0  # biometric requests admitted and not yet answered
        self._enroll_lock = trio.Lock()
        self.owns_extractors = False
        self.ready = False

    # ---- life cycle ------------------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Load templates, warm the models, start the batchers; then sweep sessions forever."""
        await self._db(self._load_indexes)
        await trio.to_thread.run_sync(self.x.warmup)
        async with trio.open_nursery() as nursery:
            for b in (self.face_batcher, self.voice_batcher, self.challenge_batcher):
                await nursery.start(b.run)
            self.ready = True
            await self._refresh_credential_gauge()
            task_status.started()
            while True:
                await trio.sleep(1.0)
                self.sessions.sweep(self.clock())

    def _load_indexes(self) -> None:
        bands: dict[str, list[str]] = {}
        for modality, index in (("face", self.face_index), ("voice", self.voice_index)):
            ids, owners, vecs = [], [], []
            for row in self.store.active_templates(modality):
                cred = self.store.get_credential(row.credential_id)
                if cred is None:
                    continue
                ids.append(row.template_id)
                owners.append(row.credential_id)
                if modality == "voice":
                    emb = self._open_voice_template(row.ciphertext, cred.card_number)
                    vecs.append(emb.vector)
                    bands.setdefault(row.credential_id, []).append(emb.band)
                else:
                    vecs.append(self._open_template(row.ciphertext, cred.card_number, modality))
            if ids:
                index.add(np.asarray(ids, dtype=np.int64), owners, np.stack(vecs))
        self._voice_band = {owner: enrollment_band(b) for owner, b in bands.items()}
        log.info("indexes loaded: %d face, %d voice templates", len(self.face_index), len(self.voice_index))

    async def _refresh_credential_gauge(self) -> None:
        counts = await self._db(self.store.count_credentials)
        for status, n in counts.items():
            self.metrics.credentials.labels(status=status).set(n)

    # ---- helpers ---------------------------------------------------------------------------------
    async def _db(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs), limiter=self._store_limiter)

    def _seal_template(self, vec: np.ndarray, card_number: str, modality: str) -> bytes:
        return self.cipher.encrypt(np.asarray(vec, dtype=np.float32).tobytes(), f"{modality}:{card_number}")

    def _open_template(self, ciphertext: bytes, card_number: str, modality: str) -> np.ndarray:
        return np.frombuffer(self.cipher.decrypt(ciphertext, f"{modality}:{card_number}"), dtype=np.float32)

    def _seal_voice_template(self, emb: SpeakerEmbedding, card_number: str) -> bytes:
        return self.cipher.encrypt(pack_template(emb.vector, emb.band), f"voice:{card_number}")

    def _open_voice_template(self, ciphertext: bytes, card_number: str) -> SpeakerEmbedding:
        return unpack_template(self.cipher.decrypt(ciphertext, f"voice:{card_number}"))

    async def _face(self, image: bytes) -> np.ndarray:
        return await self.face_batcher.submit(image)

    async def _voice(self, audio: bytes, fmt: str, challenge: str | None = None) -> tuple[SpeakerEmbedding, Any]:
        """The speaker embedding and, if a challenge is given, the check of what was said
        (an ``engine.challenge.Verdict``): one recording, two checks, side by side."""
        pcm = await trio.to_thread.run_sync(self.x.decode_audio, audio, fmt, limiter=self._decode_limiter)
        if challenge is None:
            return await self.voice_batcher.submit(pcm), None
        voice, verdict = await self._gather(lambda: self.voice_batcher.submit(pcm), lambda: self.challenge_batcher.submit((pcm, challenge)))
        self.metrics.challenge_checks.labels(stage=verdict.stage, outcome="pass" if verdict.passed else "fail").inc()
        return voice, verdict

    async def _gather(self, *thunks: Callable[[], Any]) -> list[Any]:
        """Run coroutines concurrently; the first EngineError (samples first) wins."""
        results: list[Any] = [None] * len(thunks)
        errors: list[BaseException | None] = [None] * len(thunks)

        async def one(i: int) -> None:
            try:
                results[i] = await thunks[i]()
            except EngineError as exc:
                errors[i] = exc

        async with trio.open_nursery() as nursery:
            for i in range(len(thunks)):
                nursery.start_soon(one, i)
        for e in errors:
            if e is not None:
                raise e
        return results

    async def _relying_party(self, rp_id: str, *, fresh: bool = False) -> RelyingParty:
        """The relying party's record, re-read at most every 2 s (disable takes effect fast)."""
        now = self.clock()
        cached = self._rp_cache.get(rp_id)
        if fresh or cached is None or now - cached[0] > 2.0:
            rp = await self._db(self.store.get_relying_party, rp_id)
            self._rp_cache[rp_id] = (now, rp)
        else:
            rp = cached[1]
        if rp is None:
            raise UnknownRelyingParty()
        if rp.status != "active":
            raise RelyingPartyDisabled()
        return rp

    async def _bound_credential(self, credential_id: str, device_key: bytes) -> Credential:
        """The credential, if ``device_key`` is the one bound to it (a key replaced by a rebind
        gets ``credential_deleted``), whatever its status."""
        cred = await self._db(self.store.get_credential, credential_id)
        if cred is None:
            raise UnknownCredential()
        if not hmac.compare_digest(cred.device_key, device_key):
            if await self._db(self.store.retired_device, device_key) == credential_id:
                raise CredentialDeleted()
            raise WrongDeviceKey()
        return cred

    async def _active_credential(self, credential_id: str, device_key: bytes) -> Credential:
        cred = await self._bound_credential(credential_id, device_key)
        _raise_unless_active(cred)
        return cred

    def _match(self, cred: Credential, face: np.ndarray, voice: SpeakerEmbedding) -> tuple[float, float, Any]:
        """Face: best cosine over the enrolled faces. Voice: as calibrated (centroid or best),
        normalised for the bands of the enrollment and of this recording."""
        f = float(self.face_index.compare(cred.credential_id, face[None, :])[0])
        band = self._voice_band.get(cred.credential_id, "wide")
        v = self.scores.voice_score(voice.vector, voice.band, self.voice_index.vectors_of(cred.credential_id), band)
        self.metrics.voice_bands.labels(enrolled=band, probe=voice.band).inc()
        return f, v, self.scores.decide(f, v)

    # ---- relying party -----------------------------------------------------------------------------
    async def handle_auth(self, conn: Conn, req: P.Auth) -> P.Authenticated:
        rp = await self._relying_party(req.rp_id, fresh=True)
        verify_signature(rp.sign_key, P.auth_message(conn.nonce, req.rp_id), req.sig)
        if conn.rp is not None:
            self.hub.unsubscribe(conn.rp.rp_id, conn.outbox)
        conn.rp = rp
        self.hub.subscribe(rp.rp_id, conn.outbox)
        await self._audit(actor=rp.rp_id, action="rp_connect", subject=rp.rp_id, outcome="ok")
        return P.Authenticated(id=req.id, rp_id=rp.rp_id, display_name=rp.display_name, max_level=rp.max_level)

    async def _rp_for(self, conn: Conn, bucket: str) -> RelyingParty:
        """The connection's relying party, one request taken from its ``bucket`` quota:
        ``open`` (open_session, the registered quota) or ``fetch`` (fetch_result, its own
        bucket of ``fetch_quota_factor`` times that)."""
        if conn.rp is None:
            raise NotAuthenticated()
        rp = await self._relying_party(conn.rp.rp_id)
        per_minute = rp.quota_per_minute
        if bucket == "fetch":
            per_minute = int(per_minute * self.config.limits.fetch_quota_factor)
        try:
            self._quota.take((rp.rp_id, bucket), per_minute, self.clock())
        except RateLimited:
            self.metrics.rate_limited.inc()
            raise
        return rp

    async def handle_open_session(self, conn: Conn, req: P.OpenSession) -> P.SessionOpened:
        from .challenge import new_challenge

        rp = await self._rp_for(conn, "open")
        if P.level_rank(req.level) > P.level_rank(rp.max_level):
            raise LevelNotAllowed()
        lim = self.config.limits
        if len(self.sessions) >= lim.max_open_sessions:
            self.sessions.sweep(self.clock())
            if len(self.sessions) >= lim.max_open_sessions:
                raise Overloaded("too many open sessions", retry_after_ms=1000)
        now = self.clock()
        ch = self.config.challenge
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
        self.sessions.add(session)
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
        return P.SessionOpened(id=req.id, session_id=session.session_id, qr=P.Signed(payload=body, sig=self.keys.sign(body)), expires_at=session.expires_at)

    async def handle_fetch_result(self, conn: Conn, req: P.FetchResult) -> P.ResultMsg:
        rp = await self._rp_for(conn, "fetch")
        s = self.sessions.peek(req.session_id)
        if s is None or s.rp_id != rp.rp_id:
            raise UnknownSession()
        if s.result is None:
            raise ResultPending(retry_after_ms=500)
        return P.ResultMsg(id=req.id, session_id=s.session_id, sealed=s.result)

    # ---- holder: verification (the hot path) --------------------------------------------------------
    async def handle_verify(self, conn: Conn, req: P.Verify) -> P.Verified:
        opened = self.sessions.check(req.session_id, req.nonce, self.clock())
        try:
            tbs = P.verify_message(req.session_id, req.nonce, req.credential_id, sha256(req.face), sha256(req.voice))
            verify_signature(req.device_key, tbs, req.sig)
            cred: Credential = await self._active_credential(req.credential_id, req.device_key)
        except (BadSignature, CredentialError) as exc:
            # Not signed by the key bound to an active credential (a stranger who saw the QR
            # code, an old phone, a voided credential): answered to its sender only; the
            # session stays open for its holder, up to max_failed_attempts.
            await self._failed_attempt(opened, exc)
            raise
        device_box = device_box_key(req.device_key)
        await self._relying_party(opened.rp_id)  # disabled since opening?
        session = self.sessions.claim(req.session_id, req.nonce, self.clock())  # single use from here on

        delivered = False
        try:
            try:
                if P.level_rank(cred.level) < P.level_rank(session.level):
                    raise LevelTooLow()
                challenge = session.challenge if self.config.challenge.check else None
                (face, (voice, said)) = await self._gather(
                    lambda: self._face(req.face), lambda: self._voice(req.voice, req.audio_format, challenge)
                )
                f, v, decision = await self._match_current(cred, face, voice)
                # The card may have been reported lost while the models ran: check again.
                # (a rebind to a new phone meanwhile retires this key: credential_deleted)
                await self._active_credential(cred.credential_id, req.device_key)
            except (Overloaded, DeadlineExceeded):
                raise  # the engine's fault, not the holder's: the session stays usable
            except EngineError as exc:
                result = self._result(session, cred, "fail", _reason_for(exc))
                await self._deliver(session, result)
                delivered = True
                with trio.CancelScope(shield=True):
                    await self._audit(actor=session.rp_id, action="verify", subject=req.credential_id, outcome="fail", detail={"reason": exc.code})
                if isinstance(exc, LevelTooLow):
                    return P.Verified(id=req.id, session_id=session.session_id, sealed=seal(device_box, result))
                raise
            if not decision.passed:
                outcome, reason, detail = "fail", "biometric_mismatch", decision.reason
            elif said is not None and not said.passed:
                outcome, reason, detail = "fail", "challenge_mismatch", "challenge_mismatch"
            else:
                outcome, reason, detail = "pass", "match", "match"
            result = self._result(session, cred, outcome, reason)
            await self._deliver(session, result)
            delivered = True
        finally:
            if not delivered:
                session.used = False  # aborted before any result: the holder may retry
        with trio.CancelScope(shield=True):  # the result is out: the holder must get its copy
            await self._audit(actor=session.rp_id, action="verify", subject=cred.credential_id, outcome=outcome, detail={"reason": detail})
        log.debug("verify %s: face=%.3f voice=%.3f %s", session.session_id, f, v, detail)
        return P.Verified(id=req.id, session_id=session.session_id, sealed=seal(device_box, result))

    async def _failed_attempt(self, session: Session, exc: EngineError) -> None:
        """Count a verify that did not count; the one that reaches the limit closes the
        session with a ``fail`` (``too_many_attempts``) to the relying party."""
        self.metrics.failed_attempts.labels(code=exc.code).inc()
        if session.used:
            return
        session.failed_attempts += 1
        if session.failed_attempts < self.config.limits.max_failed_attempts:
            return
        try:
            self.sessions.claim(session.session_id, session.nonce, self.clock())
        except SessionError:
            return
        self.metrics.failed_attempts.labels(code="too_many_attempts").inc()
        with trio.CancelScope(shield=True):
            await self._deliver(session, self._result(session, None, "fail", "too_many_attempts"))
            await self._audit(actor=session.rp_id, action="verify", subject=session.session_id, outcome="fail", detail={"reason": "too_many_attempts"})

    def _result(self, session: Session, cred: Credential | None, outcome: str, reason: str) -> bytes:
        payload = P.ResultPayload(
            session_id=session.session_id,
            rp_id=session.rp_id,
            outcome=outcome,
            reason=reason,
            level=cred.level if cred is not None else session.level,
            time=self.clock(),
            pseudonym=self.keys.pseudonym(cred.card_number, session.rp_id) if cred is not None else "",
        )
        body = P.encode(payload)
        return P.encode(P.Signed(payload=body, sig=self.keys.sign(body)))

    async def _deliver(self, session: Session, signed_result: bytes) -> None:
        try:
            rp = await self._relying_party(session.rp_id)
        except (UnknownRelyingParty, RelyingPartyDisabled):
            self.metrics.results_not_pushed.labels(why="rp_disabled").inc()
            return  # removed or disabled since the session opened: it gets nothing
        sealed = seal(rp.box_key, signed_result)
        self.sessions.finish(session.session_id, sealed, self.clock() + self.config.limits.result_retention)
        # kept above for fetch_result whatever happens to the pushes
        delivered, full = self.hub.publish(rp.rp_id, P.ResultMsg(session_id=session.session_id, sealed=sealed))
        if full:
            self.metrics.results_not_pushed.labels(why="outbox_full").inc(full)
            log.warning("result for a session of %s not pushed to %d full stream(s); kept for fetch_result", rp.rp_id, full)
        elif not delivered:
            self.metrics.results_not_pushed.labels(why="no_stream").inc()

    async def _audit(self, **kw: Any) -> None:
        await self._db(self.store.audit, now=self.clock(), **kw)

    # ---- holder: enrollment -----------------------------------------------------------------------------
    async def handle_enroll(self, conn: Conn, req: P.Enroll) -> P.Enrolled:
        tbs = P.enroll_message(req.card_number, req.device_key, [sha256(f) for f in req.faces], [sha256(v) for v in req.voices])
        verify_signature(req.device_key, tbs, req.sig)
        device_box_key(req.device_key)  # a usable key for the holder's sealed copies
        card = await self._db(self.store.get_card, req.card_number)
        raise_unless_card_valid(None if card is None else card.status)
        if card.photo_template is None:
            raise CardNotValid()
        card_vec = self._open_template(card.photo_template, card.card_number, "card")

        thunks = [lambda f=f: self._face(f) for f in req.faces]
        thunks += [lambda a=a: self._voice(a, req.audio_format) for a in req.voices]
        out = await self._gather(*thunks)
        faces = np.stack(out[: len(req.faces)])
        voices: list[SpeakerEmbedding] = [v for v, _score in out[len(req.faces):]]

        async with self._enroll_lock:  # search, issue and index as one step: no two can both miss each other
            return await self._enroll_checked(req, card, faces, voices, card_vec)

    async def _enroll_checked(self, req: P.Enroll, card: Any, faces: np.ndarray, voices: list[SpeakerEmbedding], card_vec: np.ndarray) -> P.Enrolled:
        card_thr = self.scores.threshold("face", CARD_PHOTO_FMR)
        if float((faces @ card_vec).min()) < card_thr:
            await self._audit(actor="holder", action="enroll", subject=card.card_number, outcome="refused", detail={"reason": "card_photo_mismatch"})
            raise CardPhotoMismatch()
        if self.config.duplicate_search and len(self.face_index):
            dup_thr = self.scores.threshold("face", DUPLICATE_FMR)
            hits = {owner for row in self.face_index.search(faces, 5) for owner, score in row if score >= dup_thr}
            for owner in hits:
                other = await self._db(self.store.get_credential, owner)
                if other is not None and other.card_number != card.card_number:
                    await self._audit(actor="holder", action="enroll", subject=card.card_number, outcome="refused", detail={"reason": "duplicate_identity"})
                    raise DuplicateIdentity()

        templates = [("face", self._seal_template(v, card.card_number, "face")) for v in faces]
        templates += [("voice", self._seal_voice_template(v, card.card_number)) for v in voices]
        cred, rows, voided = await self._db(
            self.store.issue_credential,
            card_number=card.card_number,
            device_key=req.device_key,
            templates=templates,
            actor="holder",
            now=self.clock(),
        )
        for old in voided:
            self._forget(old)
        self._voice_band[cred.credential_id] = enrollment_band([v.band for v in voices])
        vec_by_row = {"face": list(faces), "voice": [v.vector for v in voices]}
        for modality, index in (("face", self.face_index), ("voice", self.voice_index)):
            mine = [r for r in rows if r.modality == modality]
            index.add(np.asarray([r.template_id for r in mine], dtype=np.int64), [cred.credential_id] * len(mine), np.stack(vec_by_row[modality]))
        await self._refresh_credential_gauge()
        return P.Enrolled(id=req.id, credential_id=cred.credential_id, version=cred.version, level=cred.level)

    # ---- holder: new phone, lost card, status -----------------------------------------------------------
    def _forget(self, credential_id: str) -> None:
        """Drop a credential's templates from the in-memory indexes."""
        self.face_index.remove_owner(credential_id)
        self.voice_index.remove_owner(credential_id)
        self._voice_band.pop(credential_id, None)

    async def _match_current(self, cred: Credential, face: np.ndarray, voice: SpeakerEmbedding) -> tuple[float, float, Any]:
        """Score against the credential's templates; if they went while the models ran
        (card lost, re-applied), raise why rather than ``unknown_credential``."""
        try:
            return self._match(cred, face, voice)
        except UnknownCredential:
            _raise_unless_active(await self._db(self.store.get_credential, cred.credential_id))
            raise

    async def _fresh_check(self, cred: Credential, req: P.Rebind | P.ReportLost, action: str) -> None:
        """The fresh face + voice check that a rebind or a lost-card report needs."""
        (f, (v, _score)) = await self._gather(lambda: self._face(req.face), lambda: self._voice(req.voice, req.audio_format))
        *_scores, decision = await self._match_current(cred, f, v)
        if not decision.passed:
            await self._audit(actor="holder", action=action, subject=cred.credential_id, outcome="refused", detail={"reason": "verification_failed"})
            raise VerificationFailed()

    async def handle_rebind(self, conn: Conn, req: P.Rebind) -> P.Rebound:
        tbs = P.rebind_message(req.credential_id, req.new_device_key, sha256(req.face), sha256(req.voice))
        verify_signature(req.new_device_key, tbs, req.sig)
        device_box_key(req.new_device_key)
        cred = await self._db(self.store.get_credential, req.credential_id)
        _raise_unless_active(cred)
        expected = cred.device_key
        await self._fresh_check(cred, req, "rebind")
        new = await self._db(
            self.store.rebind_device, cred.credential_id, expected_device_key=expected, new_device_key=req.new_device_key, actor="holder", now=self.clock()
        )
        return P.Rebound(id=req.id, credential_id=new.credential_id)

    async def handle_report_lost(self, conn: Conn, req: P.ReportLost) -> P.ReportedLost:
        tbs = P.report_lost_message(req.credential_id, sha256(req.face), sha256(req.voice))
        verify_signature(req.device_key, tbs, req.sig)
        cred = await self._active_credential(req.credential_id, req.device_key)
        await self._fresh_check(cred, req, "report_lost")
        suspended = await self.report_lost(cred.card_number, actor="holder")
        return P.ReportedLost(id=req.id, suspended=len(suspended))

    async def report_lost(self, card_number: str, *, actor: str) -> list[str]:
        suspended = await self._db(self.store.report_card_lost, card_number, actor=actor, now=self.clock())
        for cid in suspended:
            self._forget(cid)
        await self._refresh_credential_gauge()
        return suspended

    async def handle_status(self, conn: Conn, req: P.Status) -> P.StatusReply:
        verify_signature(req.device_key, P.status_message(req.credential_id, req.nonce), req.sig)
        cred = await self._bound_credential(req.credential_id, req.device_key)
        return P.StatusReply(id=req.id, credential_id=cred.credential_id, status=cred.status, level=cred.level)

    # ---- acceptance point ---------------------------------------------------------------------------------
    async def handle_upgrade(self, conn: Conn, req: P.Upgrade) -> P.Upgraded:
        att = P.decode_signed(req.attestation, P.Attestation)
        ap = await self._db(self.store.get_acceptance_point, att.ap_id)
        if ap is None or ap.status != "active":
            raise UnknownAcceptancePoint()
        verify_signature(ap.sign_key, req.attestation.payload, req.attestation.sig)
        if att.level != "high":
            raise InvalidMessage("an attestation can only upgrade a credential to 'high'")
        now = self.clock()
        if not (now - 86400.0 <= att.checked_at <= now + 300.0):
            raise InvalidMessage("attestation is not recent")
        cred = await self._db(self.store.get_credential, att.credential_id)
        if cred is None:
            raise UnknownCredential()
        if not hmac.compare_digest(cred.card_number, att.card_number):
            raise BadSignature("attestation does not match the credential")
        _raise_unless_active(cred)
        new = await self._db(self.store.set_level, cred.credential_id, att.level, actor=att.ap_id, now=now, attestation=P.encode(req.attestation))
        return P.Upgraded(id=req.id, credential_id=new.credential_id, level=new.level)

    async def handle_ping(self, conn: Conn, req: P.Ping) -> P.Pong:
        return P.Pong(id=req.id)

    def close(self) -> None:
        """Release the store and, if the engine made them, the models' worker processes."""
        self.store.close()
        if self.owns_extractors:
            self.x.close()

    def disconnect(self, conn: Conn) -> None:
        if conn.rp is not None:
            self.hub.unsubscribe(conn.rp.rp_id, conn.outbox)

    HANDLERS: dict[type, str] = {
        P.Auth: "handle_auth",
        P.OpenSession: "handle_open_session",
        P.FetchResult: "handle_fetch_result",
        P.Verify: "handle_verify",
        P.Enroll: "handle_enroll",
        P.Rebind: "handle_rebind",
        P.ReportLost: "handle_report_lost",
        P.Status: "handle_status",
        P.Upgrade: "handle_upgrade",
        P.Ping: "handle_ping",
    }

    BIOMETRIC = (P.Verify, P.Enroll, P.Rebind, P.ReportLost)

    def queue_wait(self) -> float:
        """Estimated seconds a new job would wait in the slowest model queue (backlog x batch time)."""
        return max(b.queue_wait() for b in (self.face_batcher, self.voice_batcher, self.challenge_batcher))

    async def dispatch(self, conn: Conn, req: P.Request) -> msgspec.Struct:
        handler = getattr(self, self.HANDLERS[type(req)])
        if not isinstance(req, self.BIOMETRIC):
            return await handler(conn, req)
        # Admission control: beyond capacity, answer at once rather than queue past deadlines.
        lim = self.config.limits
        wait = self.queue_wait()
        if self._biometric >= lim.max_biometric or (self._biometric >= lim.min_admitted and wait > lim.admission_wait):
            raise Overloaded(retry_after_ms=max(100, int(wait * 1000)))
        self._biometric += 1
        try:
            return await handler(conn, req)
        finally:
            self._biometric -= 1


def _reason_for(exc: EngineError) -> str:
    if isinstance(exc, LevelTooLow):
        return "level_too_low"
    if isinstance(exc, SampleError):
        return "sample_quality"
    if isinstance(exc, CredentialError):
        return "credential_inactive"
    return "error"
