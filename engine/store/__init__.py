"""The durable store: records, the ``Store`` interface and ``open_store(url)``.

``base`` holds the records, the interface and the status rules; ``sqlite`` the
embedded implementation on one file; ``postgres`` the one that many engine nodes
share. ``open_store`` picks the implementation from the URL's scheme.
"""

from __future__ import annotations

import os

from ..errors import ConfigError
from .base import (
    CARD_STATUSES,
    CREDENTIAL_STATUSES,
    LEVELS,
    MODALITIES,
    PARTY_STATUSES,
    AcceptancePoint,
    AuditEntry,
    AuditValue,
    CardRecord,
    Credential,
    RelyingParty,
    SealedTemplate,
    Store,
    TemplateChange,
    TemplateRow,
    raise_unless_active,
    raise_unless_card_valid,
)

__all__ = [
    "CARD_STATUSES",
    "CREDENTIAL_STATUSES",
    "LEVELS",
    "MODALITIES",
    "PARTY_STATUSES",
    "AcceptancePoint",
    "AuditEntry",
    "AuditValue",
    "CardRecord",
    "Credential",
    "RelyingParty",
    "SealedTemplate",
    "Store",
    "TemplateChange",
    "TemplateRow",
    "open_store",
    "raise_unless_active",
    "raise_unless_card_valid",
]

SUPPORTED_SCHEMES = (
    "sqlite:///PATH (relative), sqlite:////PATH (absolute), a plain file path,"
    " or postgresql://HOST[:PORT]/DATABASE[?schema=NAME] (a libpq URL, user and password as libpq takes them)"
)


def open_store(url_or_path: str | os.PathLike[str], *, busy_timeout_ms: int = 5000) -> Store:
    """Open (and create on first use) the store named by a URL or a path.

    ``sqlite:///relative/x.db``, ``sqlite:////absolute/x.db`` (the SQLAlchemy
    convention, so ``f"sqlite:///{absolute_path}"`` works) or a plain path open a
    ``SqliteStore``; ``postgresql://…`` (or ``postgres://…``) a ``PostgresStore``,
    with ``busy_timeout_ms`` as its wait for row locks. Any other scheme raises
    ``ConfigError``; the URL itself is not repeated in the message, since it may
    carry a password.
    """
    target = os.fspath(url_or_path)
    if not isinstance(target, str):
        raise ConfigError("the store location must be a text path or URL")
    if "://" in target:
        scheme, _, rest = target.partition("://")
        if scheme.lower() in ("postgresql", "postgres"):
            from .postgres import PostgresStore

            return PostgresStore(target, busy_timeout_ms=busy_timeout_ms)
        if scheme.lower() != "sqlite":
            raise ConfigError(
                f"unsupported store URL scheme {scheme[:20]!r}; supported: {SUPPORTED_SCHEMES}"
            )
        if not rest.startswith("/") or len(rest) < 2:
            raise ConfigError(f"malformed sqlite URL; supported: {SUPPORTED_SCHEMES}")
        target = rest[1:]
    if not target or target == ":memory:" or target.startswith("file:"):
        raise ConfigError(f"the store needs a file on disk; supported: {SUPPORTED_SCHEMES}")
    from .sqlite import SqliteStore

    return SqliteStore(target, busy_timeout_ms=busy_timeout_ms)
