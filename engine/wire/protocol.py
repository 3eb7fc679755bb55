"""Wire messages: typed, size-limited MessagePack structs.

Every frame body is one MessagePack map with a ``type`` field. Requests carry
a client-chosen ``id`` that the reply echoes; replies may come back out of
order. Signed payloads (QR codes, results, attestations) travel as
``Signed`` envelopes: the MessagePack bytes of the payload plus an Ed25519
signature over exactly those bytes, so any MessagePack library can check them.
PROTOCOL.md is the reference for everything here.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec
from msgspec import Meta

from engine.errors import InvalidMessage, UnknownMessage

PROTOCOL_VERSION = 1

# ---- limits -------------------------------------------------------------------------------
MAX_IMAGE_BYTES = 2 * 1024 * 1024
MAX_AUDIO_BYTES = 2 * 1024 * 1024
MAX_FRAME_BYTES = 8 * 1024 * 1024

RequestId = Annotated[int, Meta(ge=0, le=2**53)]
Key32 = Annotated[bytes, Meta(min_length=32, max_length=32)]
Sig64 = Annotated[bytes, Meta(min_length=64, max_length=64)]
Nonce = Annotated[bytes, Meta(min_length=16, max_length=32)]
Id = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
CardNumber = Annotated[str, Meta(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9-]+$")]
Image = Annotated[bytes, Meta(min_length=1, max_length=MAX_IMAGE_BYTES)]
Audio = Annotated[bytes, Meta(min_length=1, max_length=MAX_AUDIO_BYTES)]
Level = Literal["basic", "high"]
AudioFormat = Literal["auto", "pcm_s16le"]
Purpose = Annotated[str, Meta(max_length=64)]
Blob = Annotated[bytes, Meta(max_length=4096)]

LEVELS = ("basic", "high")


def level_rank(level: str) -> int:
    return LEVELS.index(level)


class Signed(msgspec.Struct, frozen=True):
    """An Ed25519-signed payload: ``sig`` covers exactly the bytes of ``payload``."""

    payload: Blob
    sig: Sig64


# ---- signed payloads --------------------------------------------------------------------------
class QrPayload(msgspec.Struct, frozen=True, kw_only=True):
    """What the relying party shows as a QR code, signed by the engine."""

    v: int = PROTOCOL_VERSION
    session_id: Id
    rp_name: Annotated[str, Meta(max_length=128)]
    nonce: Nonce
    expires_at: float
    challenge: Annotated[str, Meta(max_length=200)]
    level: Level
    purpose: Purpose = ""


class ResultPayload(msgspec.Struct, frozen=True, kw_only=True):
    """A verification result, signed by the engine; the only thing a relying party learns."""

    v: int = PROTOCOL_VERSION
    session_id: Id
    rp_id: Id
    outcome: Literal["pass", "fail"]
    reason: str
    level: Level
    time: float
    pseudonym: str


class Attestation(msgspec.Struct, frozen=True, kw_only=True):
    """An acceptance point's statement of an in-person check, signed with its key."""

    v: int = PROTOCOL_VERSION
    ap_id: Id
    credential_id: Id
    card_number: CardNumber
    level: Level
    checked_at: float
    nonce: Nonce


