"""Build a lab guest image (kernel + initramfs) from Debian packages, cached by package versions."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from debian.debian_support import Version
from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile

from nephoscope.core.errors import LabError
from nephoscope.core.paths import cache_root
from nephoscope.knowledge.debian import archive
from nephoscope.knowledge.debian.relations import Relation, depends_of
from nephoscope.lab.cpio import Entry, write_cpio
from nephoscope.lab.profile import Artifact, Profile
from nephoscope.lab.trojan import patch_text_padding

BUILDER_VERSION = "1"
HELPERS_DIR = Path(__file__).parent / "helpers"
INIT_TEMPLATE = Path(__file__).parent / "init.sh"
# merged /usr: Debian 12 packages still ship some files under /bin, /sbin, /lib, /lib64
MERGED_DIRS = ("bin", "sbin", "lib", "lib64")
LIB_DIRS = ("usr/lib/x86_64-linux-gnu", "usr/lib", "usr/lib64", "usr/local/lib")
Progress = Callable[[str], None]


@dataclass(slots=True)
class KernelChoice:
    """The kernel a guest boots: from a Debian package, or a vmlinuz file given by path."""

    release: str  # uname -r
    vmlinuz: Path
    modules_dir: Path | None
    package: str = ""
    version: str = ""


@dataclass(slots=True)
class Image:
    """A built guest image and what it contains (read from image.json)."""

    directory: Path
    meta: dict = field(default_factory=dict)

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / ("initrd.img" if self.is_disk else "initrd.cpio")

    @property
    def is_disk(self) -> bool:
        """Return whether this image boots a Debian system from a disk image (lab/server.py)."""
        return self.meta.get("boot") == "disk"

    @property
    def disk(self) -> Path:
        return self.directory / "disk.img"

    def owner_of(self, guest_path: str) -> tuple[str, str] | None:
        """Return (package, version) that shipped `guest_path`, or None for non-packaged files."""
        hit = self.meta.get("files", {}).get("/" + normalise_path(guest_path))
        return (hit[0], hit[1]) if hit else None


def normalise_path(path: str) -> str:
    """Map a package path to its merged-/usr location, without leading slash."""
    path = path.lstrip("./").lstrip("/")
    head, _, rest = path.partition("/")
    if head in MERGED_DIRS:
        return f"usr/{head}/{rest}" if rest else f"usr/{head}"
    return path


# --- package resolution ----------------------------------------------------------------------

def _follows(name: str, explicit: set[str]) -> bool:
    # Only explicit packages and shared-library packages are pulled in: maintainer-script helpers
    # (debconf, dpkg, adduser, iproute2, ...) are not needed to run the binaries in a lab guest.
    return name in explicit or name.startswith("lib") or name == "zlib1g"


def resolve_packages(profile: Profile, progress: Progress = lambda _m: None) -> dict[str, str]:
    """Choose a version for every package of the profile and its library dependencies.

    Answered from apt's indexes in-process (no apt-cache run per package); "newest" means apt's candidate."""
    explicit = {p.name for p in profile.packages}
    constraints: dict[str, list[Relation]] = {}
    for _round in range(6):
        selected: dict[str, str] = {}
        queue = [p.name for p in profile.packages]
        new_constraints: dict[str, list[Relation]] = {}
        while queue:
            name = queue.pop(0)
            if name in selected:
                continue
            versions = archive.available_versions(name)
            if not versions:
                raise LabError(f"apt knows no package {name!r}; run `apt-get update` or fix the profile")
            spec = profile.package(name)
            policy = spec.version if spec else "newest"
            if policy == "oldest":
                candidates = list(reversed(versions))
            elif policy == "newest":  # apt's candidate (pins respected) first, then the rest newest first
                preferred = archive.find_candidate(name)
                candidates = list(dict.fromkeys(v for v in (preferred, *versions) if v))
            else:
                if policy not in versions:
                    raise LabError(f"{name}={policy} is not available; apt offers {', '.join(versions)}")
                candidates = [policy]
            wanted = constraints.get(name, [])
            fitting = [v for v in candidates if all(r.allows(v) for r in wanted)]
            if not fitting:
                raise LabError(f"no version of {name} satisfies {', '.join(map(str, wanted))} "
                               f"(available: {', '.join(versions)})")
            selected[name] = fitting[0]
            for group in depends_of(archive.package_record(name, fitting[0])):
                real = [r for r in group if archive.available_versions(r.name)]
                if not real:
                    continue
                pick = next((r for r in real if r.name in selected or r.name in explicit), real[0])
                new_constraints.setdefault(pick.name, []).append(pick)
                if _follows(pick.name, explicit):
                    queue.append(pick.name)
        if all(all(r.allows(selected[n]) for r in rels) for n, rels in new_constraints.items()
               if n in selected):
            progress(f"resolved {len(selected)} packages ({len(explicit)} from the profile, the rest libraries)")
            return selected
        constraints = new_constraints
    raise LabError("package versions did not settle; check the profile's version pins")


# --- kernel ----------------------------------------------------------------------------------

SERIES_RE = re.compile(r"^\d+\.\d+$")
EXTRA_ALIAS = "backports"
KernelPackage = tuple[str, str, tuple[str, ...]]  # package, version, apt options


def choose_kernel(spec: str | None, progress: Progress) -> KernelChoice:
    """Resolve --kernel: None (linux-image-amd64), a release, a series (6.12), `backports` or a vmlinuz path."""
    if spec and ("/" in spec or Path(spec).exists()):
        return _kernel_from_path(spec)
    package, version, options = _kernel_package(spec, progress)
    progress(f"downloading kernel {package} {version}")
    deb = archive.download(package, version, cache_root() / "debs", options)
    root = archive.unpack(deb, cache_root() / "unpacked") / "root"
    vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise LabError(f"{deb.name} holds no /boot/vmlinuz-*; is it a kernel image package?")
    release = vmlinuz[0].name.removeprefix("vmlinuz-")
    modules = root / "lib" / "modules" / release
    return KernelChoice(release, vmlinuz[0], modules if modules.is_dir() else None, package, version)


def _kernel_from_path(spec: str) -> KernelChoice:
    """Return the kernel of a vmlinuz file given by path (modules from ../lib/modules/RELEASE if present)."""
    path = Path(spec).resolve()
    if not path.is_file():
        raise LabError(f"kernel {spec} does not exist; give a vmlinuz path or a Debian kernel release")
    release = path.name.removeprefix("vmlinuz-") if path.name.startswith("vmlinuz-") else "unknown"
    modules = path.parent.parent / "lib" / "modules" / release
    return KernelChoice(release, path, modules if modules.is_dir() else None)


def _kernel_package(spec: str | None, progress: Progress) -> KernelPackage:
    """Return (package, version, apt options) for --kernel; the host's apt first, then the extra suites."""
    if not spec:
        return _newest_kernel([_meta_kernel(())], ())
    if spec == EXTRA_ALIAS:
        options = _extra_apt(progress)
        image = _meta_kernel(options)
        return _newest_kernel([image, f"{image}-unsigned"], options, spec)
    if SERIES_RE.match(spec):
        if names := _series_packages(spec, ()):
            return _newest_kernel(names, ())
        options = _extra_apt(progress)
        return _newest_kernel(_series_packages(spec, options), options, spec)
    package = spec if spec.startswith("linux-image-") else f"linux-image-{spec}"
    if archive.available_versions(package):
        return _newest_kernel([package], ())
    options = _extra_apt(progress)
    return _newest_kernel([package, f"{package}-unsigned"], options, spec)


