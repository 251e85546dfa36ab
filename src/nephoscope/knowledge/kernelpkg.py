"""The Debian kernel package in the KB: the vmlinux inside vmlinuz and every module's .ko, kept as the sections
kernel-code verification needs (text, the patch-site tables, relocations, symbols).

Storage: one row per image in the KB's `kernel_code` table (package, kind "vmlinux" or "module", name, path,
sha256 of the file, a zlib-compressed blob). A blob is a JSON header (sections: name, addr, type, flags, info,
link, entsize, size, offset into the body) followed by the sections' bytes; "relocs" (vmlinux) is the
KASLR relocation table the boot decompressor applies. Addresses are link-time: vmlinux sections at their
0xffffffff81000000-based addresses, module sections at 0 (a .ko is relocatable).
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from elftools.elf.elffile import ELFFile

from nephoscope.core.errors import GuestDataError, KnowledgeError
from nephoscope.knowledge.elfpages import PARSE_ERRORS

Progress = Callable[[str], None]
VMLINUX_SECTIONS = (".text", ".rodata", ".data", ".init.data", ".altinstructions", ".altinstr_replacement",
                    ".parainstructions", ".retpoline_sites", ".return_sites", ".call_sites", ".smp_locks",
                    ".ibt_endbr_seal", ".static_call_sites")
RUNTIME_CONST = ("runtime_ptr_", "runtime_shift_")  # 6.11+ runtime constants: one section per variable
MODULE_TABLES = (".altinstructions", ".altinstr_replacement", ".parainstructions", "__jump_table",
                 ".static_call_sites", ".retpoline_sites", ".return_sites", ".call_sites", ".smp_locks",
                 "__mcount_loc", "__patchable_function_entries", ".ibt_endbr_seal", ".symtab", ".strtab")
SHF_ALLOC, SHF_EXECINSTR = 0x2, 0x4
HEADER_ONLY = "HEADER"  # a section kept for its index and name only (no bytes)
MAX_MODULE_BYTES = 64 << 20
MAX_BLOB = 512 << 20
SCHEMA = """
CREATE TABLE IF NOT EXISTS kernel_code(
  id INTEGER PRIMARY KEY, package_id INTEGER NOT NULL REFERENCES packages(id), kind TEXT NOT NULL,
  name TEXT NOT NULL, path TEXT NOT NULL, sha256 BLOB NOT NULL, data BLOB NOT NULL,
  UNIQUE(package_id, kind, name));
