"""Write a Linux initramfs (cpio "newc") from an in-memory description of files."""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO


@dataclass(frozen=True, slots=True)
class Entry:
    """One archive member: a directory, a regular file (bytes) or a symlink (target)."""

    path: str  # without leading slash
    mode: int  # including the file type bits
    data: bytes = b""


def _header(ino: int, entry: Entry, size: int) -> bytes:
    name = entry.path.encode() + b"\0"
    fields = (ino, entry.mode, 0, 0, 1, 0, size, 0, 0, 0, 0, len(name), 0)
    head = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
    pad = (-(len(head) + len(name))) % 4
    return head + name + b"\0" * pad


def write_cpio(out: BinaryIO, entries: Iterable[Entry]) -> int:
    """Write `entries` and the trailer to `out`; return the number of members written."""
    count = 0
    for ino, entry in enumerate(entries, start=1):
        data = entry.data if not stat.S_ISDIR(entry.mode) else b""
        out.write(_header(ino, entry, len(data)))
        out.write(data)
        out.write(b"\0" * ((-len(data)) % 4))
        count += 1
    out.write(_header(0, Entry("TRAILER!!!", 0), 0))
    out.write(b"\0" * ((-out.tell()) % 512))
    return count
