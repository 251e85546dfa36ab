"""Make guest-controlled strings safe to print in a terminal."""

from __future__ import annotations


def escape_guest(value: str | bytes, limit: int = 4096) -> str:
    """Return `value` with control characters escaped so a guest cannot drive the terminal."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    out = []
    for ch in value[:limit]:
        code = ord(ch)
        out.append(f"\\x{code:02x}" if code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0 else ch)
    if len(value) > limit:
        out.append("…")
    return "".join(out)
