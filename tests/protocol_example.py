"""The worked example of PROTOCOL.md, computed with the engine's own encoders and PyNaCl.

Every input is fixed (keys from constant seeds, nonces, ids, times), so every byte is
reproducible; ``python -m tests.protocol_example`` prints the example blocks as they appear in
PROTOCOL.md, and tests/test_protocol_doc.py checks the document against this, byte for byte.
"""

from __future__ import annotations

import nacl.encoding
import nacl.hash
import nacl.public
import nacl.signing

from engine.wire import protocol as P
from engine.wire.client import qr_text
from engine.crypto import pseudonym, sha256
from engine.wire.framing import encode_frame

ENGINE_SIGN_SEED = bytes([0x01]) * 32
ENGINE_BOX_SECRET = bytes([0x02]) * 32
RP_SIGN_SEED = bytes([0x03]) * 32
RP_BOX_SECRET = bytes([0x04]) * 32
PSEUDONYM_SECRET = bytes([0x05]) * 32
SEAL_EPHEMERAL_SECRET = bytes([0x06]) * 32  # crypto_box_seal draws this at random; fixed here
HELLO_NONCE = bytes(range(32))
QR_NONCE = bytes(range(0x10, 0x20))
SESSION_ID = "k3JYbq2Xo1Jb8cWr0zM4pA3x"


def seal_with(ephemeral_secret: bytes, recipient_public: bytes, message: bytes) -> bytes:
    """crypto_box_seal with a given ephemeral key: epk || crypto_box(m, blake2b-24(epk || pk))."""
    esk = nacl.public.PrivateKey(ephemeral_secret)
    epk = bytes(esk.public_key)
    nonce = nacl.hash.blake2b(epk + recipient_public, digest_size=24, encoder=nacl.encoding.RawEncoder)
    box = nacl.public.Box(esk, nacl.public.PublicKey(recipient_public))
    return epk + box.encrypt(message, nonce).ciphertext


def example() -> dict[str, bytes | str]:
    engine_sign = nacl.signing.SigningKey(ENGINE_SIGN_SEED)
    engine_box = nacl.public.PrivateKey(ENGINE_BOX_SECRET)
    rp_sign = nacl.signing.SigningKey(RP_SIGN_SEED)
    rp_box = nacl.public.PrivateKey(RP_BOX_SECRET)
    out: dict[str, bytes | str] = {}
    out["engine_key"] = bytes(engine_sign.verify_key)
    out["engine_box_key"] = bytes(engine_box.public_key)
    out["rp_sign_public"] = bytes(rp_sign.verify_key)
    out["rp_box_public"] = bytes(rp_box.public_key)
    hello = P.Hello(version=1, nonce=HELLO_NONCE, engine_key=out["engine_key"], engine_box_key=out["engine_box_key"], max_frame=8388608, max_in_flight=64)
    out["hello_frame"] = encode_frame(P.encode(hello))
    out["auth_tbs"] = P.auth_message(HELLO_NONCE, "hotel")
    out["auth_sig"] = rp_sign.sign(out["auth_tbs"]).signature
    out["auth_frame"] = encode_frame(P.encode(P.Auth(id=1, rp_id="hotel", sig=out["auth_sig"])))
    out["authenticated_frame"] = encode_frame(P.encode(P.Authenticated(id=1, rp_id="hotel", display_name="Hotel Example", max_level="basic")))
    out["open_session_frame"] = encode_frame(P.encode(P.OpenSession(id=2, level="basic", purpose="check-in")))
    qr = P.QrPayload(session_id=SESSION_ID, rp_name="Hotel Example", nonce=QR_NONCE, expires_at=1795766460.0, challenge="409172", level="basic", purpose="check-in")
    out["qr_payload"] = P.encode(qr)
    out["qr_sig"] = engine_sign.sign(out["qr_payload"]).signature
    signed_qr = P.Signed(payload=out["qr_payload"], sig=out["qr_sig"])
    out["session_opened_frame"] = encode_frame(P.encode(P.SessionOpened(id=2, session_id=SESSION_ID, qr=signed_qr, expires_at=1795766460.0)))
    out["qr_text"] = qr_text(signed_qr)
    face, voice = b"<jpeg bytes>", b"<wav bytes>"
    out["verify_tbs"] = P.verify_message(SESSION_ID, QR_NONCE, "x9credential", sha256(face), sha256(voice))
    result = P.ResultPayload(
        session_id=SESSION_ID, rp_id="hotel", outcome="pass", reason="match", level="basic", time=1795766412.5,
        pseudonym=pseudonym(PSEUDONYM_SECRET, "C1", "hotel"),
    )
    out["result_payload"] = P.encode(result)
    out["result_sig"] = engine_sign.sign(out["result_payload"]).signature
    out["result_envelope"] = P.encode(P.Signed(payload=out["result_payload"], sig=out["result_sig"]))
    out["sealed"] = seal_with(SEAL_EPHEMERAL_SECRET, out["rp_box_public"], out["result_envelope"])
    out["result_frame"] = encode_frame(P.encode(P.ResultMsg(session_id=SESSION_ID, sealed=out["sealed"])))
    return out


def render() -> str:
    """The example as PROTOCOL.md carries it: one ``name: hex`` line each (text as is)."""
    lines = []
    for name, value in example().items():
        lines.append(f"{name}: {value.hex() if isinstance(value, bytes) else value}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render())