# ---- requests ---------------------------------------------------------------------------------
class _Req(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", forbid_unknown_fields=False):
    id: RequestId


class Auth(_Req, kw_only=True, tag="auth"):
    """Relying-party handshake: sign ``auth_message(hello.nonce, rp_id)``."""

    rp_id: Id
    sig: Sig64


class OpenSession(_Req, kw_only=True, tag="open_session"):
    level: Level = "basic"
    purpose: Purpose = ""


class FetchResult(_Req, kw_only=True, tag="fetch_result"):
    session_id: Id


class Enroll(_Req, kw_only=True, tag="enroll"):
    card_number: CardNumber
    device_key: Key32
    faces: Annotated[list[Image], Meta(min_length=1, max_length=3)]
    voices: Annotated[list[Audio], Meta(min_length=3, max_length=5)]
    audio_format: AudioFormat = "auto"
    sig: Sig64


class Verify(_Req, kw_only=True, tag="verify"):
    session_id: Id
    credential_id: Id
    nonce: Nonce
    device_key: Key32
    face: Image
    voice: Audio
    audio_format: AudioFormat = "auto"
    sig: Sig64


class Rebind(_Req, kw_only=True, tag="rebind"):
    credential_id: Id
    new_device_key: Key32
    face: Image
    voice: Audio
    audio_format: AudioFormat = "auto"
    sig: Sig64


class ReportLost(_Req, kw_only=True, tag="report_lost"):
    credential_id: Id
    device_key: Key32
    face: Image
    voice: Audio
    audio_format: AudioFormat = "auto"
    sig: Sig64


class Upgrade(_Req, kw_only=True, tag="upgrade"):
    attestation: Signed


class Status(_Req, kw_only=True, tag="status"):
    credential_id: Id
    device_key: Key32
    nonce: Nonce
    sig: Sig64


class Ping(_Req, kw_only=True, tag="ping"):
    pass


Request = Union[Auth, OpenSession, FetchResult, Enroll, Verify, Rebind, ReportLost, Upgrade, Status, Ping]
REQUEST_TYPES = frozenset(t.__struct_config__.tag for t in Request.__args__)  # type: ignore[attr-defined]


# ---- replies and pushes ---------------------------------------------------------------------
class _Msg(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", omit_defaults=True):
    pass


class Hello(_Msg, kw_only=True, tag="hello"):
    version: int  # no default: ``omit_defaults`` would leave it off the wire
    nonce: bytes
    engine_key: bytes
    engine_box_key: bytes
    max_frame: int
    max_in_flight: int


class Error(_Msg, kw_only=True, tag="error"):
    id: int | None = None
    code: str
    message: str
    retry_after_ms: int | None = None


class Authenticated(_Msg, kw_only=True, tag="authenticated"):
    id: int
    rp_id: str
    display_name: str
    max_level: str


class SessionOpened(_Msg, kw_only=True, tag="session_opened"):
    id: int
    session_id: str
    qr: Signed
    expires_at: float


class ResultMsg(_Msg, kw_only=True, tag="result"):
    """A sealed result: in a ``fetch_result`` reply (with ``id``) or pushed (``id`` is None)."""

    id: int | None = None
    session_id: str
    sealed: bytes


class Enrolled(_Msg, kw_only=True, tag="enrolled"):
    id: int
    credential_id: str
    version: int
    level: str


class Verified(_Msg, kw_only=True, tag="verified"):
    """The holder's reply: its own copy of the signed result, sealed to its device key."""

    id: int
    session_id: str
    sealed: bytes


class Rebound(_Msg, kw_only=True, tag="rebound"):
    id: int
    credential_id: str


class ReportedLost(_Msg, kw_only=True, tag="reported_lost"):
    id: int
    suspended: int


class Upgraded(_Msg, kw_only=True, tag="upgraded"):
    id: int
    credential_id: str
    level: str


class StatusReply(_Msg, kw_only=True, tag="status"):
    id: int
    credential_id: str
    status: str
    level: str


class Pong(_Msg, kw_only=True, tag="pong"):
    id: int


ServerMessage = Union[
    Hello, Error, Authenticated, SessionOpened, ResultMsg, Enrolled, Verified, Rebound,
    ReportedLost, Upgraded, StatusReply, Pong,
]


# ---- codec ------------------------------------------------------------------------------------
class _Peek(msgspec.Struct):
    type: str | None = None
    id: int | None = None


_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request)
_server_decoder = msgspec.msgpack.Decoder(ServerMessage)
class _PeekId(msgspec.Struct):
    id: int | None = None


_peek_decoder = msgspec.msgpack.Decoder(_Peek)
_peek_id_decoder = msgspec.msgpack.Decoder(_PeekId)  # when ``type`` itself is undecodable


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


#: What a failed decode of untrusted bytes can raise: msgspec's own errors, and from its C
#: decoder also invalid UTF-8 (``UnicodeDecodeError``), nesting past the interpreter's limit
#: (``RecursionError``) and, for absurd sizes, ``MemoryError``/``OverflowError``.
_UNDECODABLE = (msgspec.DecodeError, msgspec.ValidationError, ValueError, RecursionError, MemoryError, OverflowError, TypeError)


def _why(exc: BaseException) -> str:
    """A short, bounded description of a decode failure (never echoes the input)."""
    if isinstance(exc, (msgspec.DecodeError, msgspec.ValidationError)):
        return str(exc)[:200]
    if isinstance(exc, UnicodeDecodeError):
        return "a string is not valid UTF-8"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return f"undecodable ({type(exc).__name__})"


def _peek(body: bytes) -> _Peek | None:
    try:
        return _peek_decoder.decode(body)
    except _UNDECODABLE:
        return None


def _scan_id(body: bytes) -> int | None:
    """The top-level ``id`` of a map, read by hand up to the first value that is not a
    scalar: for bodies that no decoder gets through (nesting too deep, say)."""
    if not body:
        return None
    b, pos = body[0], 1
    if 0x80 <= b <= 0x8F:
        count = b & 0x0F
    elif b in (0xDE, 0xDF):
        width = 2 if b == 0xDE else 4
        count, pos = int.from_bytes(body[1 : 1 + width], "big"), 1 + width
    else:
        return None
    for _ in range(min(count, 64) * 2):
        if pos >= len(body):
            return None
        b = body[pos]
        if b == 0xA2 and body[pos + 1 : pos + 3] == b"id":
            v = body[pos + 3 : pos + 4]
            if v and v[0] <= 0x7F:
                return v[0]
            sizes = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
            if v and v[0] in sizes:
                return int.from_bytes(body[pos + 4 : pos + 4 + sizes[v[0]]], "big")
            return None
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
            pos += 1
        elif 0xA0 <= b <= 0xBF:
            pos += 1 + (b & 0x1F)
        elif b in (0xCC, 0xD0):
            pos += 2
        elif b in (0xCD, 0xD1):
            pos += 3
        elif b in (0xCE, 0xD2, 0xCA):
            pos += 5
        elif b in (0xCF, 0xD3, 0xCB):
            pos += 9
        elif b in (0xD9, 0xC4):
            pos += 2 + body[pos + 1] if pos + 1 < len(body) else len(body)
        elif b in (0xDA, 0xC5):
            pos += 3 + int.from_bytes(body[pos + 1 : pos + 3], "big")
        elif b in (0xDB, 0xC6):
            pos += 5 + int.from_bytes(body[pos + 1 : pos + 5], "big")
        else:
            return None  # an array, a map or an ext: stop here
    return None


def peek_id(body: bytes) -> int | None:
    """Best-effort request id of a body that failed to decode, to address the error reply."""
    peeked = _peek(body)
    if peeked is None:
        try:
            peeked = _peek_id_decoder.decode(body)
        except _UNDECODABLE:
            peeked = _PeekId(id=_scan_id(body))
    rid = peeked.id
    return rid if isinstance(rid, int) and 0 <= rid <= 2**53 else None


def decode_request(body: bytes) -> Request:
    """Decode one request; raise InvalidMessage / UnknownMessage with a useful message.

    Total over all byte strings: whatever the body holds, the result is a request or one of
    those two errors (tests/test_protocol.py checks it with Hypothesis)."""
    try:
        return _request_decoder.decode(body)
    except msgspec.ValidationError as exc:
        peeked = _peek(body)
        kind = peeked.type if peeked is not None else None
        if kind is not None and kind not in REQUEST_TYPES:
            raise UnknownMessage(f"unknown message type {kind[:40]!r}") from None
        raise InvalidMessage(_why(exc)) from None
    except msgspec.DecodeError as exc:
        raise InvalidMessage(f"not a MessagePack map: {_why(exc)}") from None
    except _UNDECODABLE as exc:
        raise InvalidMessage(_why(exc)) from None


def decode_server_message(body: bytes) -> ServerMessage:
    return _server_decoder.decode(body)


def decode_signed(signed: Signed, kind: type[msgspec.Struct]):
    """Decode the payload of a Signed envelope (after its signature was checked)."""
    try:
        return msgspec.msgpack.decode(signed.payload, type=kind)
    except _UNDECODABLE as exc:
        raise InvalidMessage(f"signed payload: {_why(exc)}") from None


def decode_signed_bytes(data: bytes) -> Signed:
    try:
        return msgspec.msgpack.decode(data, type=Signed)
    except _UNDECODABLE as exc:
        raise InvalidMessage(f"signed envelope: {_why(exc)}") from None


# ---- what gets signed -----------------------------------------------------------------------
# Domain-separated, length-prefixed concatenations, so no two requests can share a signature.
def _tbs(domain: bytes, *parts: bytes | str) -> bytes:
    out = bytearray(domain)
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        out += len(b).to_bytes(4, "big") + b
    return bytes(out)


def auth_message(nonce: bytes, rp_id: str) -> bytes:
    return _tbs(b"netid-auth-v1", nonce, rp_id)


def enroll_message(card_number: str, device_key: bytes, face_digests: list[bytes], voice_digests: list[bytes]) -> bytes:
    return _tbs(b"netid-enroll-v1", card_number, device_key, *face_digests, b"|", *voice_digests)


def verify_message(session_id: str, nonce: bytes, credential_id: str, face_digest: bytes, voice_digest: bytes) -> bytes:
    return _tbs(b"netid-verify-v1", session_id, nonce, credential_id, face_digest, voice_digest)


def rebind_message(credential_id: str, new_device_key: bytes, face_digest: bytes, voice_digest: bytes) -> bytes:
    return _tbs(b"netid-rebind-v1", credential_id, new_device_key, face_digest, voice_digest)


def report_lost_message(credential_id: str, face_digest: bytes, voice_digest: bytes) -> bytes:
    return _tbs(b"netid-lost-v1", credential_id, face_digest, voice_digest)


def status_message(credential_id: str, nonce: bytes) -> bytes:
    return _tbs(b"netid-status-v1", credential_id, nonce)
