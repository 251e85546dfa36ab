"""The one definition of a code page's identity, shared by the knowledge base and the arch scan."""

from __future__ import annotations

import hashlib

PAGE_SIZE = 4096


def page_digest(page: bytes | memoryview) -> bytes:
    """Return the SHA-256 digest of one 4 KiB page exactly as it lies in memory."""
    return hashlib.sha256(page).digest()


def page_key(digest: bytes) -> int:
    """Return the 64-bit lookup key of a page digest (its first 8 bytes, big-endian)."""
    return int.from_bytes(digest[:8], "big")
