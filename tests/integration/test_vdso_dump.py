"""The vDSO of every process on the shared lab dumps (6.1 and 6.12) verifies against the kernel package's image.

The KB is a temporary one holding only the dumps' kernel packages (their manifests name them); without
them every vDSO is unverifiable with that reason. Skipped when the shared dumps are absent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nephoscope.introspect.arch import scan_file
from nephoscope.knowledge.binaries import CodePageDB
from nephoscope.knowledge.ingest import IngestReport, ingest_apt

pytestmark = pytest.mark.guest
DUMPS = Path("/work/dumps")
NAMES = ("clean-6.1", "clean-6.12", "tampered-6.1")


@pytest.fixture(scope="module")
def kernel_kb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not all((DUMPS / f"{n}.elf").is_file() for n in NAMES):
        pytest.skip("the shared lab dumps are not in /work/dumps")
    path = tmp_path_factory.mktemp("vdso-kb") / "kb.sqlite"
    db = CodePageDB.open(path)
    report = IngestReport()
    for spec in sorted({f"{k['package']}={k['version']}" for k in (_kernel(n) for n in NAMES)}):
        report.merge(ingest_apt(db, spec))
    db.close()
    assert report.errors == []
    return path


def _kernel(name: str) -> dict:
    return json.loads((DUMPS / f"{name}.manifest.json").read_text())["kernel"]


@pytest.mark.parametrize("name", NAMES)
def test_every_vdso_verifies_with_the_kernel_package(kernel_kb: Path, name: str, tmp_path: Path) -> None:
    kernel = _kernel(name)
    report = scan_file(DUMPS / f"{name}.elf", kernel_kb)
    vdsos = [sp.vdso for sp in report.spaces if sp.vdso is not None]
    assert len(vdsos) >= 10
    assert all(v.verified and v.kernel == [(kernel["package"], kernel["version"])] for v in vdsos), \
        {(v.name, v.reason) for v in vdsos}
    empty = scan_file(DUMPS / f"{name}.elf", tmp_path / "empty.sqlite")
    reasons = {sp.vdso.reason for sp in empty.spaces if sp.vdso is not None}
    assert reasons == {f"vDSO not compared: package {kernel['package']} not in KB (kernel {kernel['release']})"}