def _extra_apt(progress: Progress) -> tuple[str, ...]:
    """Return apt options for the private extra-suite setup (refreshing its lists when stale)."""
    progress(f"looking in {', '.join(archive.EXTRA_SUITES)} (private apt lists in {archive.extra_root()})")
    return archive.ensure_extra()


def _meta_kernel(options: tuple[str, ...]) -> str:
    """Return the kernel image package that linux-image-amd64 depends on."""
    meta = archive.available_versions("linux-image-amd64", options)
    if not meta:
        raise LabError("apt knows no linux-image-amd64; run `apt-get update`")
    deps = depends_of(archive.package_record("linux-image-amd64", meta[0], options))
    return next(g[0].name for g in deps if g[0].name.startswith("linux-image-"))


def _series_packages(series: str, options: tuple[str, ...]) -> list[str]:
    """Return the generic amd64 image packages of a kernel series (no -dbg, -cloud or -rt flavours)."""
    pattern = re.compile(rf"^linux-image-{re.escape(series)}\.\d[\d.+a-z~]*(-\d+)?-amd64(-unsigned)?$")
    return [n for n in archive.package_names(f"linux-image-{series}.", options) if pattern.match(n)]


def _newest_kernel(names: list[str], options: tuple[str, ...], spec: str | None = None) -> KernelPackage:
    """Return the newest (package, version) among `names`; a signed image beats -unsigned of one version."""
    found = [(Version(v[0]), not n.endswith("-unsigned"), n, v[0]) for n in names
             if (v := archive.available_versions(n, options))]
    if not found:
        where = f" (also looked in {', '.join(archive.EXTRA_SUITES)})" if options else ""
        wanted = spec or (names[0] if names else "?")
        raise LabError(f"no Debian kernel package for {wanted}{where}; "
                       "try `apt-cache search linux-image-` for names")
    _v, _signed, name, version = max(found)
    return name, version, options


