"""Known-bad code knowledge: YARA rules (shipped in `rules/*.yar` plus the user's) and page/file hashes."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yara

from nephoscope.core.errors import KnowledgeError

RULES_DIR = Path(__file__).parent / "rules"
PAGE = 4096
MAX_HITS_PER_RULE = 64


@dataclass(frozen=True, slots=True)
class RuleHit:
    """One YARA string match: rule, string id, offset into the scanned buffer, and the rule's meta."""

    rule: str
    identifier: str
    offset: int
    length: int
    meta: dict[str, Any]


def _rule_files(paths: list[Path]) -> dict[str, str]:
    files: dict[str, str] = {}
    for p in paths:
        found = sorted([*p.glob("*.yar"), *p.glob("*.yara")]) if p.is_dir() else [p]
        if not found or not all(f.is_file() for f in found):
            raise KnowledgeError(f"no YARA rule files at {p}; give .yar files or a directory of them")
        for f in found:
            files[f"{len(files)}:{f.stem}"] = str(f)
    return files


class RuleSet:
    """Compiled YARA rules with a scan that returns typed hits."""

    def __init__(self, paths: list[Path] | None = None, *, builtin: bool = True) -> None:
        """Compile the shipped rules (unless `builtin=False`) and the rule files or directories in `paths`."""
        self.files = _rule_files(([RULES_DIR] if builtin else []) + list(paths or []))
        try:
            self.rules = yara.compile(filepaths=self.files)
        except yara.SyntaxError as exc:
            raise KnowledgeError(f"malformed YARA rule: {exc} (in one of {', '.join(self.files.values())}); "
                                 "fix it or leave the file out") from exc
        except yara.Error as exc:
            raise KnowledgeError(f"cannot compile YARA rules: {exc}") from exc
        self.names = sorted(r.identifier for r in self.rules)

    def scan(self, data: bytes | memoryview, timeout: int = 60) -> list[RuleHit]:
        """Return every string match of every rule in `data` (offsets into `data`)."""
        try:
            matches = self.rules.match(data=bytes(data), timeout=timeout)
        except yara.TimeoutError as exc:
            raise KnowledgeError(f"YARA scan timed out after {timeout}s") from exc
        except yara.Error as exc:
            raise KnowledgeError(f"YARA scan failed: {exc}") from exc
        hits = []
        for m in matches:
            inst = [(s.identifier, i) for s in m.strings for i in s.instances][:MAX_HITS_PER_RULE]
            hits += [RuleHit(m.rule, ident, i.offset, i.matched_length, dict(m.meta)) for ident, i in inst]
        return hits


def iter_chunks(segments: Iterator[tuple[int, memoryview]], chunk: int = 16 << 20,
                overlap: int = PAGE) -> Iterator[tuple[int, memoryview]]:
    """Yield (gpa, bytes view) windows over RAM segments, overlapping so no match spans a seam unseen."""
    for start, view in segments:
        pos = 0
        while pos < len(view):
            yield start + pos, view[pos: pos + chunk + overlap]
            pos += chunk


def scan_physical(ruleset: RuleSet, segments: Iterator[tuple[int, memoryview]],
                  chunk: int = 16 << 20) -> list[tuple[int, RuleHit]]:
    """Return (gpa, hit) for every match in guest-physical RAM (segments from `iter_segments()`)."""
    seen: set[tuple[int, str, str]] = set()
    out = []
    for gpa, view in iter_chunks(segments, chunk):
        for hit in ruleset.scan(view):
            key = (gpa + hit.offset, hit.rule, hit.identifier)
            if key not in seen:
                seen.add(key)
                out.append((gpa + hit.offset, hit))
    return sorted(out, key=lambda t: t[0])


def load_hashes(paths: list[Path] | None = None, *, builtin: bool = True) -> dict[bytes, str]:
    """Return SHA-256 digest -> description from `HEX  description` lines (`#` comments)."""
    files = ([RULES_DIR / "known_bad.sha256"] if builtin else []) + list(paths or [])
    out: dict[bytes, str] = {}
    for f in files:
        try:
            lines = f.read_text("utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise KnowledgeError(f"cannot read the hash list {f}: {exc}") from exc
        for n, line in enumerate(lines, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            hexdigest, _, what = text.partition(" ")
            try:
                digest = bytes.fromhex(hexdigest)
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise KnowledgeError(f"{f}:{n}: {hexdigest[:70]!r} is not a SHA-256 hex digest")
            out[digest] = what.strip() or f.name
    return out


def page_digest(data: bytes) -> bytes:
    """Return the SHA-256 of one page (or file) of bytes."""
    return hashlib.sha256(data).digest()
