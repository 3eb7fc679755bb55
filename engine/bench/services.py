"""The database services of a benchmark run: a PostgreSQL schema and a Redis key prefix of its own.

A benchmark given ``--store postgresql://...`` without ``schema=`` (or ``--state redis://...``
without ``prefix=``) works in a schema (prefix) named for the run, ``netid_bench_<tag>``, and
removes it at the end, so runs never mix with each other or with a deployment's data. A URL
that names its schema or prefix is used as given and left in place.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["RunServices"]


def _with_param(url: str, key: str, value: str) -> tuple[str, bool]:
    """``url`` with ``key=value`` added unless it has ``key``; whether it was added."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(k == key for k, _ in query):
        return url, False
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode([*query, (key, value)]), parts.fragment)), True


class RunServices:
    """The run's store and state URLs, and the clean-up of what the run created in them."""

    def __init__(self, store: str | None, state: str | None, tag: str) -> None:
        self.name = f"netid_bench_{tag}"
        self._own_schema = self._own_prefix = False
        self.store = store
        self.state = state
        if store and store.startswith(("postgresql:", "postgres:")):
            self.store, self._own_schema = _with_param(store, "schema", self.name)
        if state:
            self.state, self._own_prefix = _with_param(state, "prefix", self.name)

    @property
    def shared(self) -> bool:
        """The store is PostgreSQL (the database services' CPU is counted)."""
        return bool(self.store and self.store.startswith(("postgresql:", "postgres:")))

    def ports(self) -> list[int]:
        """The TCP ports of the services the run uses (PostgreSQL, Redis)."""
        out = []
        for url, default in ((self.store, 5432), (self.state, 6379)):
            if url and self.shared:
                try:
                    out.append(urlsplit(url).port or default)
                except ValueError:
                    pass
        return out

    def serve_args(self) -> list[str]:
        return [*(["--store", self.store] if self.store else []), *(["--state", self.state] if self.state else [])]

    def store_args(self) -> list[str]:
        return ["--store", self.store] if self.store else []

    def clean_up(self) -> None:
        """Drop the run's own schema and delete its own Redis keys (what it did not create stays)."""
        if self._own_schema and self.store:
            import psycopg

            from engine.store.postgres_db import parse_url

            conninfo, schema = parse_url(self.store)
            with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        if self._own_prefix and self.state:
            from engine.state.redis import connect, parse_state_url

            url, prefix = parse_state_url(self.state)
            client = connect(url)
            try:
                keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
                for k in range(0, len(keys), 500):
                    client.delete(*keys[k:k + 500])
            finally:
                client.close()