def module_bytes(path: Path) -> bytes:
    """Return a module file's ELF bytes, decompressing .ko.xz / .ko.gz (busybox insmod takes plain .ko)."""
    data = path.read_bytes()
    try:
        if path.name.endswith(".ko.xz"):
            return lzma.decompress(data)
        if path.name.endswith(".ko.gz"):
            return gzip.decompress(data)
    except (lzma.LZMAError, OSError, EOFError) as exc:
        raise LabError(f"cannot decompress kernel module {path}: {exc}") from exc
    if not path.name.endswith(".ko"):
        raise LabError(f"kernel module {path} has a compression the lab cannot undo (use .ko, .ko.xz or .ko.gz)")
    return data


def module_target(rel: str) -> str:
    """Return the guest path (relative to the modules dir) of a module: always the uncompressed .ko name."""
    return rel[: rel.rindex(".ko") + 3]


def _modinfo_depends(path: Path) -> list[str]:
    """Return the module names a .ko file depends on, from its .modinfo section."""
    try:
        section = ELFFile(io.BytesIO(module_bytes(path))).get_section_by_name(".modinfo")
    except ELFError as exc:
        raise LabError(f"{path} is not a kernel module: {exc}") from exc
    data = section.data() if section is not None else b""
    for item in data.split(b"\0"):
        if item.startswith(b"depends="):
            return [d for d in item[8:].decode(errors="replace").split(",") if d]
    return []


def builtin_modules(modules_dir: Path) -> set[str]:
    """Return the names of modules built into the kernel (modules.builtin), normalised to underscores."""
    listing = modules_dir / "modules.builtin"
    lines = listing.read_text().split() if listing.exists() else []
    return {Path(line).name.split(".ko")[0].replace("-", "_") for line in lines}


def module_closure(modules_dir: Path, names: tuple[str, ...]) -> list[str]:
    """Return module files (relative to modules_dir) for `names`, dependencies first.

    Debian's package has no modules.dep (depmod makes it at install time), so dependencies are read
    from each module's .modinfo. Modules built into the kernel (modules.builtin) need no file."""
    by_name = {p.name.split(".ko")[0].replace("-", "_"): p for p in modules_dir.rglob("*.ko*")}
    builtin = builtin_modules(modules_dir)
    order: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        path = by_name.get(name.replace("-", "_"))
        if path is None and name.replace("-", "_") in builtin:
            return
        if path is None:
            needed_by = " <- ".join(chain) or "the profile"
            raise LabError(f"kernel module {name!r} is not in {modules_dir} (needed by {needed_by})")
        rel = str(path.relative_to(modules_dir))
        if rel in order or name in chain:
            return
        for dep in _modinfo_depends(path):
            visit(dep, (*chain, name))
        order.append(rel)

    for name in names:
        visit(name, ())
    return order


# --- assembling the initramfs ------------------------------------------------------------------

