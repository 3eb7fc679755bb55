"""The store seam: its records, the ``Store`` interface, and the rules on statuses.

The store keeps the ID-card registry, credentials, their encrypted templates, the
relying-party and acceptance-point registries and the audit log. It is synchronous:
the engine calls it from worker threads (``trio.to_thread.run_sync`` behind a
``CapacityLimiter``). Implementations are thread-safe and run every multi-row
transition in one transaction, so a crash leaves the state before or after it.

Identifiers: credential ids are made by the store (``secrets.token_urlsafe(16)``);
card numbers, relying-party ids and acceptance-point ids are made by the caller;
template ids are the database's own row ids (never reused) and double as FAISS ids.

Ciphertexts (templates, card photo template) are opaque to the store: it never
decrypts them. The audit log never holds biometric data: ``detail`` values are
short strings and numbers chosen by the caller, and bytes are refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import msgspec

from ..errors import (
    CardLost,
    CardNotValid,
    CredentialError,
    CredentialSuspended,
    CredentialVoided,
    InvalidMessage,
    UnknownCard,
    UnknownCredential,
)

__all__ = [
    "CARD_STATUSES",
    "CREDENTIAL_STATUSES",
    "LEVELS",
    "MODALITIES",
    "PARTY_STATUSES",
    "AcceptancePoint",
    "AuditEntry",
    "CardRecord",
    "Credential",
    "RelyingParty",
    "SealedTemplate",
    "Store",
    "TemplateChange",
    "TemplateRow",
    "raise_unless_active",
    "raise_unless_card_valid",
]

CARD_STATUSES = ("valid", "lost", "revoked", "expired")
CREDENTIAL_STATUSES = ("active", "voided", "suspended")
LEVELS = ("basic", "high")
MODALITIES = ("face", "voice")
PARTY_STATUSES = ("active", "disabled")

AuditValue = str | int | float


class CardRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One ID card of the registry."""

    card_number: str
    name: str
    photo_path: str
    status: str  # one of CARD_STATUSES
    photo_template: bytes | None = None  # ciphertext of the card photo's embedding
    updated_at: float = 0.0


class Credential(msgspec.Struct, frozen=True, kw_only=True):
    """A credential issued from a card and bound to one device key."""

    credential_id: str
    card_number: str
    version: int
    level: str  # one of LEVELS
    device_key: bytes  # 32-byte Ed25519 public key
    status: str  # one of CREDENTIAL_STATUSES
    created_at: float
    updated_at: float


class TemplateRow(msgspec.Struct, frozen=True, kw_only=True):
    """One encrypted template; ``template_id`` is the FAISS id."""

    template_id: int
    credential_id: str
    modality: str  # one of MODALITIES
    ciphertext: bytes


class SealedTemplate(msgspec.Struct, frozen=True, kw_only=True):
    """A template of an active credential with the card number it is sealed to (what an
    index needs to open it)."""

    template_id: int
    credential_id: str
    card_number: str
    ciphertext: bytes


class TemplateChange(msgspec.Struct, frozen=True, kw_only=True):
    """One row of the template change log: ``op`` is ``add`` or ``remove``. An addition
    carries ``sealed`` while its template exists and its credential is active, else ``None``
    (a later ``remove`` row follows in the log)."""

    seq: int
    op: str
    template_id: int
    credential_id: str
    modality: str
    sealed: SealedTemplate | None = None


class RelyingParty(msgspec.Struct, frozen=True, kw_only=True):
    rp_id: str
    display_name: str
    sign_key: bytes  # Ed25519 public key (stream handshake)
    box_key: bytes  # X25519 public key (sealed results)
    max_level: str  # one of LEVELS
    quota_per_minute: int
    status: str  # one of PARTY_STATUSES
    created_at: float


class AcceptancePoint(msgspec.Struct, frozen=True, kw_only=True):
    ap_id: str
    name: str
    sign_key: bytes  # Ed25519 public key (attestations)
    status: str  # one of PARTY_STATUSES
    created_at: float


