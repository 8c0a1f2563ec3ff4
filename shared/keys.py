"""API key material: generation and hashing. Only hashes are ever stored."""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "gj_"
# 32 random bytes = 256 bits, well above the 128-bit floor.
KEY_RANDOM_BYTES = 32
SHOWN_PREFIX_CHARS = 10


def generate_key() -> str:
    """Return a new plaintext API key."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)


def hash_key(plaintext: str) -> str:
    """Return the stored form of a key.

    Keys carry 256 random bits, so a fast hash is enough: there is nothing to brute-force.
    """
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def looks_like_key(value: str) -> bool:
    """Return whether a string has the shape of one of our keys."""
    return value.startswith(KEY_PREFIX) and 20 <= len(value) <= 200