class Tree:
    """The guest's file system under construction: archive path -> Entry, plus who owns each file."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.owners: dict[str, tuple[str, str]] = {}

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub and sub not in self.entries:
                self.entries[sub] = Entry(sub, stat.S_IFDIR | mode)

    def add(self, path: str, data: bytes, mode: int = 0o644, owner: tuple[str, str] | None = None) -> None:
        path = path.strip("/")
        self.mkdir(str(Path(path).parent)) if "/" in path else None
        self.entries[path] = Entry(path, stat.S_IFREG | mode, data)
        if owner:
            self.owners[path] = owner
        else:
            self.owners.pop(path, None)

    def symlink(self, path: str, target: str, owner: tuple[str, str] | None = None) -> None:
        path = path.strip("/")
        self.mkdir(str(Path(path).parent)) if "/" in path else None
        self.entries[path] = Entry(path, stat.S_IFLNK | 0o777, target.encode())
        if owner:
            self.owners[path] = owner

    def add_tree(self, root: Path, owner: tuple[str, str] | None, only: Callable[[str], bool] = lambda _p: True,
                 prefix: str = "") -> None:
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = os.path.relpath(dirpath, root)
            for name in dirnames + filenames:
                src = Path(dirpath) / name
                rel = os.path.normpath(os.path.join(rel_dir, name))
                dest = normalise_path(prefix + rel)
                if not only(dest):
                    continue
                st = src.lstat()
                if stat.S_ISLNK(st.st_mode):
                    target = os.readlink(src)
                    if target.startswith("/"):
                        target = "/" + normalise_path(target)
                    self.symlink(dest, target, owner)
                elif stat.S_ISDIR(st.st_mode):
                    if dest not in self.entries or not stat.S_ISDIR(self.entries[dest].mode):
                        self.mkdir(dest, st.st_mode & 0o7777)
                elif stat.S_ISREG(st.st_mode):
                    self.add(dest, src.read_bytes(), st.st_mode & 0o7777, owner)

    def read(self, path: str, depth: int = 0) -> bytes:
        """Return a file's bytes, following symlinks inside the tree."""
        path = path.strip("/")
        entry = self.entries.get(path)
        if entry is None or depth > 16:
            raise LabError(f"/{path} is not in the guest image")
        if stat.S_ISLNK(entry.mode):
            target = entry.data.decode()
            nxt = target if target.startswith("/") else os.path.normpath(str(Path(path).parent / target))
            return self.read(nxt, depth + 1)
        return entry.data

    def exists(self, path: str) -> bool:
        try:
            self.read(path)
        except LabError:
            return False
        return True


def _needed(data: bytes) -> list[str]:
    try:
        elf = ELFFile(io.BytesIO(data))
        dyn = next((s for s in elf.iter_sections() if isinstance(s, DynamicSection)), None)
        if dyn is None:
            return []
        return [t.needed for t in dyn.iter_tags() if t.entry.d_tag == "DT_NEEDED"]
    except (ELFError, ValueError, KeyError, AttributeError):
        return []


def check_libraries(tree: Tree) -> list[str]:
    """Return 'binary: libX.so' for every DT_NEEDED of an executable that no library dir provides."""
    missing = []
    for path, entry in tree.entries.items():
        if not stat.S_ISREG(entry.mode) or not (entry.mode & 0o111) or not entry.data.startswith(b"\x7fELF"):
            continue
        if not re.match(r"usr/(s?bin|local/s?bin|lib/x86_64-linux-gnu/[^/]+\.so)", path) and "/bin/" not in path:
            continue
        for lib in _needed(entry.data):
            if not any(tree.exists(f"{d}/{lib}") for d in LIB_DIRS):
                missing.append(f"/{path}: {lib}")
    return missing


def compile_artifact(artifact: Artifact, workdir: Path) -> bytes:
    source = HELPERS_DIR / artifact.source
    if not source.exists():
        raise LabError(f"helper source {artifact.source} not found in {HELPERS_DIR}")
    if shutil.which("gcc") is None:
        raise LabError("gcc is missing; run `make setup` to install the build tools")
    out = workdir / Path(artifact.output).name
    flags = list(artifact.flags)
    link = [f for f in flags if f.startswith("-l")]
    cmd = ["gcc", "-O2", "-Wall", *[f for f in flags if not f.startswith("-l")], "-o", str(out), str(source), *link]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LabError(f"compiling {artifact.source} failed: {proc.stderr.strip()[:600]}")
    return out.read_bytes()


