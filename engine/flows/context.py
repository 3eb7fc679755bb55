"""What every flow works with: the seams, the keys and the helpers they share.

A :class:`Context` holds the store, the session state and quotas, the matchers, the
models, the keys, the score model, the metrics and the clock, all chosen by the
composition root (:func:`engine.app.build_engine`). Blocking store work runs in
worker threads behind one ``CapacityLimiter``.
"""

from __future__ import annotations

import functools
import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from engine.wire import protocol as P
from ..config import EngineConfig
from ..crypto import EngineKeys, seal
from ..errors import CredentialDeleted, EngineError, RelyingPartyDisabled, UnknownCredential, UnknownRelyingParty, WrongDeviceKey
from ..inference import Inference
from ..matching import DuplicateSearch, Match, Matcher, TemplateSealer
from engine.ops.metrics import Metrics
from engine.inference.speaker import SpeakerEmbedding
from ..state import Quotas, Session, SessionState
from ..store import Credential, RelyingParty, Store, raise_unless_active

__all__ = ["Context", "gather"]

log = logging.getLogger("engine.flows")

#: Seconds a relying party's record is reused before it is read again (a disable takes effect this fast).
RP_CACHE_SECONDS = 2.0
#: Enrollments in worker threads at once (one searching and issuing, one waiting for the
#: store's enrollment lock): the lock, not this bound, is what serialises them.
ENROLL_THREADS = 2


@dataclass(eq=False, kw_only=True)
class Context:
    config: EngineConfig
    store: Store
    state: SessionState
    quotas: Quotas
    matcher: Matcher
    duplicates: DuplicateSearch
    inference: Inference
    keys: EngineKeys
    templates: TemplateSealer
    scores: Any
    metrics: Metrics
    clock: Callable[[], float]
    #: registered relying parties only, so that names a client makes up cannot grow it
    _rp_cache: dict[str, tuple[float, RelyingParty]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.store_limiter = trio.CapacityLimiter(self.config.store_threads)
        self.enroll_limiter = trio.CapacityLimiter(ENROLL_THREADS)

    # ---- the store, from worker threads ------------------------------------------------------
    async def db(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await self._in_thread("store", fn, *args, **kwargs)

    async def _in_thread(self, layer: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn`` in a store worker thread, its CPU counted for ``layer``."""
        return await trio.to_thread.run_sync(self.metrics.layer_cpu.call, layer, functools.partial(fn, *args, **kwargs),
                                             limiter=self.store_limiter)

    async def audit(self, **kw: Any) -> None:
        await self.db(self.store.audit, now=self.clock(), **kw)

    async def refresh_credential_gauge(self) -> None:
        counts = await self.db(self.store.count_credentials)
        for status, n in counts.items():
            self.metrics.credentials.labels(status=status).set(n)

    async def relying_party(self, rp_id: str, *, fresh: bool = False) -> RelyingParty:
        """The relying party's record if it is active, re-read at most every ``RP_CACHE_SECONDS``."""
        now = self.clock()
        cached = self._rp_cache.get(rp_id)
        if fresh or cached is None or now - cached[0] > RP_CACHE_SECONDS:
            rp = await self.db(self.store.get_relying_party, rp_id)
            if rp is not None:
                self._rp_cache[rp_id] = (now, rp)
            else:
                self._rp_cache.pop(rp_id, None)
        else:
            rp = cached[1]
        if rp is None:
            raise UnknownRelyingParty()
        if rp.status != "active":
            raise RelyingPartyDisabled()
        return rp

    async def bound_credential(self, credential_id: str, device_key: bytes, cred: Credential | None = None) -> Credential:
        """The credential (``cred`` if already read), if ``device_key`` is the one bound to it
        (a key replaced by a rebind gets ``credential_deleted``), whatever its status."""
        if cred is None:
            cred = await self.db(self.store.get_credential, credential_id)
        if cred is None:
            raise UnknownCredential()
        if not hmac.compare_digest(cred.device_key, device_key):
            if await self.db(self.store.retired_device, device_key) == credential_id:
                raise CredentialDeleted()
            raise WrongDeviceKey()
        return cred

    async def active_credential(self, credential_id: str, device_key: bytes, cred: Credential | None = None) -> Credential:
        return raise_unless_active(await self.bound_credential(credential_id, device_key, cred))

    async def match(self, credential_id: str, face: np.ndarray, voice: SpeakerEmbedding) -> Match:
        """1:1 against the credential's templates as they are now; its status error if it
        is no longer active (card lost, re-applied for while the models ran)."""
        m: Match = await self._in_thread("match", self.matcher.match, credential_id, face, voice)
        self.metrics.voice_bands.labels(enrolled=m.enrolled_band, probe=voice.band).inc()
        return m

    # ---- the models ------------------------------------------------------------------------------
    async def face(self, image: bytes) -> np.ndarray:
        return await self.inference.face(image)

    async def voice(self, audio: bytes, fmt: str, challenge: str | None = None) -> tuple[SpeakerEmbedding, Any]:
        """The speaker embedding and, if a challenge is given, the check of what was said
        (an ``engine.challenge.Verdict``): one recording, two checks, side by side."""
        pcm = await self.inference.decode_audio(audio, fmt)
        if challenge is None:
            return await self.inference.voice(pcm), None
        voice, verdict = await gather(lambda: self.inference.voice(pcm), lambda: self.inference.challenge(pcm, challenge))
        self.metrics.challenge_checks.labels(stage=verdict.stage, outcome="pass" if verdict.passed else "fail").inc()
        return voice, verdict

    # ---- results ---------------------------------------------------------------------------------
    def signed_result(self, session: Session, cred: Credential | None, outcome: str, reason: str) -> bytes:
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

    async def deliver(self, session: Session, signed_result: bytes) -> None:
        """Seal the result to the relying party, keep it for ``fetch_result`` and push it."""
        try:
            rp = await self.relying_party(session.rp_id)
        except (UnknownRelyingParty, RelyingPartyDisabled):
            self.metrics.results_not_pushed.labels(why="rp_disabled").inc()
            return  # removed or disabled since the session opened: it gets nothing
        sealed = seal(rp.box_key, signed_result)
        delivery = await self.state.finish(session, sealed, retain_until=self.clock() + self.config.limits.result_retention)
        if delivery.full:
            self.metrics.results_not_pushed.labels(why="outbox_full").inc(delivery.full)
            log.warning("result for a session of %s not pushed to %d full stream(s); kept for fetch_result", rp.rp_id, delivery.full)
        elif not delivery.delivered:
            self.metrics.results_not_pushed.labels(why="no_stream").inc()


async def gather(*thunks: Callable[[], Any]) -> list[Any]:
    """Run coroutines concurrently; the first EngineError (in argument order) wins."""
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
