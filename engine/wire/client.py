"""Async clients: a relying party's stream and a holder's phone.

    async with open_relying_party(host, port, rp_id=..., signing_key=..., box_key=...) as rp:
    # or open_relying_party(hosts=[(host_a, port_a), (host_b, port_b)], ...): fails over
        opened = await rp.open_session(level="basic")
        print(qr_text(opened.qr))                 # shown as a QR code
        result = await rp.wait_result(opened.session_id)   # signature checked, unsealed

    async with open_holder(host, port, device_key=...) as phone:
        qr = phone.scan(text)                     # engine signature and expiry checked
        result = await phone.verify(credential_id, qr, face=jpeg, voice=wav)

Replies are matched to requests by id, so many requests can be in flight on
one connection; pushed results arrive on :meth:`RelyingPartyClient.results`.
Errors from the engine are raised as the typed classes of :mod:`engine.errors`.
"""

from __future__ import annotations

import base64
import itertools
import logging
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import msgspec
import nacl.public
import nacl.signing
import nacl.utils
import trio

from engine.wire import protocol as P
from engine.crypto import sha256, unseal, verify_signature
from engine.errors import BadSignature, EngineError, InvalidMessage, SessionExpired, error_from_code
from engine.wire.framing import FrameReader, encode_frame

__all__ = [
    "Connection",
    "RelyingPartyClient",
    "HolderClient",
    "OpenedSession",
    "open_connection",
    "open_relying_party",
    "open_holder",
    "qr_text",
    "parse_qr_text",
    "open_result",
]

QR_PREFIX = "NETID1:"

log = logging.getLogger("engine.client")


def qr_text(signed: P.Signed) -> str:
    """The text a relying party encodes in its QR code."""
    return QR_PREFIX + base64.urlsafe_b64encode(P.encode(signed)).decode().rstrip("=")


def parse_qr_text(text: str) -> P.Signed:
    if not text.startswith(QR_PREFIX):
        raise InvalidMessage("not a netid QR payload")
    body = text[len(QR_PREFIX):]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except ValueError:
        raise InvalidMessage("QR payload is not base64url") from None
    return P.decode_signed_bytes(raw)


def open_result(sealed: bytes, private_key: nacl.public.PrivateKey, engine_key: bytes) -> P.ResultPayload:
    """Unseal a result and check the engine's signature on it."""
    signed = P.decode_signed_bytes(unseal(private_key, sealed))
    verify_signature(engine_key, signed.payload, signed.sig)
    return P.decode_signed(signed, P.ResultPayload)