CREATE INDEX IF NOT EXISTS kernel_code_name ON kernel_code(kind, name);
"""


@dataclass(frozen=True, slots=True)
class Section:
    """One ELF section of a kernel image (addr link-time; 0 for .ko sections)."""

    name: str
    addr: int
    type: str
    flags: int
    info: int
    link: int
    entsize: int
    data: bytes
    index: int = 0  # the section's index in its ELF (relocations and symbols name sections by index)

    @property
    def executable(self) -> bool:
        return bool(self.flags & SHF_EXECINSTR) and bool(self.flags & SHF_ALLOC)


@dataclass(slots=True)
class KernelImageFile:
    """A vmlinux or .ko as the KB keeps it: its sections by name (and index), and where it came from."""

    kind: str  # "vmlinux" | "module"
    name: str  # kernel release, or module name (dashes as underscores, like /proc/modules)
    path: str
    sha256: str
    sections: dict[str, Section] = field(default_factory=dict)
    package: str = ""
    version: str = ""

    def by_index(self) -> dict[int, Section]:
        """Return the sections by ELF index."""
        return {s.index: s for s in self.sections.values()}

    def executable(self) -> list[Section]:
        """Return the executable (SHF_ALLOC|SHF_EXECINSTR) sections."""
        return [s for s in self.sections.values() if s.executable]

    def to_blob(self) -> bytes:
        """Return the compressed storage form."""
        header, body, at = [], [], 0
        for s in self.sections.values():
            header.append({"name": s.name, "addr": s.addr, "type": s.type, "flags": s.flags, "info": s.info,
                           "link": s.link, "entsize": s.entsize, "size": len(s.data), "at": at, "index": s.index})
            body.append(s.data)
            at += len(s.data)
        head = json.dumps({"kind": self.kind, "name": self.name, "path": self.path, "sections": header}).encode()
        return zlib.compress(struct.pack("<I", len(head)) + head + b"".join(body), 1)

    @classmethod
    def from_blob(cls, blob: bytes, sha256: str = "", package: str = "", version: str = "") -> KernelImageFile:
        """Read the storage form back; KnowledgeError when it is damaged."""
        try:
            raw = zlib.decompressobj().decompress(blob, MAX_BLOB)
            (n,) = struct.unpack_from("<I", raw)
            head = json.loads(raw[4:4 + n])
            body = memoryview(raw)[4 + n:]
            out = cls(head["kind"], head["name"], head["path"], sha256, package=package, version=version)
            for h in head["sections"]:
                data = bytes(body[h["at"]:h["at"] + h["size"]])
                if len(data) != h["size"]:
                    raise ValueError(f"section {h['name']} is cut short")
                out.sections[h["name"]] = Section(h["name"], h["addr"], h["type"], h["flags"], h["info"], h["link"],
                                                  h["entsize"], data, h["index"])
        except (zlib.error, ValueError, KeyError, TypeError, struct.error) as exc:
            raise KnowledgeError(f"the KB's kernel code blob is damaged ({exc}); re-add the kernel package") from exc
        return out


def _elf(data: bytes, what: str) -> ELFFile:
    try:
        return ELFFile(io.BytesIO(data))
    except PARSE_ERRORS as exc:
        raise GuestDataError(f"{what} is not an ELF file: {exc}") from exc


def _section(sec: object, index: int) -> Section:
    h = sec.header  # type: ignore[attr-defined]
    data = b"" if h["sh_type"] == "SHT_NOBITS" else sec.data()  # type: ignore[attr-defined]
    return Section(sec.name, h["sh_addr"], h["sh_type"], h["sh_flags"], h["sh_info"],  # type: ignore[attr-defined]
                   h["sh_link"], h["sh_entsize"], data, index)


def vmlinux_image(vmlinuz: bytes, release: str, path: str) -> KernelImageFile:
    """Return the verification sections of the vmlinux inside a bzImage (and its KASLR relocation table)."""
    from nephoscope.knowledge.ingest import decompress_bzimage

    payload = vmlinuz if vmlinuz[:4] == b"\x7fELF" else decompress_bzimage(vmlinuz)
    elf = _elf(payload, f"the vmlinux of {path}")
    out = KernelImageFile("vmlinux", release, path, hashlib.sha256(vmlinuz).hexdigest())
    try:
        end = elf["e_shoff"] + elf["e_shnum"] * elf["e_shentsize"]
        for i, sec in enumerate(elf.iter_sections()):
            if sec.name in VMLINUX_SECTIONS or sec.name.startswith(RUNTIME_CONST):
                out.sections[sec.name] = _section(sec, i)
            if sec["sh_type"] != "SHT_NOBITS":
                end = max(end, sec["sh_offset"] + sec["sh_size"])
    except PARSE_ERRORS as exc:
        raise GuestDataError(f"the vmlinux of {path} has unreadable sections: {exc}") from exc
    if ".text" not in out.sections:
        raise GuestDataError(f"the vmlinux of {path} has no .text section")
    # arch/x86/boot/compressed: the payload is vmlinux.bin followed by vmlinux.relocs
    out.sections["relocs"] = Section("relocs", 0, "RELOCS", 0, 0, 0, 4, payload[end:], -1)
    return out


def module_name(path: str) -> str:
    """Return the module name the kernel uses for a .ko path (dashes become underscores)."""
    base = path.rsplit("/", 1)[-1]
    return base[: base.index(".ko")].replace("-", "_") if ".ko" in base else base


def module_image(data: bytes, path: str) -> KernelImageFile:
    """Return the verification sections of one .ko (executable sections, site tables, their relocations)."""
    elf = _elf(data, path)
    out = KernelImageFile("module", module_name(path), path, hashlib.sha256(data).hexdigest())
    try:
        sections = list(elf.iter_sections())
        keep = {i for i, s in enumerate(sections)
                if (s["sh_flags"] & SHF_EXECINSTR and s["sh_flags"] & SHF_ALLOC) or s.name in MODULE_TABLES}
        for i, sec in enumerate(sections):
            if i in keep or (sec["sh_type"] in ("SHT_RELA", "SHT_REL") and sec["sh_info"] in keep):
                out.sections[sec.name] = _section(sec, i)
            elif sec["sh_flags"] & SHF_ALLOC and sec.name not in out.sections:
                # where the kernel puts other sections decides what relocations in the text resolve to;
                # their bytes are not needed
                h = sec.header
                out.sections[sec.name] = Section(sec.name, 0, HEADER_ONLY, h["sh_flags"], h["sh_info"], h["sh_link"],
                                                 h["sh_entsize"], b"", i)
    except PARSE_ERRORS as exc:
        raise GuestDataError(f"{path}: unreadable sections: {exc}") from exc
    return out


def read_module_file(path: Path) -> bytes:
    """Return a module file's ELF bytes (.ko, .ko.xz; .ko.zst with the zstd tool)."""
    data = path.read_bytes()
    if len(data) > MAX_MODULE_BYTES:
        raise GuestDataError(f"{path}: {len(data)} bytes is too large for a kernel module")
    try:
        if path.name.endswith(".ko.xz"):
            return lzma.decompress(data)
        if path.name.endswith(".ko.zst"):
            import subprocess

            proc = subprocess.run(["zstd", "-dcq"], input=data, capture_output=True, check=False)
            if proc.returncode != 0:
                raise GuestDataError(f"{path}: does not decompress with zstd ({proc.stderr[:200]!r})")
            return proc.stdout
    except (lzma.LZMAError, OSError) as exc:
        raise GuestDataError(f"{path}: does not decompress ({exc})") from exc
    return data


