"""Build the `archevents` QEMU TCG plugin (archevents.c) against the installed QEMU's own plugin header, cached.

The header (`include/qemu/qemu-plugin.h`) comes from Debian's qemu source package of the installed
qemu-system-x86's source version: a private apt state under <cache>/tcgplugin/apt lists the host's Debian
suites as `deb-src` entries (the host's apt is left alone), `apt-get source --download-only` fetches the
.dsc and tarballs with apt's signature and hash checks, and only the header is extracted. The built .so is
cached by QEMU source version and the hash of the plugin source and header.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from nephoscope.core.errors import KnowledgeError, LabError
from nephoscope.core.paths import cache_root

SOURCE = Path(__file__).parent / "archevents.c"
HEADER = "include/qemu/qemu-plugin.h"
QEMU_PACKAGE = "qemu-system-x86"


def plugin_root() -> Path:
    """Return the cache directory of the plugin's header, apt state and builds (<cache>/tcgplugin)."""
    return cache_root() / "tcgplugin"


def qemu_source_version() -> str:
    """Return the source version of the installed qemu-system-x86 (e.g. '1:7.2+dfsg-7+deb12u18')."""
    proc = subprocess.run(["dpkg-query", "-W", "-f", "${source:Package} ${source:Version}", QEMU_PACKAGE],
                          capture_output=True, text=True, check=False)
    parts = proc.stdout.split()
    if proc.returncode != 0 or len(parts) != 2:
        raise LabError(f"{QEMU_PACKAGE} is not installed (dpkg-query: {proc.stderr.strip()[:200]}); run `make setup`")
    return parts[1]


def _apt_options(root: Path) -> tuple[str, ...]:
    opts = [f"Dir::Etc::SourceList={root / 'sources.list'}", "Dir::Etc::SourceParts=/dev/null",
            f"Dir::State::Lists={root / 'lists'}", f"Dir::Cache={root / 'cache'}"]
    if os.geteuid() == 0:
        opts.append("APT::Sandbox::User=root")
    return tuple(arg for opt in opts for arg in ("-o", opt))


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=cwd)
    if proc.returncode != 0:
        raise LabError(f"`{' '.join(cmd[:1] + cmd[-3:])}` failed: {proc.stderr.strip()[-600:]}")


def fetch_header(version: str | None = None) -> Path:
    """Return qemu-plugin.h of Debian's qemu source `version` (default: the installed one), downloading it once."""
    from nephoscope.knowledge.debian.contents import host_sources

    version = version or qemu_source_version()
    target = plugin_root() / f"qemu-{version.replace(':', '_')}" / "qemu-plugin.h"
    if target.is_file():
        return target
    root = plugin_root() / "apt"
    for sub in ("lists/partial", "cache/archives/partial"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    try:
        sources = host_sources().replace("deb [", "deb-src [")
    except KnowledgeError as exc:
        raise LabError(f"cannot list the host's Debian suites for the qemu source: {exc}") from exc
    (root / "sources.list").write_text(sources)
    options = _apt_options(root)
    _run(["apt-get", *options, "-q", "update"])
    with tempfile.TemporaryDirectory(dir=plugin_root()) as tmp:
        _run(["apt-get", *options, "-q", "source", "--download-only", f"qemu={version}"], cwd=Path(tmp))
        origs = sorted(Path(tmp).glob("qemu_*.orig.tar.*"))
        if not origs:
            raise LabError(f"apt fetched no qemu orig tarball for {version}")
        with tarfile.open(origs[0]) as tar:
            member = next((m for m in tar if m.isfile() and m.name.endswith("/" + HEADER)), None)
            if member is None:
                raise LabError(f"{origs[0].name} has no {HEADER}")
            data = tar.extractfile(member)
            assert data is not None
            text = data.read()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp_target = target.with_suffix(".tmp")
        tmp_target.write_bytes(text)
        os.replace(tmp_target, target)
    return target


def build_plugin(version: str | None = None) -> Path:
    """Return the archevents plugin .so for the installed QEMU, compiling it once (cached by version + sources)."""
    version = version or qemu_source_version()
    header = fetch_header(version)
    digest = hashlib.sha256(SOURCE.read_bytes() + b"\0" + header.read_bytes()).hexdigest()[:16]
    out = plugin_root() / f"archevents-{version.replace(':', '_')}-{digest}.so"
    if out.is_file():
        return out
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise LabError("gcc is missing; run `make setup`")
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    _run([cc, "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-I", str(header.parent), "-o", str(tmp),
          str(SOURCE), "-lpthread"])
    os.replace(tmp, out)
    return out
