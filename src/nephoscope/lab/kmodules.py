"""Build the lab's kernel modules (lab/rootkit/) against the lab kernel's own Debian headers, cached.

The headers are not installed on the host: linux-headers-<release>, its -common package and
linux-kbuild-<series> (whatever the headers package depends on) are downloaded with apt and unpacked
into one tree under <cache>/kheaders/<release>/, where `make -C <tree>/usr/src/linux-headers-<release>
M=<dir> modules` builds like an installed header package (the arch package's Makefile names the
-common tree by absolute path; it is pointed at the unpacked copy). A built module is cached by kernel
release, package version and the hash of the sources.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from nephoscope.core.errors import KnowledgeError, LabError
from nephoscope.core.paths import cache_root
from nephoscope.knowledge.debian import archive
from nephoscope.knowledge.debian.relations import depends_of

if TYPE_CHECKING:
    from nephoscope.lab.build import KernelChoice

ROOTKIT_DIR = Path(__file__).parent / "rootkit"


def sources_hash(directory: Path = ROOTKIT_DIR) -> str:
    """Return a short hash of every file in a module source directory (names and bytes)."""
    h = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def _header_packages(release: str, version: str) -> tuple[list[tuple[str, str]], tuple[str, ...]]:
    """Return [(package, version)] of the headers of `release` and their -common/kbuild deps, and apt options."""
    name = f"linux-headers-{release}"
    for options in ((), None):
        opts = archive.ensure_extra() if options is None else options
        versions = archive.available_versions(name, opts)
        if not versions:
            continue
        chosen = version if version in versions else versions[0]
        wanted = [(name, chosen)]
        for group in depends_of(archive.package_record(name, chosen, opts)):
            dep = group[0].name
            if dep.startswith(("linux-headers-", "linux-kbuild-")):
                dep_versions = archive.available_versions(dep, opts)
                fitting = [v for v in dep_versions if group[0].allows(v)]
                if not fitting:
                    raise LabError(f"{name}={chosen} needs {group[0]}, which apt cannot fetch")
                wanted.append((dep, fitting[0]))
        return wanted, opts
    raise LabError(f"apt knows no {name}; run `apt-get update` (the headers must match the lab kernel exactly)")


def kernel_headers(kernel: KernelChoice) -> Path:
    """Return the build directory of the lab kernel's headers (usr/src/linux-headers-<release>), unpacking once."""
    root = cache_root() / "kheaders" / kernel.release
    build = root / "usr" / "src" / f"linux-headers-{kernel.release}"
    if (root / ".complete").exists():
        return build
    packages, options = _header_packages(kernel.release, kernel.version)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    try:
        for name, version in packages:
            deb = archive.download(name, version, cache_root() / "debs", options)
            unpacked = archive.unpack(deb, cache_root() / "unpacked") / "root"
            shutil.copytree(unpacked, root, symlinks=True, dirs_exist_ok=True)
    except KnowledgeError as exc:
        raise LabError(f"cannot fetch the kernel headers for {kernel.release}: {exc}") from exc
    makefile = build / "Makefile"
    if not makefile.exists():
        raise LabError(f"{packages[0][0]} has no {makefile.relative_to(root)}; is it a kernel headers package?")
    makefile.write_text(makefile.read_text().replace("include /usr/src/", f"include {root}/usr/src/"))
    (root / ".complete").write_text("\n".join(f"{n}={v}" for n, v in packages) + "\n")
    return build


def build_module(name: str, kernel: KernelChoice, directory: Path = ROOTKIT_DIR) -> bytes:
    """Return the bytes of module `name`.ko built from `directory` for `kernel` (cached by release and source hash)."""
    if kernel.package == "":
        raise LabError("kernel modules are built against Debian headers: use a Debian kernel, not a vmlinuz path")
    cached = cache_root() / "kmodules" / f"{kernel.release}-{kernel.version}-{sources_hash(directory)}" / f"{name}.ko"
    if cached.exists():
        return cached.read_bytes()
    for tool in ("gcc", "make"):
        if shutil.which(tool) is None:
            raise LabError(f"{tool} is missing; run `make setup` to install the build tools")
    headers = kernel_headers(kernel)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "src"
        shutil.copytree(directory, work)
        # no module BTF (6.12 headers would run pahole, which setup does not install; nothing reads it)
        proc = subprocess.run(["make", "-C", str(headers), f"M={work}", "CONFIG_DEBUG_INFO_BTF_MODULES=", "modules"],
                              capture_output=True, text=True,
                              check=False)
        built = work / f"{name}.ko"
        if proc.returncode != 0 or not built.exists():
            raise LabError(f"building {name}.ko for {kernel.release} failed: {(proc.stderr or proc.stdout)[-800:]}")
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, cached)
    return cached.read_bytes()
