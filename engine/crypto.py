"""Keys, signatures, sealed results, templates at rest and pairwise pseudonyms.

Everything goes through PyNaCl:

- the engine signs with an Ed25519 ``SigningKey`` and receives with an X25519
  ``PrivateKey`` (distinct key types for distinct jobs);
- results are sealed (``SealedBox``) to the relying party's X25519 key and to
  the holder's device key (its Ed25519 public key converted to X25519);
- templates are encrypted at rest with XChaCha20-Poly1305 (``nacl.secret.Aead``)
  under a key the operator holds, the template's owner bound as associated data;
- pseudonyms are keyed BLAKE2b of (card, relying party) under an engine secret.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.public
import nacl.secret
import nacl.signing
import nacl.utils

from .errors import BadSignature, ConfigError, InvalidMessage

__all__ = [
    "EngineKeys",
    "TemplateCipher",
    "verify_signature",
    "seal",
    "unseal",
    "device_box_key",
    "pseudonym",
    "sha256",
]

_SIGNING_FILE = "engine_signing.key"
_BOX_FILE = "engine_box.key"
_PSEUDONYM_FILE = "pseudonym.secret"


def _write_secret(path: Path, data: bytes) -> None:
    """Write a secret file with owner-only permissions, atomically."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read_or_create(path: Path, size: int) -> bytes:
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ConfigError(f"{path} must be readable by its owner only (mode {mode:o}); chmod 600 it")
        data = path.read_bytes()
        if len(data) != size:
            raise ConfigError(f"{path} is not a {size}-byte key")
        return data
    data = nacl.utils.random(size)
    _write_secret(path, data)
    return data


class EngineKeys:
    """The engine's long-lived secrets, created on first start in the data directory."""

    def __init__(
        self,
        signing_key: nacl.signing.SigningKey,
        box_key: nacl.public.PrivateKey,
        pseudonym_secret: bytes,
    ) -> None:
        self.signing_key = signing_key
        self.box_key = box_key
        self._pseudonym_secret = pseudonym_secret

    def __repr__(self) -> str:
        return f"EngineKeys(verify_key={self.verify_key.hex()[:16]}…)"

    @classmethod
    def load_or_create(cls, data_dir: Path) -> "EngineKeys":
        data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(data_dir, 0o700)
        sk = _read_or_create(data_dir / _SIGNING_FILE, 32)
        bk = _read_or_create(data_dir / _BOX_FILE, 32)
        ps = _read_or_create(data_dir / _PSEUDONYM_FILE, 32)
        return cls(nacl.signing.SigningKey(sk), nacl.public.PrivateKey(bk), ps)

    @property
    def verify_key(self) -> bytes:
        """The engine's published Ed25519 key (32 bytes)."""
        return bytes(self.signing_key.verify_key)

    @property
    def box_public_key(self) -> bytes:
        """The engine's published X25519 key (32 bytes)."""
        return bytes(self.box_key.public_key)

    def sign(self, message: bytes) -> bytes:
        """Detached Ed25519 signature (64 bytes)."""
        return self.signing_key.sign(message).signature

    def pseudonym(self, card_number: str, rp_id: str) -> str:
        return pseudonym(self._pseudonym_secret, card_number, rp_id)


def pseudonym(secret: bytes, card_number: str, rp_id: str) -> str:
    """Pairwise pseudonym: stable for one relying party, unlinkable across them."""
    msg = len(rp_id).to_bytes(2, "big") + rp_id.encode() + card_number.encode()
    return nacl.hash.blake2b(msg, key=secret, digest_size=20, encoder=nacl.encoding.Base32Encoder).decode().lower()


def sha256(data: bytes) -> bytes:
    return nacl.hash.sha256(data, encoder=nacl.encoding.RawEncoder)


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Raise :class:`BadSignature` unless ``signature`` is ``public_key``'s over ``message``."""
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, nacl.exceptions.TypeError, ValueError, TypeError):
        raise BadSignature() from None


def device_box_key(device_key: bytes) -> bytes:
    """X25519 public key derived from a holder's Ed25519 device key."""
    try:
        return bytes(nacl.signing.VerifyKey(device_key).to_curve25519_public_key())
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise InvalidMessage("device key is not a valid Ed25519 public key") from None


def seal(recipient_public_key: bytes, plaintext: bytes) -> bytes:
    """Anonymous sealed box to an X25519 public key."""
    try:
        box = nacl.public.SealedBox(nacl.public.PublicKey(recipient_public_key))
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise InvalidMessage("recipient key is not a valid X25519 public key") from None
    return box.encrypt(plaintext)


def unseal(private_key: nacl.public.PrivateKey, ciphertext: bytes) -> bytes:
    try:
        return nacl.public.SealedBox(private_key).decrypt(ciphertext)
    except nacl.exceptions.CryptoError:
        raise BadSignature("sealed message could not be opened") from None


class TemplateCipher:
    """Encrypts templates at rest under the operator's key (XChaCha20-Poly1305).

    The owner (credential id, or card number for the card photo) is bound as
    associated data, so a ciphertext moved to another row does not decrypt.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) != nacl.secret.Aead.KEY_SIZE:
            raise ConfigError("template key must be 32 bytes")
        self._aead = nacl.secret.Aead(key)

    def __repr__(self) -> str:
        return "TemplateCipher(<key hidden>)"

    @classmethod
    def load_or_create(cls, path: Path) -> "TemplateCipher":
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls(_read_or_create(path, nacl.secret.Aead.KEY_SIZE))

    def encrypt(self, plaintext: bytes, owner: str) -> bytes:
        return bytes(self._aead.encrypt(plaintext, owner.encode()))

    def decrypt(self, ciphertext: bytes, owner: str) -> bytes:
        try:
            return self._aead.decrypt(ciphertext, owner.encode())
        except nacl.exceptions.CryptoError:
            raise ConfigError("a template does not decrypt: wrong template key or tampered row") from None

