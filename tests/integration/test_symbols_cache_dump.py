"""`--symbols FILE` and the kernel-model cache on a real 512 MiB guest dump, checked against plain recovery.

The dump: $NEPHOSCOPE_TEST_DUMP, else the shared /work/dumps/clean-6.1.elf, else a dump of a clean lab
guest booted for the session (QMP dump-guest-memory).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nephoscope.core.errors import DetectionError
from nephoscope.memory.physical import BufferMemory, SegmentedMemory, open_memory
from nephoscope.os.linux.cache import ModelCache
from nephoscope.os.linux.model import LinuxKernel
from nephoscope.os.linux.symbols import extract_vmlinux, load_symbols, open_with_symbols

pytestmark = pytest.mark.guest
SHARED = Path("/work/dumps/clean-6.1.elf")


@pytest.fixture(scope="session")
def dump(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    given = os.environ.get("NEPHOSCOPE_TEST_DUMP")
    if given or SHARED.exists():
        yield Path(given) if given else SHARED
        return
    from nephoscope.hypervisor.qmp import Qmp
    from nephoscope.lab import runner
    from nephoscope.lab.build import build_image
    from nephoscope.lab.profile import load_profile

    name = f"pt-dump-{os.getpid() % 100000}"
    guest = runner.start(name, build_image(load_profile("clean")))
    try:
        path = tmp_path_factory.mktemp("dump") / "clean.elf"
        with Qmp(guest.qmp_socket) as qmp:
            qmp.command("dump-guest-memory", paging=False, protocol=f"file:{path}")
        yield path
    finally:
        runner.stop(name, quiet=True)


def _cli(*args: str, cache: Path) -> str:
    env = {**os.environ, "NEPHOSCOPE_CACHE": str(cache), "COLUMNS": "200"}
    env.pop("NEPHOSCOPE_NO_CACHE", None)
    run = subprocess.run([sys.executable, "-m", "nephoscope.cli.main", *args], capture_output=True, text=True,
                         env=env, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def _processes(out: str) -> list[tuple[int, int, str, str]]:
    return [(p["pid"], p["ppid"], p["comm"], p["exe"]) for p in json.loads(out)["processes"]]


def test_ps_with_our_own_isf_lists_the_same_processes(dump: Path, tmp_path: Path) -> None:
    plain = _cli("ps", str(dump), "--json", "--no-cache", cache=tmp_path)
    isf = tmp_path / "symbols" / "linux" / "guest.json.xz"
    _cli("isf", str(dump), "-o", str(isf), "--no-cache", cache=tmp_path)
    with_isf = _cli("ps", str(dump), "--json", "--symbols", str(isf), cache=tmp_path)
    assert _processes(with_isf) == _processes(plain) and len(_processes(plain)) > 20
    assert json.loads(with_isf) == json.loads(plain)  # every column, cr3 included


def _copy(phys: SegmentedMemory) -> bytearray:
    """Return guest RAM as one buffer (gpa = offset), holes zeroed."""
    ram = bytearray(max(end for _start, end in phys.ranges))
    for start, view in phys.iter_segments():
        ram[start:start + len(view)] = view
    return ram


def test_a_kernel_without_btf_in_ram_is_read_with_symbols(dump: Path, tmp_path: Path) -> None:
    phys = open_memory(dump)
    baseline = LinuxKernel.open(phys)
    info = baseline.info
    assert info.btf_gpa is not None
    ram = _copy(phys)  # a copy of RAM whose BTF is gone (as if the kernel were built without it)
    ram[info.btf_gpa:info.btf_gpa + info.btf_size] = bytes(info.btf_size)
    no_btf = BufferMemory(ram)
    with pytest.raises(DetectionError, match="--symbols"):
        LinuxKernel.open(no_btf)
    isf = tmp_path / "k.json.xz"
    from nephoscope.os.linux.isf import export_isf

    export_isf(baseline.btf, baseline.symbols.symbols, info.banner, isf, kaslr_shift=info.virt_slide)
    recovered = open_with_symbols(no_btf, isf)
    assert recovered.report.stage("types") is not None
    want = [(t.pid, t.comm, t.exe) for t in baseline.processes().items]
    assert [(t.pid, t.comm, t.exe) for t in recovered.processes().items] == want
    assert [m.name for m in recovered.modules().items] == [m.name for m in baseline.modules().items]


def _lab_vmlinuz() -> Path | None:
    found = sorted(Path.home().glob(".cache/nephoscope/unpacked/linux-image-6.1.*/root/boot/vmlinuz-*"))
    return found[0] if found else None


@pytest.mark.skipif(_lab_vmlinuz() is None, reason="no Debian 6.1 kernel package unpacked in the lab cache")
def test_ps_with_the_debian_vmlinuz_btf(dump: Path, tmp_path: Path) -> None:
    vmlinuz = _lab_vmlinuz()
    assert vmlinuz is not None
    elf = tmp_path / "vmlinux"
    elf.write_bytes(extract_vmlinux(vmlinuz))  # what scripts/extract-vmlinux gives: an ELF with .BTF
    assert load_symbols(elf).kind == "vmlinux (BTF)" and load_symbols(vmlinuz).kind == "vmlinux (BTF)"
    plain = _cli("ps", str(dump), "--json", "--no-cache", cache=tmp_path)
    assert _cli("ps", str(dump), "--json", "--symbols", str(vmlinuz), cache=tmp_path) == plain
    assert _cli("ps", str(dump), "--json", "--symbols", str(elf), cache=tmp_path) == plain


def test_the_second_run_uses_the_cache_and_answers_the_same(dump: Path, tmp_path: Path) -> None:
    plain = _cli("ps", str(dump), "--json", "--no-cache", cache=tmp_path)
    assert not (tmp_path / "kernels").exists()  # --no-cache writes nothing
    assert _cli("ps", str(dump), "--json", cache=tmp_path) == plain  # records
    assert _cli("ps", str(dump), "--json", cache=tmp_path) == plain  # hits
    stages = json.loads(_cli("kernel", str(dump), "--json", cache=tmp_path))["detection"]["stages"]
    assert stages[0]["detail"].startswith("cached kernel") and "from the cache" in stages[1]["detail"]
    assert _cli("modules", str(dump), "--json", cache=tmp_path) == _cli("modules", str(dump), "--json",
                                                                       "--no-cache", cache=tmp_path)


def test_changed_guest_memory_is_never_answered_from_the_cache(dump: Path, tmp_path: Path) -> None:
    phys = open_memory(dump)
    cache = ModelCache(tmp_path / "kernels")
    first = cache.open(phys)
    info = first.info
    assert info.btf_gpa is not None
    ram = _copy(phys)
    # a byte of BTF string data no struct the model reads uses: recovery gives the same model, the cache must
    # still notice the change and recover again rather than vouch for bytes it has not seen
    ram[info.btf_gpa + info.btf_size - 2] ^= 0x01
    changed = BufferMemory(ram)
    again = cache.open(changed)
    assert not again.report.stage("btf").detail.startswith("cached")  # type: ignore[union-attr]
    assert "BTF differs" in (cache.last_problem or "")
    assert [(t.pid, t.comm) for t in again.processes().items] == [(t.pid, t.comm) for t in first.processes().items]
    assert cache.open(changed).report.stage("banner").detail.startswith("cached kernel")  # re-recorded


OTHER_BOOT = Path("/work/dumps/tampered-6.1.elf")  # the same Debian 6.1 build, booted with another KASLR slide


@pytest.mark.skipif(not OTHER_BOOT.exists(), reason="no second dump of the same kernel build")
def test_another_boot_of_the_same_build_is_served_from_the_cache(dump: Path, tmp_path: Path) -> None:
    _cli("ps", str(dump), "--json", cache=tmp_path)  # records the build
    other = json.loads(_cli("kernel", str(OTHER_BOOT), "--json", cache=tmp_path))
    if other["kernel"]["build_id"] != json.loads(_cli("kernel", str(dump), "--json", cache=tmp_path))[
            "kernel"]["build_id"]:
        pytest.skip("the dumps are of different kernel builds")
    assert other["detection"]["stages"][0]["detail"].startswith("cached kernel")
    assert _cli("ps", str(OTHER_BOOT), "--json", cache=tmp_path) == _cli("ps", str(OTHER_BOOT), "--json",
                                                                          "--no-cache", cache=tmp_path)


def test_scan_inspect_with_symbols_sees_the_same_processes(dump: Path, tmp_path: Path) -> None:
    isf = tmp_path / "k.json.xz"
    _cli("isf", str(dump), "-o", str(isf), cache=tmp_path)
    plain = json.loads(_cli("scan", str(dump), "-m", "inspect", "--no-store", "--json", cache=tmp_path))
    with_isf = json.loads(_cli("scan", str(dump), "-m", "inspect", "--no-store", "--json", "--symbols", str(isf),
                               cache=tmp_path))
    assert with_isf["processes"] == plain["processes"] and len(plain["processes"]) > 5
