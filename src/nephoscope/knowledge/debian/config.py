"""apt's configuration as `apt-config dump` prints it, and the files whose state decides what apt knows."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from nephoscope.core.errors import KnowledgeError

_LINE_RE = re.compile(r'^(\S+) "(.*)";$')
# files apt keeps in its lists directory that are no index (lock, download area, auxiliary files)
_LISTS_SKIP = ("lock", "partial", "auxfiles")
# apt reads parts files whose names use only these characters (and, for preferences, end in .pref or
# have no extension); anything else is ignored by apt, so it must not change our view either.
_PART_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


def run_apt_bytes(cmd: list[str], cwd: Path | None = None) -> bytes:
    """Run an apt tool and return its stdout; raise KnowledgeError naming the tool when it fails."""
    if shutil.which(cmd[0]) is None:
        raise KnowledgeError(f"`{cmd[0]}` is missing; run `make setup` (Debian 12 host) first")
    proc = subprocess.run(cmd, capture_output=True, check=False, cwd=cwd)
    if proc.returncode != 0:
        raise KnowledgeError(f"`{' '.join(cmd)}` failed: {proc.stderr.decode(errors='replace').strip()[:400]}")
    return proc.stdout


def run_apt(cmd: list[str], cwd: Path | None = None) -> str:
    """Run an apt tool and return its stdout as text."""
    return run_apt_bytes(cmd, cwd).decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class AptConfig:
    """apt's configuration under a set of `-o` options: the dump text and its values (keys lower-case)."""

    options: tuple[str, ...]
    text: str
    values: dict[str, str]

    def get(self, key: str, default: str = "") -> str:
        """Return a scalar value (apt keys are case-insensitive)."""
        return self.values.get(key.lower(), default)

    def find_file(self, key: str) -> Path:
        """Resolve a Dir:: path the way apt's Configuration::FindFile does (relative to its parents)."""
        parts = key.split("::")
        value = self.get(key)
        for depth in range(len(parts) - 1, 0, -1):
            if value.startswith(("/", "./", "../", "~/")):
                break
            parent = self.get("::".join(parts[:depth]))
            if parent:
                value = parent.rstrip("/") + "/" + value if value else parent
        root = self.get("RootDir")
        return Path(root) / value.lstrip("/") if root else Path(value)

    @property
    def architecture(self) -> str:
        """Return apt's native architecture (APT::Architecture)."""
        return self.get("APT::Architecture") or "amd64"

    @property
    def default_release(self) -> str:
        """Return APT::Default-Release (empty when unset)."""
        return self.get("APT::Default-Release")


def read_config(options: tuple[str, ...] = ()) -> AptConfig:
    """Return apt's configuration with `options` applied (one `apt-config dump`, no package cache built)."""
    text = run_apt(["apt-config", *options, "dump"])
    values: dict[str, str] = {}
    for line in text.splitlines():
        m = _LINE_RE.match(line)
        if m and m.group(1).lower() not in values:
            values[m.group(1).lower()] = m.group(2)
    return AptConfig(options, text, values)


def part_files(directory: Path, extensions: tuple[str, ...], bare: bool) -> list[Path]:
    """Return the files apt reads from a parts directory (by extension, or without one if `bare`), sorted."""
    if not directory.is_dir():
        return []
    out = []
    for path in sorted(directory.iterdir()):
        if not path.is_file() or not _PART_RE.match(path.name):
            continue
        if ("." in path.name and path.name.rsplit(".", 1)[1] in extensions) or ("." not in path.name and bare):
            out.append(path)
    return out


def preference_files(config: AptConfig) -> list[Path]:
    """Return apt's preferences file and preferences.d parts that exist, in the order apt reads them."""
    main = config.find_file("Dir::Etc::Preferences")
    parts = part_files(config.find_file("Dir::Etc::PreferencesParts"), ("pref",), bare=True)
    return [p for p in [main, *parts] if p.is_file()]


def state_key(config: AptConfig, version: str) -> str:
    """Return a digest of everything apt's view of the archive depends on.

    That is the configuration, the sources lists, the preferences and the lists directory (names, sizes
    and modification times of the index files `apt-get update` writes). `version` is the caller's cache
    format, so a new format never reads an old cache."""
    h = hashlib.sha256(version.encode() + b"\0" + config.text.encode())
    lists = config.find_file("Dir::State::Lists")
    paths = [p for p in sorted(lists.iterdir()) if p.name not in _LISTS_SKIP] if lists.is_dir() else []
    sources = part_files(config.find_file("Dir::Etc::SourceParts"), ("list", "sources"), bare=False)
    paths += [config.find_file("Dir::Etc::SourceList"), *sources, *preference_files(config)]
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            h.update(f"{path}:absent\n".encode())
            continue
        h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