class Connection:
    """One framed MessagePack stream to the engine, with request/reply matching."""

    def __init__(self, stream: trio.abc.Stream, hello: P.Hello, reader: FrameReader, *, push_buffer: int = 1024) -> None:
        self.stream = stream
        self.hello = hello
        self._reader = reader
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel] = {}
        self._send_lock = trio.Lock()
        self._push_send, self.pushes = trio.open_memory_channel(push_buffer)
        self.closed_error: BaseException | None = None
        self._closed = False
        self._last_send = 0.0
        #: pushed results that did not fit in ``pushes`` (fetch them with fetch_result)
        self.pushes_dropped = 0

    @property
    def engine_key(self) -> bytes:
        return self.hello.engine_key

    async def _read_loop(self) -> None:
        try:
            while True:
                body = await self._reader.read()
                if body is None:
                    break
                msg = P.decode_server_message(body)
                rid = getattr(msg, "id", None)
                if rid is not None and rid in self._waiting:
                    self._waiting.pop(rid).send_nowait(msg)
                elif isinstance(msg, P.ResultMsg):
                    try:
                        self._push_send.send_nowait(msg)
                    except trio.WouldBlock:
                        self.pushes_dropped += 1
                elif isinstance(msg, P.Error):  # connection-level error (broken frame)
                    self.closed_error = error_from_code(msg.code, msg.message)
        except (trio.BrokenResourceError, trio.ClosedResourceError, EngineError, msgspec.DecodeError) as exc:
            self.closed_error = self.closed_error or exc
        finally:
            self._closed = True
            for ch in self._waiting.values():
                ch.close()
            self._waiting.clear()
            self._push_send.close()

    async def send_raw(self, frame: bytes) -> None:
        async with self._send_lock:
            await self.stream.send_all(frame)
            self._last_send = trio.current_time()

    async def _keepalive(self, every: float) -> None:
        """Ping after ``every`` seconds without a request; the first time after at most 5 s,
        within the engine's 10 s for a connection's first frame."""
        self._last_send = trio.current_time()
        wait = min(every, 5.0)
        while not self._closed:
            await trio.sleep_until(self._last_send + wait)
            due = trio.current_time() >= self._last_send + wait
            wait = every
            if due and not self._closed:
                try:
                    await self.ping()
                except (EngineError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    return

    async def request(self, msg_type: type, **fields: Any) -> Any:
        """Send one request and wait for its reply; raise the typed error on an error reply."""
        if self._closed:
            raise trio.BrokenResourceError(f"connection closed: {self.closed_error!r}")
        rid = next(self._ids)
        send, recv = trio.open_memory_channel(1)
        self._waiting[rid] = send
        try:
            await self.send_raw(encode_frame(P.encode(msg_type(id=rid, **fields))))
            try:
                reply = await recv.receive()
            except trio.EndOfChannel:
                raise trio.BrokenResourceError(f"connection closed: {self.closed_error!r}") from None
        finally:
            self._waiting.pop(rid, None)
        if isinstance(reply, P.Error):
            raise error_from_code(reply.code, reply.message, reply.retry_after_ms)
        return reply

    async def ping(self) -> None:
        await self.request(P.Ping)

    async def aclose(self) -> None:
        await self.stream.aclose()


@asynccontextmanager
async def open_connection(
    host: str, port: int, *, ssl_context: ssl.SSLContext | None = None, keepalive: float | None = None
) -> AsyncIterator[Connection]:
    """Connect (TLS when ``ssl_context`` is given), read the engine's hello, run the reply router.

    ``keepalive``: send a ``ping`` after this many seconds without a request, so that the
    engine's idle timeout does not close a stream that only waits for pushed results."""
    if ssl_context is not None:
        stream: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=ssl_context)
    else:
        stream = await trio.open_tcp_stream(host, port)
    reader = FrameReader(stream, max_frame=P.MAX_FRAME_BYTES)
    try:
        body = await reader.read()
        if body is None:
            raise trio.BrokenResourceError("engine closed the connection before hello")
        hello = P.decode_server_message(body)
        if isinstance(hello, P.Error):  # refused at the door (too_many_connections)
            raise error_from_code(hello.code, hello.message, hello.retry_after_ms)
        if not isinstance(hello, P.Hello):
            raise InvalidMessage("expected hello")
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    conn = Connection(stream, hello, reader)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn._read_loop)
            if keepalive:
                nursery.start_soon(conn._keepalive, keepalive)
            try:
                yield conn
            finally:
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)
    except BaseExceptionGroup as group:
        # the reader task never fails, so the group holds the caller's own exception: unwrap it
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


# ---- relying party --------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpenedSession:
    session_id: str
    qr: P.Signed
    payload: P.QrPayload
    expires_at: float

    @property
    def qr_text(self) -> str:
        return qr_text(self.qr)


