"""Creating, finding and revoking API keys."""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, Row, bindparam, or_, select
from sqlalchemy.orm import Session

from shared.db import get_by_id
from shared.errors import InvalidField, NotFound, Unauthenticated
from shared.ids import new_id
from shared.keys import SHOWN_PREFIX_CHARS, generate_key, hash_key, looks_like_key
from shared.models import ApiKey, utcnow

ROLES = ("admin", "user")


@dataclass(frozen=True)
class Caller:
    """The authenticated key behind a request."""

    key_id: str
    role: str
    # Whether the key sets a limit of its own (keys' limits never change after creation).
    has_limits: bool = True

    @property
    def is_admin(self) -> bool:
        """Return whether the caller holds an admin key."""
        return self.role == "admin"


def create_key(
    session: Session,
    *,
    role: str,
    name: str = "",
    rpm: int | None = None,
    tpm: int | None = None,
    max_concurrent: int | None = None,
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """Create a key; return its row and the plaintext, which is never stored."""
    if role not in ROLES:
        raise InvalidField(f"role must be one of {', '.join(ROLES)}", details={"field": "role"})
    plaintext = generate_key()
    row = ApiKey(
        id=new_id("key"),
        key_hash=hash_key(plaintext),
        key_prefix=plaintext[:SHOWN_PREFIX_CHARS],
        name=name,
        role=role,
        rpm=rpm,
        tpm=tpm,
        max_concurrent=max_concurrent,
        expires_at=expires_at,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row, plaintext


# Columns, not the entity, and built once: every request authenticates, and building an ORM
# object or a statement costs more than the query.
_AUTHENTICATE = select(
    ApiKey.id, ApiKey.key_hash, ApiKey.role, ApiKey.rpm, ApiKey.tpm, ApiKey.max_concurrent, ApiKey.revoked_at,
    ApiKey.expires_at,
).where(ApiKey.key_hash == bindparam("key_hash"))


def find_key(session: Session | Connection, digest: str) -> Row | None:
    """Return the authentication columns of the key with this hash, if any."""
    return session.execute(_AUTHENTICATE, {"key_hash": digest}).first()


def caller_for(row: Row | None, digest: str) -> Caller:
    """Return the caller a key row stands for, or raise Unauthenticated (unknown, revoked, expired)."""
    # The lookup is by hash, so timing reveals nothing about the key; compare anyway.
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        raise Unauthenticated("unknown API key")
    refusal = refusal_of(row)
    if refusal is not None:
        raise Unauthenticated(refusal)
    has_limits = (row.rpm, row.tpm, row.max_concurrent) != (None, None, None)
    return Caller(key_id=row.id, role=row.role, has_limits=has_limits)


def refusal_of(row: Row | None) -> str | None:
    """Return why a key's row authenticates no more (gone, revoked, expired), or None."""
    if row is None:
        return "this API key no longer exists"
    if row.revoked_at is not None:
        return "this API key has been revoked"
    if row.expires_at is not None and row.expires_at <= utcnow():
        return "this API key has expired"
    return None


def _digest(plaintext: str | None) -> str:
    if not plaintext or not looks_like_key(plaintext):
        raise Unauthenticated("send `Authorization: Bearer gj_...` with a valid API key")
    return hash_key(plaintext)


def _caller_if_valid(row: Row, digest: str) -> Caller | None:
    """Return the caller a key row stands for, or None if it stands for none (revoked, expired)."""
    try:
        return caller_for(row, digest)
    except Unauthenticated:
        return None


class KeyCache:
    """Authenticate keys from rows read at most `ttl_s` ago (per process), not one query a request.

    Through the API only revocation changes a key's row (limits are fixed at creation; expiry is
    checked against the clock at every use): a key revoked by another gateway process, by the CLI
    or by editing its row keeps working here for up to `ttl_s`; one revoked through this process
    stops at its next request (`forget`). Unknown keys are not remembered, so a key created
    elsewhere works at once.
    """

    # Bounds memory if very many distinct keys pass through one process.
    MAX_KEYS = 10_000

    def __init__(self, find: Callable[[str], Row | None], ttl_s: float):
        self.find = find
        self.ttl_s = ttl_s
        # digest -> (when read, the row, its caller if the row was valid then)
        self._rows: dict[str, tuple[float, Row, Caller | None]] = {}
        # Writes and forgets take the lock; reads are single dict gets, safe without it.
        self._lock = threading.Lock()
        # Counts forgets: a row read while one happened may be the revoked key's, read before
        # its revoke committed, and is not remembered.
        self._forgets = 0

    def authenticate(self, plaintext: str | None) -> Caller:
        """Return the caller for a bearer key, or raise Unauthenticated."""
        digest = _digest(plaintext)
        cached = self._rows.get(digest)
        if cached is not None and time.monotonic() - cached[0] <= self.ttl_s:
            _, row, caller = cached
            # Found by its digest, so the row is this key's; only the clock can have changed.
            if caller is not None and (row.expires_at is None or row.expires_at > utcnow()):
                return caller
            return caller_for(row, digest)
        forgets, read_at = self._forgets, time.monotonic()
        row = self.find(digest)
        if row is not None:
            with self._lock:
                if forgets == self._forgets:
                    if len(self._rows) >= self.MAX_KEYS:
                        self._rows = {}
                    self._rows[digest] = (read_at, row, _caller_if_valid(row, digest))
        return caller_for(row, digest)

    def forget(self, key_id: str) -> None:
        """Drop a key's row (it was just revoked): its next request reads it anew."""
        with self._lock:
            self._forgets += 1
            self._rows = {digest: entry for digest, entry in self._rows.items() if entry[1].id != key_id}


def list_keys(session: Session) -> list[ApiKey]:
    """Return every key, newest first."""
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id.desc())))


def revoke_key(session: Session, key_id: str) -> ApiKey:
    """Revoke a key; revoking twice is fine."""
    row = get_by_id(session, ApiKey, key_id, with_for_update=True)
    if row is None:
        raise NotFound(f"no API key {key_id!r}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


def has_active_admin(session: Session) -> bool:
    """Return whether any admin key works now: not revoked, not expired."""
    usable = or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > utcnow())
    return (
        session.scalars(
            select(ApiKey.id).where(ApiKey.role == "admin", ApiKey.revoked_at.is_(None), usable)
        ).first()
        is not None
    )