def _base_files(tree: Tree, profile: Profile) -> None:
    for d in MERGED_DIRS:
        tree.symlink(d, f"usr/{d}")
    tree.mkdir("usr/local/bin")
    tree.mkdir("usr/local/sbin")
    for d in ("proc", "sys", "dev", "run", "tmp", "root", "etc", "var/log", "var/lib", "var/tmp"):
        tree.mkdir(d)
    tree.symlink("var/run", "/run")
    tree.add("etc/hostname", f"lab-{profile.name}\n".encode())
    tree.add("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33:www-data:/var/www:/bin/false\n"
             b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    tree.add("etc/group", b"root:x:0:\nwww-data:x:33:\nnogroup:x:65534:\n")
    tree.add("etc/shadow", b"root:*:19000:0:99999:7:::\n", 0o600)
    tree.add("etc/nsswitch.conf", b"passwd: files\ngroup: files\nhosts: files\n")
    tree.add("etc/hosts", b"127.0.0.1 localhost\n")


def dpkg_status(packages: dict[str, str]) -> bytes:
    """Return a dpkg status database listing `packages` as installed (what the guest's dpkg would hold)."""
    stanzas = []
    for name, version in sorted(packages.items()):
        record = archive.package_record(name, version)
        fields = [f"Package: {name}", "Status: install ok installed"]
        for key in ("Priority", "Section", "Installed-Size", "Maintainer", "Architecture", "Multi-Arch", "Source"):
            if key in record:
                fields.append(f"{key}: {record[key]}")
        fields.append(f"Version: {version}")
        for key in ("Pre-Depends", "Depends"):
            if key in record:
                fields.append(f"{key}: {record[key]}")
        summary = (record.get("Description") or name).splitlines()[0]
        fields.append(f"Description: {summary}")
        stanzas.append("\n".join(fields) + "\n")
    return "\n".join(stanzas).encode()


def is_compound(command: str) -> bool:
    """Return whether a shell command has operators (outside quotes), so it cannot just be exec'd."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        return any(tok and set(tok) <= set("();<>|&") and tok not in ("<", ">", ">>") for tok in lexer)
    except ValueError:
        return True


def image_key(profile: Profile, packages: dict[str, str], kernel: KernelChoice) -> str:
    """Return the cache key of an image: everything that changes its bytes."""
    h = hashlib.sha256()
    h.update(BUILDER_VERSION.encode())
    h.update(profile.source.encode())
    h.update(json.dumps(sorted(packages.items())).encode())
    h.update(f"{kernel.package}={kernel.version}:{kernel.vmlinuz}".encode())
    h.update(INIT_TEMPLATE.read_bytes())
    for module in ("build.py", "cpio.py", "trojan.py"):
        h.update((Path(__file__).parent / module).read_bytes())
    for helper in sorted(HELPERS_DIR.iterdir()):
        h.update(helper.name.encode() + helper.read_bytes())
    if any(a.kind == "kmodule" for a in profile.artifacts):  # only profiles with kernel modules
        from nephoscope.lab.kmodules import sources_hash

        h.update(b"kmodules:" + sources_hash().encode())
    return h.hexdigest()[:16]


def build_image(profile: Profile, kernel_spec: str | None = None, progress: Progress = lambda _m: None,
                force: bool = False) -> Image:
    """Build (or reuse from cache) the image for `profile`; return it."""
    if profile.boot == "disk":
        from nephoscope.lab.server import build_disk_image

        return build_disk_image(profile, kernel_spec, progress, force)
    packages = resolve_packages(profile, progress)
    kernel = choose_kernel(kernel_spec, progress)
    key = image_key(profile, packages, kernel)
    directory = cache_root() / "images" / f"{profile.name}-{key}"
    if (directory / "image.json").exists() and not force:
        progress(f"image {directory.name} is cached")
        return Image(directory, json.loads((directory / "image.json").read_text()))

    tree = Tree()
    _base_files(tree, profile)
    for name, version in packages.items():
        progress(f"fetching {name} {version}")
        deb = archive.download(name, version, cache_root() / "debs")
        unpacked = archive.unpack(deb, cache_root() / "unpacked") / "root"
        tree.add_tree(unpacked, (name, version),
                      only=lambda p: not p.startswith(("usr/share/doc", "usr/share/man", "usr/share/locale",
                                                       "usr/share/info", "usr/share/lintian")))
    missing = check_libraries(tree)
    if missing:
        raise LabError("shared libraries missing from the guest (add their packages to the profile): "
                       + "; ".join(missing[:10]))

    if kernel.modules_dir is not None:
        prefix = f"usr/lib/modules/{kernel.release}"
        mods = module_closure(kernel.modules_dir, profile.modules)
        for rel in mods:
            tree.add(f"{prefix}/{module_target(rel)}", module_bytes(kernel.modules_dir / rel), 0o644,
                     (kernel.package, kernel.version) if kernel.package else None)
        for extra in ("modules.order", "modules.builtin"):
            if (kernel.modules_dir / extra).exists():
                tree.add(f"{prefix}/{extra}", (kernel.modules_dir / extra).read_bytes())
        tree.add("etc/nephoscope/modules", "".join(module_target(m) + "\n" for m in mods).encode())
    else:
        progress("warning: no kernel modules for this kernel; network and guest agent need built-in drivers")
        tree.add("etc/nephoscope/modules", b"")

    with tempfile.TemporaryDirectory() as tmp:
        for artifact in profile.artifacts:
            progress(f"making {artifact.output}")
            if artifact.kind == "compile":
                tree.add(artifact.output, compile_artifact(artifact, Path(tmp)), 0o755)
            elif artifact.kind == "kmodule":  # a module of lab/rootkit, built against the kernel's headers
                from nephoscope.lab.kmodules import build_module

                tree.add(artifact.output, build_module(artifact.source, kernel), 0o644)
            else:
                original = tree.read(normalise_path(artifact.source))
                tree.add(artifact.output, patch_text_padding(original), 0o755)

    tree.add("var/lib/dpkg/status", dpkg_status(packages))
    for path, content in profile.files.items():
        tree.add(path, content.lstrip("\n").encode(), 0o644)
    for i, line in enumerate(profile.setup):
        tree.add(f"etc/nephoscope/setup/{i:02d}.sh", (line + "\n").encode(), 0o755)
    for i, svc in enumerate(profile.services):
        command = svc.command if is_compound(svc.command) else "exec " + svc.command.removeprefix("exec ")
        tree.add(f"etc/nephoscope/services/{i:02d}-{svc.tag}.sh", (command + "\n").encode(), 0o755)
        if svc.after:
            tree.add(f"etc/nephoscope/services/{i:02d}-{svc.tag}.after.sh", (svc.after + "\n").encode(), 0o755)
    tree.add("init", INIT_TEMPLATE.read_bytes(), 0o755)

    progress("writing initramfs")
    tmpdir = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmpdir, ignore_errors=True)
    tmpdir.mkdir(parents=True)
    with (tmpdir / "initrd.cpio").open("wb") as out:
        write_cpio(out, sorted(tree.entries.values(), key=lambda e: e.path))
    shutil.copyfile(kernel.vmlinuz, tmpdir / "vmlinuz")
    meta = {
        "profile": profile.name,
        "key": key,
        "kernel": {"release": kernel.release, "package": kernel.package, "version": kernel.version,
                   "source": str(kernel.vmlinuz)},
        "packages": packages,
        "services": [{"tag": s.tag, "command": s.command, "binary": s.binary, "technique": s.technique,
                      "expect": s.expect} for s in profile.services],
        "kernel_techniques": list(profile.kernel_techniques),
        "files": {"/" + p: list(o) for p, o in sorted(tree.owners.items())},
        "unpackaged": sorted("/" + a.output.strip("/") for a in profile.artifacts),
        "initrd_bytes": (tmpdir / "initrd.cpio").stat().st_size,
    }
    (tmpdir / "image.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(directory, ignore_errors=True)
    tmpdir.rename(directory)
    progress(f"built {directory.name} ({meta['initrd_bytes'] // 2**20} MiB initramfs)")
    return Image(directory, meta)

