"""Frames for ``netid bench fuzz``: valid-looking requests, their mutations, and raw damage.

A seeded ``random.Random`` drives everything, so a run is repeated by its seed. Bodies are
built with a small MessagePack writer of our own, because the damage the engine must
survive includes encodings no library writes: strings that are not UTF-8, nesting
thousands deep, maps whose length lies.

Each body comes with its kind (``valid:verify``, ``mutated:id``, ``raw:utf8``, ...), which
the harness counts.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from typing import Any

import msgspec
import nacl.signing

from engine.wire import protocol as P

__all__ = ["Raw", "enc", "FrameMaker"]


@dataclass(frozen=True)
class Raw:
    """Bytes placed in the encoding as they are."""

    data: bytes


def _str_header(n: int) -> bytes:
    if n < 32:
        return bytes([0xA0 | n])
    if n < 256:
        return b"\xd9" + bytes([n])
    return b"\xda" + struct.pack(">H", n)


def _container(n: int, fix: int, b16: int) -> bytes:
    return bytes([fix | n]) if n < 16 else bytes([b16]) + struct.pack(">H", n)


def enc(x: Any) -> bytes:
    """MessagePack of ``x`` (dicts keep their order; :class:`Raw` pieces go in verbatim)."""
    if isinstance(x, Raw):
        return x.data
    if isinstance(x, dict):
        return _container(len(x), 0x80, 0xDE) + b"".join(enc(k) + enc(v) for k, v in x.items())
    if isinstance(x, list):
        return _container(len(x), 0x90, 0xDC) + b"".join(enc(v) for v in x)
    return msgspec.msgpack.encode(x)


def bad_utf8(rng: random.Random) -> Raw:
    junk = bytes(rng.choice([0xFF, 0xFE, 0xC0, 0x80, 0xED, 0xF8]) for _ in range(rng.randint(1, 6)))
    text = b"ok" + junk if rng.random() < 0.5 else junk
    return Raw(_str_header(len(text)) + text)


def deep(rng: random.Random, depth: int) -> Raw:
    unit = rng.choice([b"\x91", b"\x81\xa1k", b"\xdc\x00\x01"])
    return Raw(unit * depth + b"\x01")


_ODD_INTS = (0, 1, -1, 2**31, 2**32, 2**53, 2**53 + 1, 2**63 - 1, 2**64 - 1, -(2**63))


def odd_value(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.randrange(14)
    if pick == 0:
        return None
    if pick == 1:
        return rng.random() < 0.5
    if pick == 2:
        return rng.choice(_ODD_INTS)
    if pick == 3:
        return rng.choice([0.0, -0.0, 1e308, float("inf"), float("nan"), 3.5])
    if pick == 4:
        return rng.randbytes(rng.choice([0, 1, 16, 31, 32, 33, 64, 65, 300]))
    if pick == 5:
        return "".join(rng.choice("aZ09-_.:é€\u202e \x00") for _ in range(rng.choice([0, 1, 5, 64, 65, 200])))
    if pick == 6:
        return bad_utf8(rng)
    if pick == 7:
        return Raw(msgspec.msgpack.encode(msgspec.msgpack.Ext(rng.randint(-128, 127), rng.randbytes(rng.randint(0, 9)))))
    if pick == 8 and depth < 3:
        return [odd_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if pick == 9 and depth < 3:
        return {rng.choice(["a", "type", "id", "x", ""]): odd_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    if pick == 10:
        return deep(rng, rng.choice([10, 200, 1200, 3000]))
    if pick == 11:
        return rng.choice(sorted(P.REQUEST_TYPES))
    if pick == 12:
        return rng.randint(-(2**20), 2**20)
    return "x" * rng.randint(0, 20)


class FrameMaker:
    """Bodies of frames for one connection (it knows that connection's ``hello`` nonce)."""

    def __init__(self, rng: random.Random, *, rp_id: str | None = None, rp_key: nacl.signing.SigningKey | None = None) -> None:
        self.rng = rng
        self.rp_id = rp_id
        self.rp_key = rp_key
        self.device = nacl.signing.SigningKey(rng.randbytes(32))
        self.nonce = b"\x00" * 32
        self._ids = 0

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    # ---- valid-looking requests ------------------------------------------------------------------------
    def valid(self) -> tuple[str, dict[str, Any]]:
        r, rid = self.rng, self.next_id()
        kind = r.choice(["ping", "ping", "auth", "open_session", "fetch_result", "status", "verify", "enroll", "rebind", "report_lost", "upgrade"])
        dk = bytes(self.device.verify_key)
        sample = lambda: r.randbytes(r.randint(1, 300))  # noqa: E731
        if kind == "ping":
            return kind, {"type": "ping", "id": rid}
        if kind == "auth":
            rp_id = self.rp_id if self.rp_id and r.random() < 0.5 else r.choice(["hotel", "nobody", "x" * 64])
            key = self.rp_key if self.rp_key is not None and rp_id == self.rp_id and r.random() < 0.8 else self.device
            return kind, {"type": "auth", "id": rid, "rp_id": rp_id, "sig": key.sign(P.auth_message(self.nonce, rp_id)).signature}
        if kind == "open_session":
            return kind, {"type": "open_session", "id": rid, "level": r.choice(["basic", "high"]), "purpose": "fuzz"}
        if kind == "fetch_result":
            return kind, {"type": "fetch_result", "id": rid, "session_id": r.choice(["s", "abc-" + r.randbytes(4).hex()])}
        if kind == "status":
            nonce, cid = r.randbytes(16), "c" + r.randbytes(6).hex()
            return kind, {"type": "status", "id": rid, "credential_id": cid, "device_key": dk, "nonce": nonce,
                          "sig": self.device.sign(P.status_message(cid, nonce)).signature}
        if kind == "verify":
            f, v, sid, cid, nonce = sample(), sample(), "s" + r.randbytes(6).hex(), "c" + r.randbytes(6).hex(), r.randbytes(16)
            from engine.crypto import sha256

            return kind, {"type": "verify", "id": rid, "session_id": sid, "credential_id": cid, "nonce": nonce, "device_key": dk,
                          "face": f, "voice": v, "sig": self.device.sign(P.verify_message(sid, nonce, cid, sha256(f), sha256(v))).signature}
        if kind == "enroll":
            from engine.crypto import sha256

            faces, voices = [sample()], [sample() for _ in range(3)]
            card = "CARD-" + r.randbytes(3).hex()
            tbs = P.enroll_message(card, dk, [sha256(x) for x in faces], [sha256(x) for x in voices])
            return kind, {"type": "enroll", "id": rid, "card_number": card, "device_key": dk, "faces": faces, "voices": voices,
                          "sig": self.device.sign(tbs).signature}
        if kind in ("rebind", "report_lost"):
            from engine.crypto import sha256

            f, v, cid = sample(), sample(), "c" + r.randbytes(6).hex()
            if kind == "rebind":
                tbs = P.rebind_message(cid, dk, sha256(f), sha256(v))
                return kind, {"type": kind, "id": rid, "credential_id": cid, "new_device_key": dk, "face": f, "voice": v, "sig": self.device.sign(tbs).signature}
            tbs = P.report_lost_message(cid, sha256(f), sha256(v))
            return kind, {"type": kind, "id": rid, "credential_id": cid, "device_key": dk, "face": f, "voice": v, "sig": self.device.sign(tbs).signature}
        payload = enc({"v": 1, "ap_id": r.choice(["counter-1", bad_utf8(r)]), "credential_id": "c1", "card_number": "C1",
                       "level": "high", "checked_at": 1.0, "nonce": r.randbytes(16)})
        return "upgrade", {"type": "upgrade", "id": rid, "attestation": {"payload": payload if r.random() < 0.7 else r.randbytes(40), "sig": r.randbytes(64)}}

    # ---- one body ---------------------------------------------------------------------------------------
    def body(self) -> tuple[str, bytes]:
        r = self.rng
        roll = r.random()
        if roll < 0.30:
            kind, msg = self.valid()
            return f"valid:{kind}", enc(msg)
        if roll < 0.75:
            return self.mutated()
        return self.damaged()

    def mutated(self) -> tuple[str, bytes]:
        r = self.rng
        kind, msg = self.valid()
        how = r.choice(["drop", "retype", "extra", "id", "type", "order"])
        keys = [k for k in msg if k != "type"]
        if how == "drop" and keys:
            msg.pop(r.choice(keys))
        elif how == "retype" and keys:
            msg[r.choice(keys)] = odd_value(r)
        elif how == "extra":
            for _ in range(r.randint(1, 4)):
                msg[r.choice(["zz", "x" * r.randint(1, 40), "\u00e9", "id2", "extra"])] = odd_value(r)
        elif how == "id":
            msg["id"] = r.choice([*_ODD_INTS, 1.5, "7", None, b"\x01", [1], {"a": 1}])
        elif how == "type":
            msg["type"] = r.choice(["", "PING", "warp", "x" * 300, bad_utf8(r), 7, None, b"ping", ["ping"]])
        else:
            items = list(msg.items())
            r.shuffle(items)
            msg = dict(items)
        return f"mutated:{how}", enc(msg)

    def damaged(self) -> tuple[str, bytes]:
        r = self.rng
        _, msg = self.valid()
        good = enc(msg)
        how = r.choice(["utf8", "deep", "array", "scalar", "truncated", "trailing", "random", "flip", "lying_length", "empty_map"])
        if how == "utf8":
            msg[r.choice(list(msg))] = bad_utf8(r)
            return "raw:utf8", enc(msg)
        if how == "deep":
            msg["x"] = deep(r, r.choice([500, 1000, 2000, 5000, 20000]))
            return "raw:deep", enc(msg)
        if how == "array":
            return "raw:array", enc(r.choice([[1, 2], list(msg.values()), [msg]]))
        if how == "scalar":
            return "raw:scalar", enc(odd_value(r))
        if how == "truncated":
            return "raw:truncated", good[: r.randint(1, max(1, len(good) - 1))]
        if how == "trailing":
            return "raw:trailing", good + r.randbytes(r.randint(1, 8))
        if how == "random":
            return "raw:random", r.randbytes(r.randint(1, 200))
        if how == "flip":
            b = bytearray(good)
            for _ in range(r.randint(1, 4)):
                b[r.randrange(len(b))] ^= 1 << r.randrange(8)
            return "raw:flip", bytes(b)
        if how == "lying_length":
            return "raw:lying_length", b"\xdf\xff\xff\xff\xff" + good[1:]
        return "raw:empty_map", b"\x80"
