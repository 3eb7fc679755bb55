"""Explicit, validated configuration objects.

Nothing inside ``engine/`` reads the environment: the CLI reads flags and
files and builds an :class:`EngineConfig`, which is passed down explicitly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from .inference.batcher import BatcherConfig
from .errors import ConfigError
from engine.inference.models import DEFAULT_MODELS_DIR
from engine.wire.protocol import MAX_FRAME_BYTES

__all__ = ["LimitsConfig", "ChallengeSettings", "EngineConfig", "IndexConfig"]


@dataclass(frozen=True, kw_only=True)
class LimitsConfig:
    """Per-connection and per-request limits."""

    max_frame: int = MAX_FRAME_BYTES
    max_in_flight: int = 64  # requests in flight per connection
    outbox: int = 256  # replies and pushes queued per connection
    session_ttl: float = 60.0  # seconds a QR session stays usable
    result_retention: float = 600.0  # seconds a result can still be fetched
    max_open_sessions: int = 100_000
    #: Biometric requests (verify, enroll, rebind, report) admitted at once, engine-wide;
    #: one more is answered ``overloaded`` at once instead of queueing.
    max_biometric: int = 32
    #: Refuse new biometric requests while the model queues' backlog is estimated to take
    #: longer than this (seconds), once at least ``min_admitted`` are in progress. With the
    #: models sharing their worker processes the estimate is all the work queued ahead of
    #: a new verification, and an admitted one takes its own model time on top (p50 at 50 %
    #: of capacity: 130-175 ms): at 0.75 s two 30-minute soaks kept the p99 under 1 s in
    #: every window (821-898 ms, 1.0-4.1 % refused); at 1.0 s, with the machine slower, it was
    #: over 1 s in four windows of six (benchmarks/TUNING.md section 6).
    admission_wait: float = 0.75
    min_admitted: int = 4
    request_deadline: float = 10.0  # seconds for any one request, set at the boundary
    #: Verify attempts on one session that do not count (not signed by the key bound to an
    #: active credential: a stranger who saw the QR code, a bad signature, an inactive
    #: credential). Each is answered to its sender and the session stays open, except the
    #: one that reaches this number: it closes the session with a ``fail``
    #: (``too_many_attempts``) to the relying party.
    max_failed_attempts: int = 5
    #: ``fetch_result`` has its own token bucket, this many times the relying party's
    #: ``open_session`` quota: a relying party at its quota can still collect what it is owed.
    fetch_quota_factor: float = 2.0

    # ---- connections (benchmarks/TUNING.md section 7 has the measurements) ----------------------
    #: Open connections, engine-wide. Each idle one costs about 20 KiB in the engine and one
    #: file descriptor; the CLI lowers this to fit the open-files limit.
    max_connections: int = 10_000
    #: Connections not (yet) authenticated as a relying party: holders' phones, and relying
    #: parties before ``auth``. The difference to ``max_connections`` is kept for
    #: authenticated streams. At either cap a new connection evicts the unauthenticated one
    #: that has nothing in flight and has been quiet longest; if there is none it is refused
    #: with ``too_many_connections``.
    max_unauthenticated: int = 9_000
    #: Seconds to send the first frame after ``hello``.
    first_frame_timeout: float = 10.0
    #: Seconds an unauthenticated connection with nothing in flight may stay silent.
    idle_timeout: float = 60.0
    #: Seconds an authenticated relying-party stream with nothing in flight may stay silent
    #: (engine.wire.client pings every ``keepalive`` seconds, 60 by default).
    rp_idle_timeout: float = 600.0
    #: Inside a frame: at least ``min_receive_rate`` bytes/s over each ``rate_window``
    #: seconds, or the frame completes within the window (32 kbit/s: a GPRS-class link).
    min_receive_rate: int = 4096
    rate_window: float = 10.0
    #: Seconds a write to the peer may take (a peer that does not read its replies).
    write_timeout: float = 30.0
    #: Bytes one connection may hold: request bodies in flight plus the frame being read.
    #: Past it, the engine stops reading that connection until replies free room.
    max_connection_bytes: int = 16 * 1024 * 1024
    #: Bytes of partly received frames over 64 KiB (engine.wire.framing.SMALL_FRAME), engine-wide,
    #: reserved from the length prefix on. A frame that does not fit is answered
    #: ``frame_budget`` and the connection closed; smaller frames are never refused for it.
    frame_budget: int = 128 * 1024 * 1024
    #: Seconds spent, after the last frame, discarding what the peer still sends before
    #: closing, so that the close is not a reset that loses that frame.
    linger: float = 1.0
    #: Error replies a connection may provoke per second (a bucket of ``error_burst``)
    #: before the engine reads its next frame only once the bucket has room again: a client
    #: that sends malformed or unauthorised requests as fast as it can gets them answered at
    #: this pace and no faster, so it cannot take the event loop from everyone else. Replies
    #: about the engine's state or the protocol's normal course (``overloaded``,
    #: ``rate_limited``, ``result_pending``...: ``engine.server.connection.UNPACED``) are not
    #: counted. 0 turns the pacing off.
    error_rate: float = 20.0
    error_burst: int = 10

    def __post_init__(self) -> None:
        if self.error_rate < 0 or self.error_burst < 1:
            raise ConfigError("error_rate cannot be negative and error_burst must be positive")
        if self.max_frame < 1024:
            raise ConfigError("max_frame must be at least 1024 bytes")
        if self.max_in_flight < 1 or self.outbox < 1:
            raise ConfigError("max_in_flight and outbox must be positive")
        if self.outbox <= self.max_in_flight:
            raise ConfigError("outbox must be larger than max_in_flight (every reply must fit)")
        if not 1 <= self.max_unauthenticated <= self.max_connections:
            raise ConfigError("max_unauthenticated must be between 1 and max_connections")
        if self.max_connection_bytes < self.max_frame or self.frame_budget < self.max_frame:
            raise ConfigError("max_connection_bytes and frame_budget must hold at least one max_frame")
        for name in ("first_frame_timeout", "idle_timeout", "rp_idle_timeout", "rate_window", "write_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive")
        if self.min_receive_rate < 0 or self.linger < 0:
            raise ConfigError("min_receive_rate and linger cannot be negative")
        if self.max_failed_attempts < 1 or self.fetch_quota_factor <= 0:
            raise ConfigError("max_failed_attempts and fetch_quota_factor must be positive")
        if not 1.0 <= self.session_ttl <= 3600.0:
            raise ConfigError("session_ttl must be between 1 s and 1 h")
        if self.request_deadline <= 0:
            raise ConfigError("request_deadline must be positive")


@dataclass(frozen=True, kw_only=True)
class ChallengeSettings:
    """The spoken challenge carried by every session."""

    kind: str = "digits"  # "digits" or "phrase"
    length: int = 6
    phrases: tuple[str, ...] = ()
    check: bool = True  # check that the recording says the challenge

    def __post_init__(self) -> None:
        if self.kind not in ("digits", "phrase"):
            raise ConfigError("challenge kind must be 'digits' or 'phrase'")
        if self.kind == "phrase" and not self.phrases:
            raise ConfigError("challenge kind 'phrase' needs a phrase list")
        if not 4 <= self.length <= 12:
            raise ConfigError("challenge length must be 4..12 digits")


@dataclass(frozen=True, kw_only=True)
class IndexConfig:
    """The face index of the 1:N duplicate search (docs/register.md has the measurements).

    Below ``train_min`` face templates the index is exact (a flat inner-product index); from
    it on, ``netid index rebuild`` (or the first start-up without an index file) trains an
    IVF index of ``nlist`` lists (0: half the square root of the templates) whose lists hold
    ``codes`` (a FAISS code: ``PQ64x4fs`` is 32 bytes a template), searched in
    ``probe_fraction`` of its lists and ``min_probe`` at the least. Every candidate whose
    approximate score is within ``rerank_margin`` of the duplicate threshold, among the
    ``candidates`` nearest of each probe face, is re-scored exactly on its stored template.
    """

    train_min: int = 50_000
    codes: str = "PQ64x4fs"
    nlist: int = 0
    probe_fraction: float = 1 / 8
    #: Lists searched at the least, whatever the fraction (all of them in a smaller index).
    min_probe: int = 160
    candidates: int = 512
    rerank_margin: float = 0.1
    #: Changes applied from the store's log since the index file was written, past which it
    #: is written again (so a restart replays at most this many).
    save_every: int = 10_000
    #: Templates per training template past which ``netid index status`` advises a rebuild
    #: (its lists were drawn for a register this many times smaller).
    retrain_factor: float = 4.0

    def __post_init__(self) -> None:
        if self.train_min < 1 or self.nlist < 0 or self.candidates < 1 or self.save_every < 1 or self.min_probe < 1:
            raise ConfigError("train_min, min_probe, candidates and save_every must be positive, nlist >= 0")
        if not 0.0 < self.probe_fraction <= 1.0:
            raise ConfigError("probe_fraction must be in (0, 1]")
        if not 0.0 <= self.rerank_margin <= 2.0 or self.retrain_factor < 1.0:
            raise ConfigError("rerank_margin must be in [0, 2] and retrain_factor at least 1")


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 7400
    store_url: str | None = None  # e.g. "sqlite:////var/lib/netid/netid.db"; default: sqlite:///<data_dir>/engine.db
    template_key_path: Path | None = None  # default: data_dir/template.key
    models_dir: Path = DEFAULT_MODELS_DIR
    tls_cert: Path | None = None
    tls_key: Path | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None  # None: no metrics endpoint
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    challenge: ChallengeSettings = field(default_factory=ChallengeSettings)
    # Defaults measured on 2 cores (benchmarks/TUNING.md); raise workers on bigger machines.
    face_batch: BatcherConfig = field(default_factory=lambda: BatcherConfig(max_batch=4, max_wait=0.004, queue_size=64, workers=2))
    #: CAM++ runs one recording at a time (about 62 CPU ms each): a batch of 16 held one
    #: model worker for a second, and the engine reached 0.735 of the limit; batches of four
    #: on both workers reached 0.971 in the same sitting (benchmarks/TUNING.md section 1).
    voice_batch: BatcherConfig = field(default_factory=lambda: BatcherConfig(max_batch=4, max_wait=0.004, queue_size=64, workers=2))
    #: One recording per batch: a batch's checks finish together, so a recording the screen
    #: decided would wait for its partner's phone loop (TUNING section 6 h).
    challenge_batch: BatcherConfig = field(default_factory=lambda: BatcherConfig(max_batch=1, max_wait=0.002, queue_size=64, workers=2))
    #: With the challenge check on, a voice job may wait this long (seconds) for company.
    #: With CAM++ the voice model is the longest step of a verification, so the wait is on
    #: the critical path: 0.2 s doubled the p50 and raised p99 at 80 % load by half
    #: (benchmarks/TUNING.md section 6). ``voice_batch.max_wait`` applies when it is longer,
    #: or with the check off.
    voice_wait_with_challenge: float = 0.02
    intra_op_threads: int = 1
    #: worker processes that run the face and voice models (0: the batchers' threads in
    #: the engine's process, next to the event loop). At 7 verifications/s a verification
    #: cost 258 CPU ms with them, 267 without (benchmarks/TUNING.md, section 6 h).
    model_processes: int = 2
    #: The challenge recogniser in the model workers too (with ``model_processes`` > 0),
    #: instead of ``challenge_batch.workers`` processes of its own: two processes on two
    #: cores take a verification's jobs in turn, oldest first, where four shared the cores
    #: among whatever ran; at the same load and CPU per verification p99 fell from
    #: 1,094/1,285 to 780/827 ms and from 551/950 to 535/815 ms (benchmarks/TUNING.md, section 6).
    shared_processes: bool = True
    store_threads: int = 4
    duplicate_search: bool = True
    #: The duplicate search's face index, kept in ``DATA/index`` (docs/register.md).
    face_index: IndexConfig = field(default_factory=IndexConfig)
    #: Where sessions, results and quotas live: None, this process (one node); or
    #: ``redis://HOST[:PORT]/DB[?prefix=NAME]`` for many nodes, which also keeps consumed
    #: sessions and undelivered results in the PostgreSQL store (docs/cluster.md).
    state_url: str | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both a certificate and a key")
        if not 0 <= self.port <= 65535:
            raise ConfigError("port out of range")
        if self.intra_op_threads < 1 or self.store_threads < 1:
            raise ConfigError("thread counts must be positive")
        if not 0 <= self.model_processes <= 64:
            raise ConfigError("model_processes must be 0..64")
        if not 0.0 <= self.voice_wait_with_challenge <= 10.0:
            raise ConfigError("voice_wait_with_challenge must be between 0 and 10 seconds")
        if self.state_url is not None:
            if self.state_url.partition("://")[0].lower() not in ("redis", "rediss", "unix"):
                raise ConfigError("the state URL reads redis://HOST[:PORT]/DB[?prefix=NAME] (or rediss://, unix://)")
            if self.store_location.partition("://")[0].lower() not in ("postgresql", "postgres"):
                raise ConfigError("shared state on Redis needs a PostgreSQL store (--store postgresql://...):"
                                  " consumed sessions and undelivered results are kept there")

    @property
    def voice_batcher(self) -> BatcherConfig:
        """The voice batcher's settings in effect (see ``voice_wait_with_challenge``)."""
        if self.challenge.check and self.voice_wait_with_challenge > self.voice_batch.max_wait:
            return dataclasses.replace(self.voice_batch, max_wait=self.voice_wait_with_challenge)
        return self.voice_batch

    @property
    def store_location(self) -> str:
        return self.store_url or f"sqlite:///{self.data_dir / 'engine.db'}"

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "index"

    @property
    def template_key_file(self) -> Path:
        return self.template_key_path or self.data_dir / "template.key"