class AuditEntry(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    ts: float
    actor: str
    action: str
    subject: str
    outcome: str
    detail: dict[str, AuditValue]


@runtime_checkable
class Store(Protocol):
    """What the service layer needs from durable storage.

    Reads return ``None`` (or an empty list) for what does not exist; transitions
    that are refused raise the specific class from ``engine.errors``; failures of
    the database itself raise ``StoreError``.
    """

    # -- ID-card registry --------------------------------------------------
    def import_cards(
        self, records: Iterable[CardRecord], *, actor: str, now: float | None = None
    ) -> int:
        """Upsert by card number in one transaction; a card that becomes ``lost``
        suspends its active credentials. Returns the number of records written."""
        ...

    def get_card(self, card_number: str) -> CardRecord | None: ...

    def set_card_photo_template(self, card_number: str, ciphertext: bytes) -> None: ...

    def report_card_lost(self, card_number: str, *, actor: str, now: float) -> list[str]:
        """Card → lost and every active credential of it → suspended, in one
        transaction. Returns the suspended credential ids."""
        ...

    def reissue_card(self, card_number: str, *, actor: str, now: float) -> None:
        """Card → valid; its credentials stay suspended until a new enrollment."""
        ...

    # -- credentials ---------------------------------------------------------
    def issue_credential(
        self,
        *,
        card_number: str,
        device_key: bytes,
        templates: Sequence[tuple[str, bytes]],
        actor: str,
        now: float,
    ) -> tuple[Credential, list[TemplateRow], list[str]]:
        """New version (basic, active) with its templates; every earlier credential
        of the card voided and its templates deleted; one transaction. Returns the
        credential, its template rows and the voided credential ids."""
        ...

    def get_credential(self, credential_id: str) -> Credential | None: ...

    def credential_by_device(self, device_key: bytes) -> Credential | None:
        """The active or suspended credential bound to this key, else the newest
        voided credential that was bound to it, else ``None``."""
        ...

    def retired_device(self, device_key: bytes) -> str | None:
        """Id of the credential this key was unbound from by a rebind, unless the
        key is bound again to a credential that is not voided."""
        ...

    def rebind_device(
        self,
        credential_id: str,
        *,
        expected_device_key: bytes,
        new_device_key: bytes,
        actor: str,
        now: float,
    ) -> Credential:
        """Compare-and-set of the device key; ``Conflict`` if another rebind won
        or the new key is already bound."""
        ...

    def set_level(
        self, credential_id: str, level: str, *, actor: str, now: float, attestation: bytes
    ) -> Credential: ...

    def active_templates(self, modality: str | None = None) -> Iterator[TemplateRow]: ...

    def templates_of(self, credential_id: str) -> list[TemplateRow]: ...

    def credential_with_templates(self, credential_id: str) -> tuple[Credential | None, list[TemplateRow]]:
        """The credential as it is now and its templates, in one indexed read (the
        1:1 match of every verification); ``(None, [])`` if there is no such credential."""
        ...

    def count_credentials(self) -> dict[str, int]: ...

    # -- the template change log (engine.store.sql_log) -----------------------------------
    def store_id(self) -> str:
        """This store's identity, made when its schema was created."""
        ...

    def log_position(self) -> int:
        """The ``seq`` of the newest row of the template change log (0: none)."""
        ...

    def count_templates(self, modality: str) -> int:
        """Templates of ``modality`` of active credentials."""
        ...

    def template_changes(self, after: int, *, modality: str, limit: int = 4096) -> list[TemplateChange]:
        """Log rows after ``seq`` ``after`` (every modality), oldest first; additions of
        ``modality`` carry their sealed template."""
        ...

    def sealed_templates(self, modality: str) -> Iterator[SealedTemplate]:
        """Every template of ``modality`` of an active credential (streamed in pages)."""
        ...

    def sealed_by_id(self, template_ids: Sequence[int]) -> list[SealedTemplate]:
        """The templates among ``template_ids`` whose credential is active."""
        ...

    def enrollment_lock(self) -> AbstractContextManager[None]:
        """Held (from a worker thread) around an enrollment's duplicate search and its
        ``issue_credential``, so that two enrollments of one face cannot both miss each
        other. Its reach is the store's: see the implementation."""
        ...

    # -- relying parties and acceptance points ------------------------------------
    def add_relying_party(self, rp: RelyingParty, *, actor: str) -> None: ...

    def get_relying_party(self, rp_id: str) -> RelyingParty | None: ...

    def list_relying_parties(self) -> list[RelyingParty]: ...

    def set_relying_party_status(
        self, rp_id: str, status: str, *, actor: str, now: float | None = None
    ) -> RelyingParty: ...

    def add_acceptance_point(self, ap: AcceptancePoint, *, actor: str) -> None: ...

    def get_acceptance_point(self, ap_id: str) -> AcceptancePoint | None: ...

    def list_acceptance_points(self) -> list[AcceptancePoint]: ...

    def set_acceptance_point_status(
        self, ap_id: str, status: str, *, actor: str, now: float | None = None
    ) -> AcceptancePoint: ...

    # -- audit -----------------------------------------------------------------
    def audit(
        self,
        *,
        actor: str,
        action: str,
        subject: str,
        outcome: str,
        detail: dict[str, AuditValue] | None = None,
        now: float,
    ) -> None: ...

    def audit_log(
        self, *, limit: int = 100, since_seq: int = 0, subject: str | None = None
    ) -> list[AuditEntry]: ...

    def healthy(self) -> bool:
        """Whether the database answers now (a cheap probe for readiness, never raising)."""
        ...

    def close(self) -> None: ...


# -- the rules on statuses, for the store and the flows alike ------------------------------
_CREDENTIAL_ERRORS: dict[str, type[CredentialError]] = {
    "voided": CredentialVoided,
    "suspended": CredentialSuspended,
}


def raise_unless_active(cred: Credential | None) -> Credential:
    """The credential if it exists and is active, else the error that says why not."""
    if cred is None:
        raise UnknownCredential()
    if cred.status != "active":
        raise _CREDENTIAL_ERRORS.get(cred.status, CredentialError)()
    return cred


def raise_unless_card_valid(status: str | None) -> None:
    """Nothing if a card of this status (``None``: no such card) may be enrolled from."""
    if status is None:
        raise UnknownCard()
    if status == "lost":
        raise CardLost()
    if status != "valid":
        raise CardNotValid()


# -- validation shared by Store implementations ---------------------------------------
MAX_TEXT = 256  # audit fields and detail strings
MAX_DETAIL_KEYS = 32


def check_key(value: object, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)) or len(value) != 32:
        raise InvalidMessage(f"{what} must be 32 bytes")
    return bytes(value)


