"""Creating, finding and revoking API keys."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

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


def authenticate(session: Session, plaintext: str | None) -> Caller:
    """Return the caller for a bearer key, or raise Unauthenticated."""
    if not plaintext or not looks_like_key(plaintext):
        raise Unauthenticated("send `Authorization: Bearer gj_...` with a valid API key")
    digest = hash_key(plaintext)
    row = session.execute(_AUTHENTICATE, {"key_hash": digest}).first()
    # The lookup is by hash, so timing reveals nothing about the key; compare anyway.
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        raise Unauthenticated("unknown API key")
    now = utcnow()
    if row.revoked_at is not None:
        raise Unauthenticated("this API key has been revoked")
    if row.expires_at is not None and row.expires_at <= now:
        raise Unauthenticated("this API key has expired")
    has_limits = (row.rpm, row.tpm, row.max_concurrent) != (None, None, None)
    return Caller(key_id=row.id, role=row.role, has_limits=has_limits)


def list_keys(session: Session) -> list[ApiKey]:
    """Return every key, newest first."""
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id.desc())))


def revoke_key(session: Session, key_id: str) -> ApiKey:
    """Revoke a key; revoking twice is fine."""
    row = session.get(ApiKey, key_id, with_for_update=True)
    if row is None:
        raise NotFound(f"no API key {key_id!r}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


def has_active_admin(session: Session) -> bool:
    """Return whether any unrevoked admin key exists."""
    return (
        session.scalars(
            select(ApiKey.id).where(ApiKey.role == "admin", ApiKey.revoked_at.is_(None))
        ).first()
        is not None
    )