def iter_kernel_files(root: Path) -> Iterator[tuple[str, str, Path]]:
    """Yield (kind, release, path) of every vmlinuz and module of an unpacked linux-image package."""
    for vmlinuz in sorted((root / "boot").glob("vmlinuz-*")):
        yield "vmlinux", vmlinuz.name.removeprefix("vmlinuz-"), vmlinuz
    for base in (root / "lib" / "modules", root / "usr" / "lib" / "modules"):
        if base.is_dir():
            for ko in sorted(base.rglob("*.ko*")):
                if ko.name.endswith((".ko", ".ko.xz", ".ko.zst")) and ko.is_file():
                    yield "module", ko.relative_to(base).parts[0], ko


class KernelStore:
    """The KB's kernel images (the `kernel_code` table of the code-page DB's SQLite file)."""

    def __init__(self, conn: object) -> None:
        import sqlite3

        self._conn: sqlite3.Connection = conn  # type: ignore[assignment]
        try:
            self._conn.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise KnowledgeError(f"cannot prepare the KB's kernel_code table: {exc}") from exc

    def add(self, package_id: int, image: KernelImageFile) -> bool:
        """Store one image; return False when it was already stored."""
        cur = self._conn.execute("INSERT OR IGNORE INTO kernel_code(package_id, kind, name, path, sha256, data) "
                                 "VALUES (?,?,?,?,?,?)", (package_id, image.kind, image.name, image.path,
                                                          bytes.fromhex(image.sha256), image.to_blob()))
        return cur.rowcount > 0

    def find_vmlinux(self, release: str) -> KernelImageFile | None:
        """Return the vmlinux of kernel `release` (e.g. 6.1.0-57-amd64), or None when no package has it."""
        return self._find("vmlinux", release, release)

    def find_module(self, release: str, name: str) -> KernelImageFile | None:
        """Return module `name` of kernel `release`, or None when the KB lacks it."""
        return self._find("module", name, release)

    def _find(self, kind: str, name: str, release: str) -> KernelImageFile | None:
        rows = self._conn.execute(
            "SELECT k.data, k.sha256, p.name, p.version, k.path FROM kernel_code k "
            "JOIN packages p ON p.id = k.package_id WHERE k.kind=? AND k.name=?", (kind, name)).fetchall()
        for data, sha, package, version, path in rows:
            if kind == "vmlinux" or f"/{release}/" in f"/{path}" or path.startswith(release + "/"):
                return KernelImageFile.from_blob(bytes(data), bytes(sha).hex(), package, version)
        return None

    def add_module_list(self, package_id: int, release: str, names: set[str]) -> bool:
        """Store the names of every module a kernel package ships for `release` (stored .ko or not)."""
        body = json.dumps(sorted(names)).encode()
        cur = self._conn.execute("INSERT OR REPLACE INTO kernel_code(package_id, kind, name, path, sha256, data) "
                                 "VALUES (?,?,?,?,?,?)", (package_id, "module-list", release, f"{release}/",
                                                          hashlib.sha256(body).digest(), zlib.compress(body)))
        return cur.rowcount > 0

    def module_names(self, release: str) -> set[str] | None:
        """Return the module names the KB's kernel package of `release` ships, or None when the KB has no list."""
        row = self._conn.execute("SELECT data FROM kernel_code WHERE kind='module-list' AND name=?",
                                 (release,)).fetchone()
        if row is None:
            return None
        try:
            names = json.loads(zlib.decompress(bytes(row[0])))
        except (zlib.error, ValueError) as exc:
            raise KnowledgeError(f"the KB's module list of kernel {release} is corrupt ({exc})") from exc
        return {str(n) for n in names}

    def has_package(self, package: str, version: str) -> bool:
        """Return whether the vmlinux of this linux-image package version is stored."""
        return self._conn.execute(
            "SELECT 1 FROM kernel_code k JOIN packages p ON p.id = k.package_id "
            "WHERE k.kind='vmlinux' AND p.name=? AND p.version=?", (package, version)).fetchone() is not None

    def releases(self) -> list[tuple[str, str, str]]:
        """Return (release, package, version) of every stored vmlinux."""
        return [tuple(r) for r in self._conn.execute(
            "SELECT k.name, p.name, p.version FROM kernel_code k JOIN packages p ON p.id = k.package_id "
            "WHERE k.kind='vmlinux' ORDER BY k.name")]


