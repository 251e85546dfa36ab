"""Fill the code-page DB from .deb files, apt, unpacked root filesystems, single ELF files and vmlinuz vdsos."""

from __future__ import annotations

import dataclasses
import io
import lzma
import os
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from debian import deb822
from elftools.elf.elffile import ELFFile

from nephoscope.core.errors import GuestDataError, KnowledgeError, NephoscopeError
from nephoscope.core.paths import cache_root
from nephoscope.knowledge.binaries import CodePageDB, PackageMeta
from nephoscope.knowledge.elfpages import ELF_MAGIC, PARSE_ERRORS, PageInfo, exec_pages, page_at
from nephoscope.knowledge.pagehash import PAGE_SIZE, page_digest

Progress = Callable[[str], None]
MAX_FILE_BYTES = 1 << 30
LOCAL = "(local)"
VDSO_PATH = "[vdso]"
_MAPPABLE_TYPES = (2, 3)  # ET_EXEC, ET_DYN: the only types the kernel or ld.so map


@dataclass(slots=True)
class IngestReport:
    """What one `kb add` did: packages touched, files and pages added, per-file errors."""

    packages: list[str] = field(default_factory=list)
    files_added: int = 0
    files_known: int = 0
    pages_added: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)

    def merge(self, other: IngestReport) -> None:
        """Add another report's counts to this one."""
        self.packages += other.packages
        self.files_added += other.files_added
        self.files_known += other.files_known
        self.pages_added += other.pages_added
        self.errors += other.errors


def _mappable(head: bytes) -> bool:
    """Return whether an ELF header's e_type is one that gets mapped (cheap pre-filter)."""
    if len(head) < 18 or head[:4] != ELF_MAGIC or head[5] not in (1, 2):
        return False
    return struct.unpack_from("<H" if head[5] == 1 else ">H", head, 16)[0] in _MAPPABLE_TYPES


def add_bytes(db: CodePageDB, package_id: int, path: str, data: bytes, report: IngestReport) -> None:
    """Hash one ELF file's bytes into the DB, recording a per-file error instead of raising."""
    try:
        elf = exec_pages(data)
    except GuestDataError as exc:
        report.errors.append((path, str(exc)))
        return
    if not elf.pages:
        return
    added = db.add_file(package_id, path, elf)
    report.files_added += added > 0
    report.files_known += added == 0
    report.pages_added += added


