"""Lab profiles: plain TOML files naming packages, files, helpers and start commands."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nephoscope.core.errors import ProfileError

BUILTIN_DIR = Path(__file__).parent / "profiles"
VERSION_POLICIES = ("newest", "oldest")


@dataclass(frozen=True, slots=True)
class PackageSpec:
    """A Debian package to put in the guest; `version` is newest, oldest or an exact version."""

    name: str
    version: str = "newest"


@dataclass(frozen=True, slots=True)
class Service:
    """A process the guest's init starts and reports; techniques carry what they are expected to do."""

    tag: str
    command: str = ""  # disk profiles: run as its own systemd unit nph-TAG.service (empty: `unit` only)
    binary: str = ""  # the true executable (for renamed, deleted or fileless processes)
    technique: str = ""
    expect: str = ""
    after: str = ""  # shell run once the service started, with $PID set to its pid
    unit: str = ""  # disk profiles: the systemd unit that runs it (a packaged unit, or nph-TAG.service)


@dataclass(frozen=True, slots=True)
class Artifact:
    """A file made on the host at build time: a compiled helper or a trojaned copy of a binary."""

    kind: str  # "compile" | "trojan" | "kmodule" | "wheel" (disk profiles: a program out of a PyPI wheel)
    output: str  # path inside the guest
    source: str  # helper source file name (compile), guest path of the original (trojan), module name (kmodule),
    # pinned requirement NAME==VERSION (wheel)
    flags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Profile:
    """A complete guest description."""

    name: str
    description: str
    packages: tuple[PackageSpec, ...]
    modules: tuple[str, ...]
    files: dict[str, str]
    setup: tuple[str, ...]
    services: tuple[Service, ...]
    artifacts: tuple[Artifact, ...]
    source: str = field(default="", compare=False)
    # techniques without a process of their own (kernel-level: a hidden module, a hook): id, expect, module
    kernel_techniques: tuple[dict[str, str], ...] = ()
    boot: str = "initramfs"  # "initramfs" (busybox init) or "disk" (a Debian system on an ext4 disk image)
    mem: str = ""  # default guest RAM for this profile ("" = the runner's default)
    disk_size: str = "3G"  # disk profiles: size of the ext4 image

    def package(self, name: str) -> PackageSpec | None:
        """Return the spec for package `name`, if the profile lists it."""
        return next((p for p in self.packages if p.name == name), None)


def list_profiles() -> list[str]:
    """Return the names of the built-in profiles."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))


def _resolve_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.exists():
        return path
    builtin = BUILTIN_DIR / f"{name_or_path}.toml"
    if builtin.exists():
        return builtin
    raise ProfileError(f"unknown profile {name_or_path!r}: use one of {', '.join(list_profiles())} "
                       "or the path of a .toml profile file")


def _as_list(raw: dict[str, Any], key: str, where: Path) -> list[Any]:
    value = raw.get(key, [])
    if not isinstance(value, list):
        raise ProfileError(f"{where}: `{key}` must be a list")
    return value


def _raw(name_or_path: str, seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], str]:
    path = _resolve_path(name_or_path).resolve()
    if path in seen:
        raise ProfileError(f"profile {path} extends itself (cycle: {' -> '.join(map(str, seen))})")
    try:
        text = path.read_text()
        raw = tomllib.loads(text)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ProfileError(f"cannot read profile {path}: {exc}") from exc
    base = raw.get("extends")
    if not base:
        return raw, text
    parent, parent_text = _raw(str(path.parent / f"{base}.toml") if (path.parent / f"{base}.toml").exists()
                               else base, (*seen, path))
    merged = dict(parent)
    for key, value in raw.items():
        if isinstance(value, list) and isinstance(parent.get(key), list):
            merged[key] = parent[key] + value
        elif isinstance(value, dict) and isinstance(parent.get(key), dict):
            merged[key] = {**parent[key], **value}
        else:
            merged[key] = value
    return merged, parent_text + "\n" + text


def load_profile(name_or_path: str) -> Profile:
    """Load and validate a built-in profile by name, or a profile file by path."""
    raw, text = _raw(name_or_path)
    where = _resolve_path(name_or_path)
    try:
        packages = []
        for p in _as_list(raw, "packages", where):
            spec = PackageSpec(p) if isinstance(p, str) else PackageSpec(p["name"], p.get("version", "newest"))
            packages.append(spec)
        boot = str(raw.get("boot", "initramfs"))
        services = [Service(tag=s["tag"], command=s["command"] if boot != "disk" else s.get("command", ""),
                            binary=s.get("binary", ""), technique=s.get("technique", ""),
                            expect=s.get("expect", ""), after=s.get("after", ""),
                            unit=s.get("unit") or (f"nph-{s['tag']}.service" if boot == "disk" else ""))
                    for s in _as_list(raw, "services", where)]
        artifacts = [Artifact(kind=a["kind"], output=a["output"], source=a["source"],
                              flags=tuple(a.get("flags", ())))
                     for a in _as_list(raw, "artifacts", where)]
    except (KeyError, TypeError, ValueError) as exc:
        raise ProfileError(f"{where}: malformed entry ({exc!r}); see docs/profiles.md") from exc
    tags = [s.tag for s in services]
    if len(set(tags)) != len(tags):
        raise ProfileError(f"{where}: service tags must be unique, got {tags}")
    for a in artifacts:
        if a.kind not in ("compile", "trojan", "kmodule", "wheel"):
            raise ProfileError(f"{where}: artifact kind {a.kind!r} is not compile, trojan, kmodule or wheel")
        if a.kind == "wheel" and (boot != "disk" or "==" not in a.source):
            raise ProfileError(f"{where}: a wheel artifact needs a disk profile and a pinned NAME==VERSION source")
    if boot not in ("initramfs", "disk"):
        raise ProfileError(f"{where}: boot must be initramfs or disk, not {boot!r}")
    files = raw.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise ProfileError(f"{where}: `files` must map guest paths to file contents")
    return Profile(
        name=str(raw.get("name", where.stem)),
        description=str(raw.get("description", "")),
        packages=tuple(packages),
        modules=tuple(_as_list(raw, "modules", where)),
        files=dict(files),
        setup=tuple(_as_list(raw, "setup", where)),
        services=tuple(services),
        artifacts=tuple(artifacts),
        source=text,
        kernel_techniques=tuple(_kernel_techniques(raw, where)),
        boot=boot,
        mem=str(raw.get("mem", "")),
        disk_size=str(raw.get("disk_size", "3G")),
    )


def _kernel_techniques(raw: dict[str, Any], where: Path) -> list[dict[str, str]]:
    """Return the profile's `kernel_techniques` entries (each needs an `id`; values are strings)."""
    out = []
    for entry in _as_list(raw, "kernel_techniques", where):
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or \
                not all(isinstance(v, str) for v in entry.values()):
            raise ProfileError(f"{where}: each kernel_techniques entry needs a string `id` (got {entry!r})")
        out.append(dict(entry))
    return out
