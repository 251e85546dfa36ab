"""Make a trojaned copy of a packaged binary: change bytes in its text that are never executed."""

from __future__ import annotations

import io

from elftools.elf.elffile import ELFFile

from nephoscope.core.errors import LabError

MARKER = b"NPH-TROJAN"
# multi-byte NOPs compilers put between functions for alignment (after a ret they never run)
_PADDING = (b"\x66\x2e\x0f\x1f\x84\x00\x00\x00\x00\x00", b"\x0f\x1f\x84\x00\x00\x00\x00\x00")
PAGE = 4096


def find_patch_offset(data: bytes) -> tuple[int, int]:
    """Return (file offset, length) of inter-function padding in or after the entry point's page."""
    elf = ELFFile(io.BytesIO(data))
    entry = elf.header.e_entry
    for seg in elf.iter_segments():
        inside = seg["p_vaddr"] <= entry < seg["p_vaddr"] + seg["p_filesz"]
        if seg["p_type"] == "PT_LOAD" and seg["p_flags"] & 1 and inside:
            entry_off = entry - seg["p_vaddr"] + seg["p_offset"]
            break
    else:
        raise LabError("entry point is not in an executable segment; cannot make a trojan of this file")
    page = entry_off - entry_off % PAGE
    # search the entry page first, then the pages after it
    for start in range(page, min(page + 16 * PAGE, len(data)), PAGE):
        chunk = data[start:start + PAGE]
        for pad in _PADDING:
            i = chunk.find(b"\xc3" + pad)
            if i >= 0 and i + 1 + len(pad) <= PAGE:
                return start + i + 1, len(pad)
    raise LabError("no inter-function padding found near the entry point")


def patch_text_padding(data: bytes) -> bytes:
    """Return `data` with a marker written over never-executed padding in its text."""
    offset, length = find_patch_offset(data)
    patched = bytearray(data)
    patched[offset:offset + length] = MARKER[:length].ljust(length, b"!")
    return bytes(patched)