def ingest_tree(db: CodePageDB, root: Path, meta: PackageMeta, progress: Progress = lambda _m: None,
                owners: dict[str, PackageMeta] | None = None) -> IngestReport:
    """Ingest every mappable ELF file under `root` (symlinks not followed) as files of `meta` or their owner."""
    report = IngestReport(packages=[f"{meta.name}={meta.version}"])
    ids: dict[PackageMeta, int] = {meta: db.package_id(meta)} if not owners else {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            rel = "/" + full.relative_to(root).as_posix()
            try:
                st = full.lstat()
                if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE_BYTES:
                    continue
                with full.open("rb") as f:
                    if not _mappable(f.read(64)):
                        continue
                    f.seek(0)
                    data = f.read()
            except OSError as exc:
                report.errors.append((rel, f"unreadable: {exc}"))
                continue
            owner = (owners or {}).get(_merged(rel), meta)
            if owner not in ids:
                ids[owner] = db.package_id(owner)
            add_bytes(db, ids[owner], rel, data, report)
    if owners:
        report.packages = sorted({f"{m.name}={m.version}" for m in ids})
    progress(f"{meta.name} {meta.version}: {report.files_added} new files, {report.pages_added} pages")
    return report


def _merged(path: str) -> str:
    """Map /bin, /sbin, /lib* paths to their merged-/usr location (how dpkg lists and disks differ)."""
    head = path.split("/", 2)[1] if path.count("/") >= 2 else ""
    return "/usr" + path if head in ("bin", "sbin", "lib", "lib32", "lib64", "libx32") else path


def dpkg_owners(root: Path, origin: str) -> dict[str, PackageMeta]:
    """Map merged-/usr paths to their installed package, from a root filesystem's dpkg database."""
    owners: dict[str, PackageMeta] = {}
    dpkg = root / "var" / "lib" / "dpkg"
    with (dpkg / "status").open(encoding="utf-8", errors="replace") as f:
        for para in deb822.Deb822.iter_paragraphs(f):
            name, version, arch = para.get("Package", ""), para.get("Version", ""), para.get("Architecture", "")
            if not name or "installed" not in para.get("Status", "").split():
                continue
            source, _, rest = para.get("Source", name).partition(" ")
            meta = PackageMeta(name, version, arch, source, rest.strip("() ") or version, origin)
            for listing in (dpkg / "info" / f"{name}.list", dpkg / "info" / f"{name}:{arch}.list"):
                if listing.is_file():
                    for line in listing.read_text(errors="replace").splitlines():
                        owners[_merged(line.strip())] = meta
    return owners


def add_vdso(db: CodePageDB, package_id: int, image: bytes, report: IngestReport) -> None:
    """Store a vdso image: the kernel maps all of its pages executable, not only the PT_LOAD."""
    elf = exec_pages(image)
    pages = tuple(PageInfo(off, off, page_digest(page_at(image, off))) for off in range(0, len(image), PAGE_SIZE))
    added = db.add_file(package_id, VDSO_PATH, dataclasses.replace(elf, pages=pages))
    report.files_added += added > 0
    report.files_known += added == 0
    report.pages_added += added


def ingest_unpacked(db: CodePageDB, unpacked: Path, origin: str, progress: Progress = lambda _m: None) -> IngestReport:
    """Ingest a .deb unpacked by `nephoscope.knowledge.debian.archive.unpack` (control/ and root/)."""
    try:
        control = deb822.Deb822((unpacked / "control" / "control").read_text(errors="replace"))
    except OSError as exc:
        raise GuestDataError(f"{unpacked} has no readable control/control: {exc}") from exc
    name, version = control.get("Package", ""), control.get("Version", "")
    if not name or not version:
        raise GuestDataError(f"{origin}: control file lacks Package or Version")
    source, _, rest = control.get("Source", name).partition(" ")
    meta = PackageMeta(name, version, control.get("Architecture", ""), source,
                       rest.strip("() ") or version, origin)
    report = ingest_tree(db, unpacked / "root", meta, progress)
    add_scripts(db, unpacked / "root", name, version, report)
    if name.startswith("linux-image-"):
        package_id = db.package_id(meta)
        from nephoscope.knowledge.kernelpkg import ingest_kernel_tree

        progress(f"storing the kernel code of {name} (vmlinux and modules, for kernel-code verification)")
        _added, errors = ingest_kernel_tree(db.kernel_store(), package_id, unpacked / "root", progress)
        report.errors += errors
        for vmlinuz in sorted((unpacked / "root" / "boot").glob("vmlinuz-*")):
            progress(f"extracting the vdso from {vmlinuz.name}")
            try:
                add_vdso(db, package_id, extract_vdso(vmlinuz.read_bytes()), report)
            except (GuestDataError, OSError) as exc:
                report.errors.append((VDSO_PATH, str(exc)))
    db.commit()
    return report


def add_scripts(db: CodePageDB, root: Path, name: str, version: str, report: IngestReport) -> None:
    """Hash the package's script files (.py, .php, .jar, ... and CPython's pycs) into the KB (knowledge/scripts)."""
    from nephoscope.knowledge.scripts import ScriptDB

    db.commit()
    try:
        with ScriptDB(db.path) as scripts:
            scripts.add_tree(root, name, version)
    except KnowledgeError as exc:
        report.errors.append((name, f"script hashes: {exc}"))


def ingest_deb(db: CodePageDB, deb: Path, progress: Progress = lambda _m: None) -> IngestReport:
    """Unpack (cached) and ingest one .deb file."""
    from nephoscope.knowledge.debian import archive
    with deb.open("rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise GuestDataError(f"{deb} is not a Debian package (no ar archive header)")
    progress(f"unpacking {deb.name}")
    if deb.resolve().parent == (cache_root() / "debs").resolve():  # apt's cache: names are unique
        return ingest_unpacked(db, archive.unpack(deb, cache_root() / "unpacked"), str(deb), progress)
    with tempfile.TemporaryDirectory(prefix="nephoscope-kb-") as tmp:  # a same-named local .deb may differ
        return ingest_unpacked(db, archive.unpack(deb, Path(tmp)), str(deb), progress)


def ingest_apt(db: CodePageDB, spec: str, progress: Progress = lambda _m: None) -> IngestReport:
    """Download NAME[=VERSION] (newest when no version is given) with apt and ingest it."""
    from nephoscope.knowledge.debian import archive
    name, _, version = spec.partition("=")
    if not version:
        versions = archive.available_versions(name)
        if not versions:
            raise GuestDataError(f"apt knows no package {name!r}; run `apt-get update` or check the name")
        version = versions[0]
    if db.has_package(name, version):  # packages are committed whole, so a stored one is complete
        if name.startswith("linux-image-") and not db.kernel_store().has_package(name, version):
            return _add_kernel_code(db, name, version, progress)  # stored before the KB kept kernel code
        progress(f"{name} {version} is already in the KB")
        # (packages stored before the KB kept script hashes: `nephoscope scripts --ingest NAME=VERSION`)
        return IngestReport(packages=[f"{name}={version}"])
    progress(f"downloading {name} {version}")
    return ingest_deb(db, archive.download(name, version, cache_root() / "debs"), progress)


def _add_kernel_code(db: CodePageDB, name: str, version: str, progress: Progress) -> IngestReport:
    """Store the kernel code of a linux-image package whose pages an older KB already holds."""
    from nephoscope.knowledge.debian import archive
    from nephoscope.knowledge.kernelpkg import ingest_kernel_tree

    report = IngestReport(packages=[f"{name}={version}"])
    deb = archive.download(name, version, cache_root() / "debs")
    unpacked = archive.unpack(deb, cache_root() / "unpacked")
    try:
        control = deb822.Deb822((unpacked / "control" / "control").read_text(errors="replace"))
    except OSError as exc:
        raise GuestDataError(f"{unpacked} has no readable control/control: {exc}") from exc
    package_id = db.package_id(PackageMeta(name, version, control.get("Architecture", "")))  # the stored row
    progress(f"storing the kernel code of {name} {version} (the KB had its pages only)")
    _added, report.errors = ingest_kernel_tree(db.kernel_store(), package_id, unpacked / "root", progress)
    db.commit()
    return report


def ingest_path(db: CodePageDB, path: Path, progress: Progress = lambda _m: None,
                meta: PackageMeta | None = None) -> IngestReport:
    """Ingest a .deb, a directory of .debs, an unpacked .deb, a root filesystem or one ELF file."""
    report = IngestReport()
    try:
        if path.is_dir() and (path / "control" / "control").is_file() and (path / "root").is_dir():
            return ingest_unpacked(db, path, str(path), progress)
        if path.is_dir() and not meta and any(path.glob("*.deb")):
            for deb in sorted(path.glob("*.deb")):
                try:
                    report.merge(ingest_deb(db, deb, progress))
                except NephoscopeError as exc:
                    report.errors.append((str(deb), str(exc)))
            return report
        local = meta or PackageMeta(LOCAL, "", "", origin=str(path.resolve()))
        if path.is_dir():
            status = path / "var" / "lib" / "dpkg" / "status"
            owners = dpkg_owners(path, str(path.resolve())) if status.is_file() and not meta else None
            report = ingest_tree(db, path, local, progress, owners)
        elif path.suffix == ".deb" and not meta:
            return ingest_deb(db, path, progress)
        else:
            report = IngestReport(packages=[f"{local.name}={local.version}"])
            add_bytes(db, db.package_id(local), str(path.resolve()) if local.name == LOCAL else path.name,
                      path.read_bytes(), report)
        db.commit()
    except (NephoscopeError, OSError) as exc:
        report.errors.append((str(path), str(exc)))
    return report


# --- the vdso, embedded in the kernel image -------------------------------------------------------

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def decompress_bzimage(image: bytes) -> bytes:
    """Return the vmlinux inside an x86 bzImage (xz payloads, or zstd with the `zstd` tool; others raise)."""
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        raise GuestDataError("not an x86 bzImage (no HdrS setup header)")
    setup_sects = image[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = image[start:start + payload_length]
    if payload.startswith(ZSTD_MAGIC):  # Debian 6.12+
        return _unzstd(payload[:-4])  # the kernel appends the 4-byte decompressed size
    if not payload.startswith(b"\xfd7zXZ\x00"):
        raise GuestDataError(f"bzImage payload compression {payload[:6].hex()} is not supported (xz or zstd)")
    try:
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    except lzma.LZMAError as exc:
        raise GuestDataError(f"bzImage payload does not decompress: {exc}") from exc


def _unzstd(payload: bytes) -> bytes:
    """Decompress a zstd frame with the `zstd` tool (Python 3.11 has no zstd module)."""
    if shutil.which("zstd") is None:
        raise GuestDataError("bzImage payload is zstd-compressed and the `zstd` tool is missing (apt install zstd)")
    proc = subprocess.run(["zstd", "-dcq"], input=payload, capture_output=True, check=False)
    if proc.returncode != 0 or not proc.stdout:
        raise GuestDataError(f"bzImage zstd payload does not decompress: {proc.stderr.decode(errors='replace')[:200]}")
    return proc.stdout


def extract_vdso(image: bytes) -> bytes:
    """Return the 64-bit vdso ELF image (padded to whole pages) embedded in a bzImage or vmlinux."""
    vmlinux = image if image[:4] == ELF_MAGIC else decompress_bzimage(image)
    pos = 1
    while (pos := vmlinux.find(ELF_MAGIC + b"\x02\x01\x01", pos)) >= 0:
        window = vmlinux[pos:pos + (1 << 16)]
        if b"linux-vdso.so.1" in window:
            try:
                elf = ELFFile(io.BytesIO(window))
                size = elf["e_shoff"] + elf["e_shnum"] * elf["e_shentsize"] if elf["e_type"] == "ET_DYN" else 0
            except PARSE_ERRORS:
                size = 0
            if 0 < size <= len(window):
                size = -(-size // PAGE_SIZE) * PAGE_SIZE
                return vmlinux[pos:pos + size].ljust(size, b"\0")
        pos += 1
    raise GuestDataError("no ELF with soname linux-vdso.so.1 found in the kernel image")


def ingest_specs(db: CodePageDB, specs: list[str], progress: Progress = lambda _m: None) -> IngestReport:
    """Ingest NAME=VERSION specs through apt; a spec that fails is recorded and the batch goes on."""
    report = IngestReport()
    for i, spec in enumerate(specs, 1):
        progress(f"[{i}/{len(specs)}] {spec}")
        try:
            report.merge(ingest_apt(db, spec, progress))
        except NephoscopeError as exc:
            report.errors.append((spec, str(exc)))
    return report

