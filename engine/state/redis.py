"""Session and result state, and quotas, shared by many engine nodes: Redis for speed and
fan-out, PostgreSQL (:mod:`engine.state.durable`) for what must not be lost.

In Redis, under a key prefix (``?prefix=`` of the state URL, default ``netid``):

- ``P:s:<session id>``: an open session (hash: the session, the digest of its nonce, its
  expiry, used, failed attempts, done), with a TTL a little past the session's expiry;
- ``P:open``: a sorted set of open session ids by expiry, which bounds the open sessions;
- ``P:q:<rp>:<bucket>``: a relying party's token bucket (hash), expiring once full again;
- channel ``P:r:<rp>``: the relying party's results, published to the nodes holding its streams.

Each transition is one Lua script, so it is atomic across nodes (an open takes its relying
party's quota in the same script). A claim (or the failed
attempt that closes a session) is then recorded in PostgreSQL, which decides for good: a
nonce stays consumed across a Redis restart. A result is written to PostgreSQL before it is
pushed to this node's streams and published; the node that hands it to a stream marks it
delivered, and a relying party that (re)connects anywhere is sent what is undelivered. Every
node also re-sends, every ``REDELIVER_EVERY`` seconds, the undelivered results of the relying
parties it holds streams for, so a lost publication (Redis restarting, a node dying between
push and mark) costs a delay, not the result. Delivery is at least once: a relying party may
see a result twice and keys them by session id.

redis-py's blocking client runs in worker threads behind a ``CapacityLimiter``; the
subscription has a thread of its own, which resubscribes after Redis comes back. Redis or
PostgreSQL unreachable raises ``Unavailable`` (``unavailable``, with a retry hint).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec
import redis
import trio
from redis.backoff import NoBackoff
from redis.retry import Retry

from engine.wire import protocol as P
from ..errors import ConfigError, EngineError, Overloaded, RateLimited, ResultPending, SessionExpired, SessionUsed, Unavailable, UnknownSession
from ..ops.layer_cpu import LayerCpu
from .base import Delivery, Session
from .durable import RETRY_AFTER_MS, DurableState
from .hub import ResultHub

__all__ = ["RedisQuotas", "RedisSessionState", "open_shared_state", "parse_state_url"]

log = logging.getLogger("engine.state")

#: Redis commands in worker threads at once (the connection pool holds as many connections).
REDIS_THREADS = 8
#: PostgreSQL statements in worker threads at once (the pool holds as many connections).
DURABLE_THREADS = 4
#: Seconds between re-sends of undelivered results to the streams of this node.
REDELIVER_EVERY = 2.0
#: Seconds between the batched marks of results pushed here as delivered (under
#: ``REDELIVER_EVERY``, so a result pushed is marked before a re-send would pick it up).
MARK_EVERY = 1.0
#: Seconds between sweeps of expired results and consumed sessions in PostgreSQL.
SWEEP_EVERY = 30.0
#: Seconds a claimed session stays in Redis past its expiry, waiting for its result.
CLAIMED_GRACE = 300.0
#: Seconds the subscriber thread waits for a publication before it looks again at which
#: channels to follow (a relying party's new stream on this node is followed within it; what
#: was published meanwhile reaches the stream from pending_results). Each wake-up costs CPU.
LISTEN_WAIT = 0.5
_PREFIX_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")

# a token bucket holding a minute's worth (key, per minute, now) -> 0 taken, else
# milliseconds until one is back: the body of _TAKE, and the start of _OPEN
_BUCKET = """
local function take(key, cap, now)
  local rate = cap / 60.0
  local v = redis.call('HMGET', key, 't', 'last')
  local tokens = tonumber(v[1]) or cap
  local last = tonumber(v[2]) or now
  if now > last then tokens = math.min(cap, tokens + (now - last) * rate) else now = last end
  local wait = 0
  if tokens < 1 then wait = math.floor((1 - tokens) / rate * 1000) + 1 else tokens = tokens - 1 end
  redis.call('HSET', key, 't', string.format('%.6f', tokens), 'last', string.format('%.6f', now))
  redis.call('PEXPIRE', key, 61000)
  return wait
