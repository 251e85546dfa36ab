"""Ingest the lab's real Debian packages and find their code pages in a running lab guest's RAM."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest

from nephoscope.knowledge.binaries import CodePageDB
from nephoscope.knowledge.debian import archive
from nephoscope.knowledge.ingest import VDSO_PATH, IngestReport, ingest_deb
from nephoscope.knowledge.pagehash import PAGE_SIZE
from nephoscope.lab.build import Image, cache_root
from nephoscope.lab.runner import Guest

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def lab_kb(clean_image: Image, tmp_path_factory: pytest.TempPathFactory) -> CodePageDB:
    db = CodePageDB.open(tmp_path_factory.mktemp("kb") / "kb.sqlite")
    wanted = dict(clean_image.meta["packages"])
    kernel = clean_image.meta["kernel"]
    if kernel.get("package"):
        wanted[kernel["package"]] = kernel["version"]
    started, report = time.monotonic(), IngestReport()
    for name, version in wanted.items():
        report.merge(ingest_deb(db, archive.download(name, version, cache_root() / "debs")))
    print(f"ingested {len(wanted)} packages in {time.monotonic() - started:.1f}s: {report.files_added} files, "
          f"{report.pages_added} pages, {len(report.errors)} errors")
    assert report.errors == []
    assert report.files_added > 50
    return db


def _ram_page_digests(ram: Path) -> list[bytes]:
    data = np.memmap(ram, dtype=np.uint8, mode="r")
    return [hashlib.sha256(data[o:o + PAGE_SIZE]).digest() for o in range(0, len(data) - PAGE_SIZE + 1, PAGE_SIZE)]


def test_running_binaries_pages_are_found_in_guest_ram(lab_kb: CodePageDB, clean_guest: Guest) -> None:
    ram_digests = _ram_page_digests(clean_guest.ram_path)
    in_ram = set(ram_digests)
    binaries = {(p["binary"], p["package"], p["version"]) for p in clean_guest.manifest()["processes"]
                if p.get("package") and p.get("binary")}
    assert any(b.endswith("/nginx") for b, _, _ in binaries)
    for binary, package, version in sorted(binaries):
        files = lab_kb.find_files("/" + Path(binary).name, package)
        files = [f for f in files if f[3] == version]
        assert files, f"{binary} of {package} {version} is not in the KB"
        pages = lab_kb.file_pages(files[0][0])
        found = sum(p.digest in in_ram for p in pages)
        # every page of a running binary sits in the guest's page cache (the rootfs is in RAM)
        assert found >= 0.95 * len(pages), f"{binary}: only {found}/{len(pages)} pages found in RAM"

    hits = lab_kb.lookup_digests(ram_digests)
    identified = {h[0].path for h in hits if h}
    assert "/usr/sbin/nginx" in identified
    known = sum(1 for h in hits if h)
    print(f"{known} of {len(ram_digests)} RAM pages identified; {len(identified)} distinct files")


def test_vdso_is_extracted_from_the_kernel_package(lab_kb: CodePageDB, clean_guest: Guest) -> None:
    files = lab_kb.find_files(VDSO_PATH)
    assert len(files) == 1 and files[0][2].startswith("linux-image-")
    pages = lab_kb.file_pages(files[0][0])
    in_ram = set(_ram_page_digests(clean_guest.ram_path))
    # the code page is patched at boot (alternatives), so only the unpatched pages are expected to match
    assert any(p.digest in in_ram for p in pages)