class RelyingPartyClient:
    """A relying party's authenticated stream: sessions, results pushed and fetched.

    Given several addresses (:func:`open_relying_party`), the client keeps one stream open
    to the first node that answers; when that stream drops it connects to the next node and
    authenticates again, and the engine sends it there what it missed meanwhile. ``results()``
    goes on across the switch; a request caught by the drop is sent again on the new stream
    (``open_session`` may then leave an unused session behind, which expires)."""

    def __init__(self, conn: Connection | None, *, rp_id: str, box_key: nacl.public.PrivateKey, engine_key: bytes) -> None:
        self.conn = conn
        self.rp_id = rp_id
        self._box_key = box_key
        self.engine_key = engine_key
        #: the node the stream is connected to (several addresses only)
        self.address: tuple[str, int] | None = None
        #: streams opened so far: 1, plus one per fail-over (several addresses only)
        self.connections = 0
        self._pushes: trio.MemoryReceiveChannel | None = None  # across fail-overs; else the stream's own
        self._switched = trio.Event()  # set (and replaced) each time ``conn`` changes
        self._closed = False  # the ``open_relying_party`` block has ended (several addresses)

    async def _request(self, msg_type: type, **fields: Any) -> Any:
        while True:
            if self._closed:
                raise trio.ClosedResourceError("the relying party client is closed")
            conn = self.conn
            assert conn is not None
            try:
                return await conn.request(msg_type, **fields)
            except (trio.BrokenResourceError, trio.ClosedResourceError):  # closed: by the drop, while sending
                if self._pushes is None:  # one address: no fail-over
                    raise
                while self.conn is conn and not self._closed:  # the stream dropped: wait for the next node's
                    await self._switched.wait()

    def _close(self) -> None:
        """No more fail-overs: a request waiting for the next stream, or made after, raises."""
        self._closed = True
        self._switched.set()

    async def open_session(self, *, level: str = "basic", purpose: str = "") -> OpenedSession:
        reply: P.SessionOpened = await self._request(P.OpenSession, level=level, purpose=purpose)
        verify_signature(self.engine_key, reply.qr.payload, reply.qr.sig)
        payload = P.decode_signed(reply.qr, P.QrPayload)
        return OpenedSession(reply.session_id, reply.qr, payload, reply.expires_at)

    def open(self, sealed: bytes) -> P.ResultPayload:
        result = open_result(sealed, self._box_key, self.engine_key)
        if result.rp_id != self.rp_id:
            raise BadSignature("result addressed to another relying party")
        return result

    async def results(self) -> AsyncIterator[P.ResultPayload]:
        """Pushed results, unsealed and signature-checked, as they arrive. Delivery is at least
        once: after a fail-over a result can come twice; key them by session id."""
        async for msg in self._pushes if self._pushes is not None else self.conn.pushes:  # type: ignore[union-attr]
            yield self.open(msg.sealed)

    async def fetch_result(self, session_id: str) -> P.ResultPayload:
        reply: P.ResultMsg = await self._request(P.FetchResult, session_id=session_id)
        return self.open(reply.sealed)

    async def _stay_connected(self, addresses: list[tuple[str, int]], connect: Any, retry_wait: float,
                              *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Hold a stream to one of ``addresses``, in order, moving on to the next when it drops.
        Until the first stream is up, a whole round of failures raises the last error; after,
        it keeps trying (waiting ``retry_wait`` after each round), and requests wait for it."""
        push_send, self._pushes = trio.open_memory_channel[P.ResultMsg](1024)
        started, failed, i = False, 0, 0
        while True:
            host, port = addresses[i % len(addresses)]
            try:
                async with connect(host, port) as conn:
                    self.conn, self.address, self.engine_key = conn, (host, port), conn.engine_key
                    self.connections += 1
                    switched, self._switched = self._switched, trio.Event()
                    switched.set()
                    failed = 0
                    if not started:
                        started = True
                        task_status.started()
                    async for msg in conn.pushes:  # until the stream drops
                        try:
                            push_send.send_nowait(msg)
                        except trio.WouldBlock:
                            conn.pushes_dropped += 1
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, EngineError) as exc:
                if not started and failed + 1 >= len(addresses):
                    raise
                log.info("relying party stream to %s:%d: %s; trying the next node", host, port, type(exc).__name__)
            failed += 1
            i += 1
            if failed % len(addresses) == 0:
                await trio.sleep(retry_wait)


def _addresses(host: str | None, port: int | None, hosts: Sequence[tuple[str, int]] | str | None) -> list[tuple[str, int]]:
    """``hosts`` (pairs, or ``"HOST:PORT,HOST:PORT"``), else ``host`` and ``port``."""
    if hosts is None:
        if host is None or port is None:
            raise ValueError("give host and port, or hosts")
        return [(host, int(port))]
    if isinstance(hosts, str):
        pairs = []
        for item in hosts.split(","):
            name, sep, number = item.strip().rpartition(":")
            if not sep or not name or not number.isdigit():
                raise ValueError("hosts reads HOST:PORT[,HOST:PORT...]")
            pairs.append((name.strip("[]"), int(number)))
        hosts = pairs
    found = [(str(h), int(p)) for h, p in hosts]
    if not found:
        raise ValueError("hosts is empty")
    return found


@asynccontextmanager
async def _authenticated(host: str, port: int, *, rp_id: str, signing_key: nacl.signing.SigningKey, engine_key: bytes | None,
                         ssl_context: ssl.SSLContext | None, keepalive: float | None) -> AsyncIterator[Connection]:
    async with open_connection(host, port, ssl_context=ssl_context, keepalive=keepalive) as conn:
        if engine_key is not None and engine_key != conn.engine_key:
            raise BadSignature("engine key does not match the pinned key")
        sig = signing_key.sign(P.auth_message(conn.hello.nonce, rp_id)).signature
        await conn.request(P.Auth, rp_id=rp_id, sig=sig)
        yield conn


@asynccontextmanager
async def open_relying_party(
    host: str | None = None,
    port: int | None = None,
    *,
    rp_id: str,
    signing_key: nacl.signing.SigningKey,
    box_key: nacl.public.PrivateKey,
    engine_key: bytes | None = None,
    ssl_context: ssl.SSLContext | None = None,
    keepalive: float | None = 60.0,
    hosts: Sequence[tuple[str, int]] | str | None = None,
    retry_wait: float = 0.5,
) -> AsyncIterator[RelyingPartyClient]:
    """Connect and authenticate; ``engine_key`` pins the engine's published key if given.
    The stream pings every ``keepalive`` seconds without a request (None: never).

    ``hosts`` (``[(host, port), ...]`` or ``"host:port,host:port"``) names several nodes of
    one deployment: they are tried in order, and when the stream drops the client fails over
    to the next and authenticates again (see :class:`RelyingPartyClient`); after the first
    stream the engine key is pinned to that node's. With ``host`` and ``port`` alone, a
    dropped stream stays dropped, as before."""
    addresses = _addresses(host, port, hosts)
    if hosts is None:
        async with _authenticated(host, port, rp_id=rp_id, signing_key=signing_key, engine_key=engine_key,  # type: ignore[arg-type]
                                  ssl_context=ssl_context, keepalive=keepalive) as conn:
            yield RelyingPartyClient(conn, rp_id=rp_id, box_key=box_key, engine_key=conn.engine_key)
        return
    client = RelyingPartyClient(None, rp_id=rp_id, box_key=box_key, engine_key=engine_key or b"")

    def connect(h: str, p: int) -> Any:  # every node after the first must hold the same engine key
        return _authenticated(h, p, rp_id=rp_id, signing_key=signing_key, engine_key=engine_key or (client.engine_key or None),
                              ssl_context=ssl_context, keepalive=keepalive)

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client._stay_connected, addresses, connect, retry_wait)
            try:
                yield client
            finally:
                client._close()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # the caller's own exception, or the first connection's
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


# ---- holder ---------------------------------------------------------------------------------------
class HolderClient:
    """A resident's phone: a device key, and the requests it signs with it."""

    def __init__(self, conn: Connection, device_key: nacl.signing.SigningKey, *, engine_key: bytes) -> None:
        self.conn = conn
        self.device_key = device_key
        self.engine_key = engine_key

    @property
    def public_key(self) -> bytes:
        return bytes(self.device_key.verify_key)

    def _sign(self, message: bytes) -> bytes:
        return self.device_key.sign(message).signature

    def scan(self, qr: str | P.Signed, *, now: float | None = None) -> P.QrPayload:
        """Check a scanned QR payload: the engine's signature and the expiry."""
        signed = parse_qr_text(qr) if isinstance(qr, str) else qr
        verify_signature(self.engine_key, signed.payload, signed.sig)
        payload = P.decode_signed(signed, P.QrPayload)
        if (now if now is not None else time.time()) >= payload.expires_at:
            raise SessionExpired("the QR code has expired")
        return payload

    async def enroll(self, card_number: str, faces: list[bytes], voices: list[bytes], *, audio_format: str = "auto") -> P.Enrolled:
        tbs = P.enroll_message(card_number, self.public_key, [sha256(f) for f in faces], [sha256(v) for v in voices])
        return await self.conn.request(
            P.Enroll, card_number=card_number, device_key=self.public_key, faces=faces, voices=voices, audio_format=audio_format, sig=self._sign(tbs)
        )

    async def verify(self, credential_id: str, qr: P.QrPayload, *, face: bytes, voice: bytes, audio_format: str = "auto") -> P.ResultPayload:
        tbs = P.verify_message(qr.session_id, qr.nonce, credential_id, sha256(face), sha256(voice))
        reply: P.Verified = await self.conn.request(
            P.Verify,
            session_id=qr.session_id,
            credential_id=credential_id,
            nonce=qr.nonce,
            device_key=self.public_key,
            face=face,
            voice=voice,
            audio_format=audio_format,
            sig=self._sign(tbs),
        )
        return open_result(reply.sealed, self.device_key.to_curve25519_private_key(), self.engine_key)

    async def rebind(self, credential_id: str, *, face: bytes, voice: bytes, audio_format: str = "auto") -> P.Rebound:
        """Bind ``credential_id`` to this phone's key (the new phone calls this)."""
        tbs = P.rebind_message(credential_id, self.public_key, sha256(face), sha256(voice))
        return await self.conn.request(
            P.Rebind, credential_id=credential_id, new_device_key=self.public_key, face=face, voice=voice, audio_format=audio_format, sig=self._sign(tbs)
        )

    async def report_lost(self, credential_id: str, *, face: bytes, voice: bytes, audio_format: str = "auto") -> P.ReportedLost:
        tbs = P.report_lost_message(credential_id, sha256(face), sha256(voice))
        return await self.conn.request(
            P.ReportLost, credential_id=credential_id, device_key=self.public_key, face=face, voice=voice, audio_format=audio_format, sig=self._sign(tbs)
        )

    async def status(self, credential_id: str) -> P.StatusReply:
        nonce = nacl.utils.random(16)
        return await self.conn.request(
            P.Status, credential_id=credential_id, device_key=self.public_key, nonce=nonce, sig=self._sign(P.status_message(credential_id, nonce))
        )


@asynccontextmanager
async def open_holder(
    host: str,
    port: int,
    *,
    device_key: nacl.signing.SigningKey,
    engine_key: bytes | None = None,
    ssl_context: ssl.SSLContext | None = None,
    keepalive: float | None = 30.0,
) -> AsyncIterator[HolderClient]:
    """A phone's connection; it pings every ``keepalive`` seconds without a request (None:
    never), so that a connection kept open between verifications outlives the engine's idle
    timeout for unauthenticated connections (60 s by default)."""
    async with open_connection(host, port, ssl_context=ssl_context, keepalive=keepalive) as conn:
        if engine_key is not None and engine_key != conn.engine_key:
            raise BadSignature("engine key does not match the pinned key")
        yield HolderClient(conn, device_key, engine_key=conn.engine_key)