end
"""
_TAKE = _BUCKET + "return take(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))"
# -> 1 kept; 0 too many open; -wait: the relying party's open quota (ARGV[9] per minute,
# bucket KEYS[3]) is spent
_OPEN = _BUCKET + """
if tonumber(ARGV[9]) > 0 then
  local wait = take(KEYS[3], tonumber(ARGV[9]), tonumber(ARGV[1]))
  if wait > 0 then return -wait end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'session', ARGV[4], 'digest', ARGV[5], 'expires', ARGV[6], 'rp', ARGV[7],
           'used', '0', 'fails', '0', 'done', '0')
redis.call('PEXPIRE', KEYS[1], ARGV[8])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[3])
return 1
"""
# the session open with this nonce (ARGV[1] its digest, ARGV[2] now), read into v; else
# {0} unknown or another nonce, {2} used, {3} expired: the start of _CLAIM and _FAIL
_OPEN_WITH_NONCE = """
local v = redis.call('HMGET', KEYS[1], 'session', 'digest', 'used', 'expires')
if not v[1] or v[2] ~= ARGV[1] then return {0} end
if v[3] ~= '0' then return {2} end
if tonumber(ARGV[2]) >= tonumber(v[4]) then return {3} end
"""
# -> {1, session, expires} claimed
_CLAIM = _OPEN_WITH_NONCE + """
redis.call('HSET', KEYS[1], 'used', '1')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, v[1], v[4]}
"""
_UNCLAIM = """
if redis.call('HGET', KEYS[1], 'done') == '0' then redis.call('HSET', KEYS[1], 'used', '0') end
return 0
"""
# -> {4} a failure counted; {1, session, expires} for the failure that reaches the limit
# ARGV[3] (the session is then claimed)
_FAIL = _OPEN_WITH_NONCE + """
local n = redis.call('HINCRBY', KEYS[1], 'fails', 1)
if n < tonumber(ARGV[3]) then return {4} end
redis.call('HSET', KEYS[1], 'used', '1')
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {1, v[1], v[4]}
"""

#: what a claim or a counted failure answers for a session not open with the nonce given
_REFUSED: dict[int, type[EngineError]] = {0: UnknownSession, 2: SessionUsed, 3: SessionExpired}

_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError, OSError)


def parse_state_url(url: str) -> tuple[str, str]:
    """``(redis-py URL, key prefix)`` from ``redis://HOST[:PORT]/DB[?prefix=NAME]`` (or
    ``rediss://``, ``unix://``). The URL is never repeated in a message: it may hold a password."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("redis", "rediss", "unix"):
        raise ConfigError("a state URL reads redis://HOST[:PORT]/DB[?prefix=NAME] (or rediss://, unix://)")
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefixes = [v for k, v in query if k == "prefix"]
    prefix = prefixes[-1] if prefixes else "netid"
    if not prefix or len(prefix) > 64 or not set(prefix) <= _PREFIX_CHARS:
        raise ConfigError("prefix= must be 1-64 letters, digits, '_', '-' or '.'")
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode([(k, v) for k, v in query if k != "prefix"]), "")), prefix


def connect(url: str) -> redis.Redis:
    """A client that fails fast: one retry (a pooled connection that died with a Redis
    restart), then ``Unavailable``; the request's own deadline bounds the rest."""
    return redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=1.0, health_check_interval=5,
                                retry=Retry(NoBackoff(), 1), max_connections=REDIS_THREADS + 2)