def ingest_kernel_tree(store: KernelStore, package_id: int, root: Path, progress: Progress = lambda _m: None,
                       only_modules: set[str] | None = None) -> tuple[int, list[tuple[str, str]]]:
    """Store the vmlinux and modules of an unpacked linux-image package; return (images added, errors).

    `only_modules` limits the modules stored (by kernel module name) — the vmlinux is always stored."""
    added, errors = 0, []
    shipped: dict[str, set[str]] = {}  # release -> every module name the package ships (stored or not)
    for kind, release, path in iter_kernel_files(root):
        rel = f"{release}/{path.name}" if kind == "module" else f"/boot/{path.name}"
        if kind == "module":
            rel = path.as_posix()[path.as_posix().index(f"/{release}/") + 1:]
            shipped.setdefault(release, set()).add(module_name(path.name))
            if only_modules is not None and module_name(path.name) not in only_modules:
                continue
        try:
            if kind == "vmlinux":
                progress(f"extracting the kernel code of {path.name}")
                image = vmlinux_image(path.read_bytes(), release, rel)
            else:
                image = module_image(read_module_file(path), rel)
            added += store.add(package_id, image)
        except (GuestDataError, OSError) as exc:
            errors.append((rel, str(exc)))
    for release, names in shipped.items():
        store.add_module_list(package_id, release, names)
    return added, errors