def check_choice(value: object, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise InvalidMessage(f"{what} must be one of {', '.join(allowed)}")
    return value  # type: ignore[return-value]


def check_text(value: object, what: str, *, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise InvalidMessage(f"{what} must be a non-empty string of at most {limit} characters")
    return value


def encode_audit_detail(detail: dict[str, AuditValue] | None) -> str:
    """JSON text of an audit detail, after checking it is a small flat map of short
    strings and finite numbers: bytes (templates, embeddings, images) are refused."""
    if detail is None:
        return "{}"
    if not isinstance(detail, dict) or len(detail) > MAX_DETAIL_KEYS:
        raise InvalidMessage(f"audit detail must be a dict of at most {MAX_DETAIL_KEYS} keys")
    for k, v in detail.items():
        check_text(k, "an audit detail key", limit=64)
        if isinstance(v, (bytes, bytearray, memoryview)):
            raise InvalidMessage("audit detail values may not be bytes (no biometric data)")
        if isinstance(v, str):
            if len(v) > MAX_TEXT:
                raise InvalidMessage("audit detail strings must be short")
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InvalidMessage("audit detail values must be strings or numbers")
        elif isinstance(v, float) and not math.isfinite(v):
            raise InvalidMessage("audit detail numbers must be finite")
        elif isinstance(v, int) and not -(2**63) <= v < 2**63:
            raise InvalidMessage("audit detail integers must fit in 64 bits")
    return msgspec.json.encode(detail).decode()