class _Redis:
    """The client, its scripts and the worker threads that call it."""

    def __init__(self, client: redis.Redis, prefix: str, *, cpu: LayerCpu | None = None) -> None:
        self.client = client
        self.prefix = prefix
        self.cpu = cpu or LayerCpu()
        self.limiter = trio.CapacityLimiter(REDIS_THREADS)
        self.scripts = {name: client.register_script(src) for name, src in
                        (("open", _OPEN), ("claim", _CLAIM), ("unclaim", _UNCLAIM), ("fail", _FAIL), ("take", _TAKE))}

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await trio.to_thread.run_sync(self.cpu.call, "state", functools.partial(fn, *args, **kwargs), limiter=self.limiter)
        except _DOWN as exc:
            raise Unavailable(f"the session state is unreachable ({type(exc).__name__})", retry_after_ms=RETRY_AFTER_MS) from None

    async def script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return await self.run(self.scripts[name], keys=keys, args=args)

    def bucket(self, rp_id: str, bucket: str) -> str:
        """The key of a relying party's quota bucket."""
        return f"{self.prefix}:q:{rp_id}:{bucket}"


def _ms(seconds: float) -> int:
    return max(1000, int(seconds * 1000))


class RedisSessionState:
    """``SessionState`` for many nodes; see the module docstring."""

    def __init__(self, client: redis.Redis, durable: DurableState, *, prefix: str = "netid", link: _Redis | None = None) -> None:
        self.r = link or _Redis(client, prefix)
        self.durable = durable
        self._durable_limiter = trio.CapacityLimiter(DURABLE_THREADS)
        self.hub = ResultHub()
        self.node = secrets.token_hex(8)  # publications from this node are pushed here directly
        self._clock: Callable[[], float] = time.time
        # the relying parties with a stream here, as channels; replaced whole, never changed in
        # place, since the subscriber thread reads it
        self._channels: frozenset[str] = frozenset()
        self._catch_up_send, self._catch_up = trio.open_memory_channel[tuple[str, Any]](1024)
        self._delivered: set[str] = set()  # session ids pushed here, to be marked delivered
        self._closed = False

    def _key(self, session_id: str) -> str:
        return f"{self.r.prefix}:s:{session_id}"

    def channel(self, rp_id: str) -> str:
        return f"{self.r.prefix}:r:{rp_id}"

    async def _durable(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await trio.to_thread.run_sync(self.r.cpu.call, "state", functools.partial(fn, *args, **kwargs), limiter=self._durable_limiter)

    # ---- sessions --------------------------------------------------------------------------------
    async def open(self, session: Session, *, now: float, max_open: int, quota: int = 0) -> None:
        blob = msgspec.msgpack.encode(session)
        digest = hashlib.sha256(session.nonce).digest()
        keys = [self._key(session.session_id), f"{self.r.prefix}:open", self.r.bucket(session.rp_id, "open")]
        got = await self.r.script("open", keys, [
            repr(now), max_open, session.session_id, blob, digest, repr(session.expires_at), session.rp_id,
            _ms(session.expires_at - now + 5.0), max(0, quota)])
        if got < 0:
            raise RateLimited(retry_after_ms=-int(got))
        if not got:
            raise Overloaded("too many open sessions", retry_after_ms=1000)

    async def claim(self, session_id: str, nonce: bytes, now: float) -> Session:
        # one worker-thread job for both services: the claim is on the hot path
        code, session = await self.r.run(self._claim_both, session_id, hashlib.sha256(nonce).digest(), now)
        if session is None:
            raise _REFUSED[code]()
        return session

    def _claim_both(self, session_id: str, digest: bytes, now: float) -> tuple[int, Session | None]:
        """In a worker thread: the claim in Redis, then the single use in PostgreSQL."""
        key = self._key(session_id)
        got = self.r.scripts["claim"](keys=[key], args=[digest, repr(now), _ms(CLAIMED_GRACE)])
        if got[0] != 1:
            return got[0], None
        session = msgspec.msgpack.decode(got[1], type=Session)
        won = self._consume_or_unclaim(key, session_id, digest, now, session.expires_at)
        return (1, session) if won else (2, None)

    def _consume_or_unclaim(self, key: str, session_id: str, digest: bytes, now: float, expires_at: float) -> bool:
        """In a worker thread, after a claim in Redis: the single use in PostgreSQL, which
        decides for good; a claim PostgreSQL could not record is undone in Redis."""
        try:
            return self.durable.consume(session_id, digest, now=now, expires_at=expires_at)
        except Unavailable:
            self._unclaim_now(key)
            raise

    def _unclaim_now(self, key: str) -> None:
        """In a worker thread: undo a claim in Redis, or say it stays (it expires unused)."""
        try:
            self.r.scripts["unclaim"](keys=[key], args=[])
        except _DOWN:
            log.warning("a session's claim could not be undone in Redis; it expires unused")

    async def _unclaim_quietly(self, key: str) -> None:
        await self.r.run(self._unclaim_now, key)

    async def release(self, session_id: str) -> None:
        """Best effort: if either service is down the session stays consumed (refused, never reused twice)."""
        try:
            await self._durable(self.durable.unconsume, session_id)
        except Unavailable:
            log.warning("a claim could not be given back: PostgreSQL is unreachable; the session stays used")
            return
        await self._unclaim_quietly(self._key(session_id))

    async def count_failure(self, session_id: str, nonce: bytes, now: float, *, limit: int) -> Session | None:
        code, session = await self.r.run(self._fail_both, session_id, hashlib.sha256(nonce).digest(), now, limit)
        if code in _REFUSED:
            raise _REFUSED[code]()
        return session

    def _fail_both(self, session_id: str, digest: bytes, now: float, limit: int) -> tuple[int, Session | None]:
        """In a worker thread: count the failure in Redis; the one that reaches ``limit``
        claims the session there, then records its single use in PostgreSQL."""
        key = self._key(session_id)
        got = self.r.scripts["fail"](keys=[key], args=[digest, repr(now), limit, _ms(CLAIMED_GRACE)])
        if got[0] != 1:
            return got[0], None
        session = msgspec.msgpack.decode(got[1], type=Session)
        won = self._consume_or_unclaim(key, session_id, digest, now, session.expires_at)
        return (1, session) if won else (4, None)  # another node's verify took it meanwhile

    # ---- results ---------------------------------------------------------------------------------
    async def finish(self, session: Session, sealed: bytes, *, retain_until: float) -> Delivery:
        sid, rp_id = session.session_id, session.rp_id
        receivers = await self._durable(self._keep_and_publish, sid, rp_id, sealed, self._clock(), retain_until)
        local = self._push(rp_id, sid, sealed)
        if receivers is None:
            log.warning("a result could not be published (Redis unreachable); it is kept and re-sent when Redis returns")
            return local
        remote = max(0, receivers - (1 if self.channel(rp_id) in self._channels else 0))
        return Delivery(local.delivered + remote, local.full)

    def _keep_and_publish(self, sid: str, rp_id: str, sealed: bytes, now: float, retain_until: float) -> int | None:
        """In a worker thread (one job for both services: the hot path): keep the result in
        PostgreSQL, then mark it done and publish it in Redis. The subscribers reached, or
        ``None`` if Redis could not be reached (the result is kept and re-sent later)."""
        self.durable.keep_result(sid, rp_id, sealed, now=now, expires=retain_until)
        try:
            pipe = self.r.client.pipeline(transaction=False)
            pipe.hset(self._key(sid), "done", "1")
            pipe.publish(self.channel(rp_id), msgspec.msgpack.encode((self.node, sid, sealed)))
            _done, receivers = pipe.execute()
        except _DOWN:
            return None
        return int(receivers)

    def _push(self, rp_id: str, session_id: str, sealed: bytes, outbox: Any = None) -> Delivery:
        """Push to this node's streams of the relying party (or one ``outbox``); remember to mark it."""
        msg = P.ResultMsg(session_id=session_id, sealed=sealed)
        if outbox is None:
            delivery = self.hub.publish(rp_id, msg)
        else:
            try:
                outbox.send_nowait(msg)
                delivery = Delivery(1, 0)
            except trio.WouldBlock:
                delivery = Delivery(0, 1)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                delivery = Delivery(0, 0)
        if delivery.delivered:
            self._delivered.add(session_id)
        return delivery

    async def result(self, session_id: str, rp_id: str) -> bytes:
        kept = await self._durable(self.durable.result, session_id, now=self._clock())
        if kept is not None:
            if kept[0] != rp_id:
                raise UnknownSession()
            return kept[1]
        owner = await self.r.run(self.r.client.hget, self._key(session_id), "rp")
        if owner is None or owner.decode() != rp_id:
            raise UnknownSession()
        raise ResultPending(retry_after_ms=500)

    # ---- streams ---------------------------------------------------------------------------------
    def subscribe(self, rp_id: str, outbox: trio.MemorySendChannel) -> None:
        self.hub.subscribe(rp_id, outbox)
        self._channels |= {self.channel(rp_id)}
        try:  # what it missed while away, from any node
            self._catch_up_send.send_nowait((rp_id, outbox))
        except trio.WouldBlock:
            pass  # the periodic re-send covers it

    def unsubscribe(self, rp_id: str, outbox: trio.MemorySendChannel) -> None:
        self.hub.unsubscribe(rp_id, outbox)
        if rp_id not in self._local_rps():
            self._channels -= {self.channel(rp_id)}

    def _local_rps(self) -> list[str]:
        return list(self.hub._streams)  # the hub's own table: the relying parties with a stream here

    async def _redeliver(self, rp_ids: list[str], outbox: Any = None, *, settled: float = REDELIVER_EVERY) -> None:
        """Push the undelivered results of ``rp_ids`` finished more than ``settled`` seconds ago."""
        now = self._clock()
        rows = await self._durable(self.durable.undelivered, rp_ids, now=now, created_before=now - settled)
        for rp_id, sid, sealed in rows:
            self._push(rp_id, sid, sealed, outbox)

    async def healthy(self) -> bool:
        """Redis answers ``PING`` and PostgreSQL ``SELECT 1`` (each within about a second)."""
        try:
            await self.r.run(self.r.client.ping)
        except (Unavailable, redis.RedisError):
            return False
        return bool(await self._durable(self.durable.healthy))

    # ---- background work -------------------------------------------------------------------------
    async def run(self, clock: Callable[[], float], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Subscriber thread, catch-up of reconnecting streams, delivery marks, re-sends, sweeps."""
        self._clock = clock
        stop = threading.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(trio.to_thread.run_sync, self._listen, stop, trio.lowlevel.current_trio_token(),
                                                     abandon_on_cancel=True, thread_name="netid-state-subscriber"))
                nursery.start_soon(self._catch_up_loop)
                nursery.start_soon(self._every, MARK_EVERY, self._mark_delivered)
                nursery.start_soon(self._every, REDELIVER_EVERY, lambda: self._redeliver(self._local_rps()))
                nursery.start_soon(self._every, SWEEP_EVERY, lambda: self._durable(self.durable.sweep, self._clock()))
                task_status.started()
        finally:
            stop.set()
            with trio.CancelScope(shield=True):
                try:
                    await self._mark_delivered()
                except EngineError:
                    pass  # unmarked results are sent again: at least once
                await trio.to_thread.run_sync(self.close)

    def close(self) -> None:
        """Close the connections (idempotent); the engine's run does it when it ends."""
        if not self._closed:
            self._closed = True
            self.r.client.close()
            self.durable.close()

    async def _every(self, seconds: float, job: Callable[[], Any]) -> None:
        while True:
            await trio.sleep(seconds)
            try:
                await job()
            except EngineError as exc:  # Unavailable, mostly: the next round retries
                log.warning("shared state: %s; retrying", exc.message)

    async def _catch_up_loop(self) -> None:
        async for rp_id, outbox in self._catch_up:
            try:
                await self._redeliver([rp_id], outbox, settled=0.0)
            except Unavailable as exc:
                log.warning("shared state: %s; the periodic re-send will catch the stream up", exc.message)

    async def _mark_delivered(self) -> None:
        if not self._delivered:
            return
        done, self._delivered = list(self._delivered), set()
        try:
            await self._durable(self.durable.mark_delivered, done, now=self._clock())
        except Unavailable:
            self._delivered.update(done)
            raise

    def _listen(self, stop: threading.Event, token: trio.lowlevel.TrioToken) -> None:
        """The subscriber thread: follow ``_channels``, hand publications from other nodes to
        the event loop; after Redis comes back, resubscribe and catch every stream up."""
        pubsub, subscribed, pause = None, set(), 0.1
        while not stop.is_set():
            try:
                if pubsub is None:
                    pubsub, subscribed = self.r.client.pubsub(ignore_subscribe_messages=True), set()
                    pubsub.ping()  # connects, or raises while Redis is down
                    if pause > 0.1:
                        log.info("shared state: Redis is back; resubscribed")
                        trio.from_thread.run_sync(self._catch_up_all, trio_token=token)
                wanted = self._channels
                if wanted - subscribed:
                    pubsub.subscribe(*(wanted - subscribed))
                if subscribed - wanted:
                    pubsub.unsubscribe(*(subscribed - wanted))
                subscribed = wanted
                msg = self.r.cpu.call("state", lambda: pubsub.get_message(timeout=LISTEN_WAIT)) if subscribed else None
                if subscribed:
                    pause = 0.1
                else:
                    stop.wait(0.05)
                if msg is not None and msg.get("type") == "message":
                    self.r.cpu.call("state", lambda: self._received(msg, token))
            except _DOWN as exc:
                if pause == 0.1:
                    log.warning("shared state: Redis unreachable (%s); resubscribing when it returns", type(exc).__name__)
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:  # noqa: BLE001 - the connection is gone either way
                        pass
                pubsub = None
                pause = min(pause * 2, 2.0)
                stop.wait(pause)
            except trio.RunFinishedError:
                break
        if pubsub is not None:
            pubsub.close()

    def _received(self, msg: dict[str, Any], token: trio.lowlevel.TrioToken) -> None:
        try:
            node, sid, sealed = msgspec.msgpack.decode(msg["data"], type=tuple[str, str, bytes])
            rp_id = msg["channel"].decode().rsplit(":r:", 1)[1]
        except (msgspec.DecodeError, UnicodeDecodeError, IndexError):
            log.warning("shared state: an undecodable publication on the results channel, ignored")
            return
        if node != self.node:  # this node's own were pushed here by finish
            trio.from_thread.run_sync(self._push, rp_id, sid, sealed, trio_token=token)

    def _catch_up_all(self) -> None:
        for rp_id in self._local_rps():
            try:
                self._catch_up_send.send_nowait((rp_id, None))
            except trio.WouldBlock:
                break


class RedisQuotas:
    """``Quotas`` as token buckets in Redis (one Lua script per take), so they hold across nodes."""

    def __init__(self, client: redis.Redis, *, prefix: str = "netid", link: _Redis | None = None) -> None:
        self.r = link or _Redis(client, prefix)

    async def take(self, rp_id: str, bucket: str, per_minute: int, now: float) -> None:
        if per_minute <= 0:
            return
        wait = await self.r.script("take", [self.r.bucket(rp_id, bucket)], [per_minute, repr(now)])
        if wait:
            raise RateLimited(retry_after_ms=int(wait))


def open_shared_state(state_url: str, store_url: str, *, cpu: LayerCpu | None = None) -> tuple[RedisSessionState, RedisQuotas]:
    """The state and quotas on Redis at ``state_url`` and the PostgreSQL store at ``store_url``;
    the CPU of their worker threads counted in ``cpu``."""
    url, prefix = parse_state_url(state_url)
    client = connect(url)
    link = _Redis(client, prefix, cpu=cpu)  # one pool of worker threads and connections for both
    durable = DurableState(store_url, max_connections=DURABLE_THREADS)
    return RedisSessionState(client, durable, link=link), RedisQuotas(client, link=link)
