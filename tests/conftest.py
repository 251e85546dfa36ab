"""Shared fixtures: lab guests booted once per session and always stopped, even when tests fail."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from nephoscope.core.errors import KnowledgeError, LabError
from nephoscope.knowledge.debian import archive
from nephoscope.lab import runner
from nephoscope.lab.build import Image, build_image, choose_kernel
from nephoscope.lab.profile import load_profile

_SUFFIX = f"{os.getpid() % 100000}"
KERNEL_612 = "6.12"
SHARED_DUMPS = Path(os.environ.get("NEPHOSCOPE_DUMPS", "/work/dumps"))


BIG_FILE = 64 << 20


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Delete a test's big files (guest dump copies, 512 MiB each) even when it failed: disk is finite.

    pytest keeps a failed test's tmp_path for debugging; the dumps in it are copies of session dumps that
    the failure message already describes, and a few dozen of them filled CI's disk once.
    """
    path = getattr(item, "funcargs", {}).get("tmp_path")
    if not isinstance(path, Path) or not path.is_dir():
        return
    for f in path.rglob("*"):
        try:
            if f.is_file() and not f.is_symlink() and f.stat().st_size > BIG_FILE:
                f.unlink()
        except OSError:
            continue


def _boot(profile: str, kernel: str | None = None, tag: str = "", **kwargs: object) -> Iterator[runner.Guest]:
    image = build_image(load_profile(profile), kernel)
    name = f"pt-{tag or profile}-{_SUFFIX}"
    guest = runner.start(name, image, **kwargs)  # type: ignore[arg-type]
    try:
        yield guest
    finally:
        runner.stop(name, quiet=True)


@pytest.fixture(scope="session")
def clean_image() -> Image:
    return build_image(load_profile("clean"))


@pytest.fixture(scope="session")
def default_kb() -> None:
    """Make sure the default code-page DB holds the lab's packages (ingests what is missing, once)."""
    from nephoscope.service.demo import ensure_knowledge

    problems = ensure_knowledge("clean", lambda _m: None)
    assert not problems, problems


@pytest.fixture(scope="session")
def clean_guest() -> Iterator[runner.Guest]:
    yield from _boot("clean")


@pytest.fixture(scope="session")
def clean_guest_612() -> Iterator[runner.Guest]:
    """The clean profile on the Debian 6.12 kernel (module.mem[], pcpu_hot): one guest per session."""
    try:
        chosen = choose_kernel(KERNEL_612, lambda _m: None)
    except (LabError, KnowledgeError) as exc:
        pytest.skip(f"the Debian {KERNEL_612} kernel cannot be fetched (host apt, then "
                    f"{', '.join(archive.EXTRA_SUITES)} from {archive.EXTRA_MIRROR}): {exc}")
    assert chosen.release.startswith(KERNEL_612 + "."), chosen
    yield from _boot("clean", KERNEL_612, tag="k612")


@pytest.fixture(scope="session")
def bare_guest() -> Iterator[runner.Guest]:
    """The clean profile as a provider's VM runs: default anonymous RAM (plain -m), no RAM file, no gdbstub."""
    yield from _boot("clean", tag="bare", ram="anon", gdb=False)


@pytest.fixture(scope="session")
def big_guest() -> Iterator[runner.Guest]:
    """The clean profile with 4608 MiB of anonymous RAM: RAM above the PCI hole (pc.ram split at 3 GiB / 4 GiB)."""
    yield from _boot("clean", tag="big", mem="4608M", ram="anon", gdb=False)


@pytest.fixture(scope="session")
def fresh_file_guest() -> Iterator[runner.Guest]:
    """The clean profile with a shared RAM file that no other test reads whole (dumps and copies touch every page)."""
    yield from _boot("clean", tag="fresh", mem="1G")


@pytest.fixture(scope="session")
def memfd_guest() -> Iterator[runner.Guest]:
    """The clean profile with memory-backend-memfd RAM (shared, but no file nephoscope can name)."""
    yield from _boot("clean", tag="memfd", ram="memfd", gdb=False)


@pytest.fixture(scope="session")
def hugetlb_guest() -> Iterator[runner.Guest]:
    """The clean profile on 2 MiB huge pages (memory-backend-memfd hugetlb=on), reserved here and given back."""
    pool = Path("/proc/sys/vm/nr_hugepages")
    before = int(pool.read_text())
    need = before + 512 // 2 + 16  # 512 MiB of 2 MiB pages, and a little slack
    try:
        pool.write_text(str(need))
    except OSError as exc:
        pytest.skip(f"cannot reserve huge pages ({exc}); hugepage-backed RAM needs root and a free pool")
    if int(pool.read_text()) < need:
        pool.write_text(str(before))
        pytest.skip(f"the kernel gave only {pool.read_text().strip()} of {need} huge pages (memory fragmented)")
    try:
        yield from _boot("clean", tag="huge", ram="hugetlb", gdb=False)
    finally:
        pool.write_text(str(before))


@pytest.fixture(scope="session")
def tampered_guest() -> Iterator[runner.Guest]:
    yield from _boot("tampered", kaslr=True)


@pytest.fixture(scope="session")
def rootkit_guest() -> Iterator[runner.Guest]:
    """The rootkit lab guest (kernel 6.1, KASLR): nphrk hides a task and itself and hooks the kernel."""
    yield from _boot("rootkit", kaslr=True)


@pytest.fixture(scope="session")
def rootkit_guest_612() -> Iterator[runner.Guest]:
    """The rootkit lab guest on the Debian 6.12 kernel (nphrk built against its headers)."""
    try:
        choose_kernel(KERNEL_612, lambda _m: None)
    except (LabError, KnowledgeError) as exc:
        pytest.skip(f"the Debian {KERNEL_612} kernel cannot be fetched: {exc}")
    yield from _boot("rootkit", KERNEL_612, tag="rk612", kaslr=True)


@pytest.fixture(scope="session")
def tampered_dump(tampered_guest: runner.Guest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a QEMU ELF core of the tampered guest (dump-guest-memory, VM stopped for it, run state kept)."""
    from nephoscope.hypervisor.qmp import Qmp

    dump = tmp_path_factory.mktemp("tampered-dump") / "tampered.elf"
    with Qmp(tampered_guest.qmp_socket, timeout=180) as qmp:
        was_running = bool(qmp.command("query-status").get("running"))
        qmp.command("stop")
        try:
            qmp.command("dump-guest-memory", paging=False, protocol=f"file:{dump}")
        finally:
            if was_running:
                qmp.command("cont")
    return dump


@pytest.fixture(scope="session")
def clean_dump(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Return a QEMU ELF core of the clean lab guest (kernel 6.1): the shared one, else dumped here once.

    The shared dump (`$NEPHOSCOPE_DUMPS/clean-6.1.elf`) is read-only: copy it before changing bytes.
    Without it, the `clean` guest is booted (clean_guest) and dumped with QMP `dump-guest-memory`.
    """
    shared = SHARED_DUMPS / "clean-6.1.elf"
    if shared.is_file() and shared.stat().st_size > 64 << 20:
        yield shared
        return
    from nephoscope.hypervisor.qmp import Qmp

    guest: runner.Guest = request.getfixturevalue("clean_guest")
    path = tmp_path_factory.mktemp("dumps") / "clean-6.1.elf"
    with Qmp(guest.qmp_socket, timeout=300) as qmp:
        qmp.command("dump-guest-memory", paging=False, protocol=f"file:{path}")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)  # 512 MiB: not left in pytest's kept temporary directories



@pytest.fixture(scope="session")
def libvirt_guest() -> Iterator[object]:
    """A lab image booted as a transient libvirt TCG domain (plain RAM); the daemons started if not running.

    Destroyed at the end of the session even when tests fail; the daemons this fixture started are stopped."""
    from nephoscope.lab import libvirt_runner

    try:
        daemons = libvirt_runner.start_daemons()
    except LabError as exc:
        pytest.skip(f"libvirt unavailable: {exc}")
    name = f"pt-libvirt-{_SUFFIX}"
    try:
        guest = libvirt_runner.start(name, build_image(load_profile("clean")))
        try:
            yield guest
        finally:
            libvirt_runner.stop(name, quiet=True)
    finally:
        libvirt_runner.stop_daemons(daemons)


@pytest.fixture(scope="session")
def server_image() -> Image:
    """The `server` disk image (a Debian 12 system built with mmdebstrap): built once, then cached."""
    return build_image(load_profile("server"))


@pytest.fixture(scope="session")
def server_guest(server_image: Image) -> Iterator[object]:
    """The `server` profile as a transient libvirt TCG domain (plain RAM), booted from its disk once per session.

    Destroyed at the end of the session even when tests fail; the daemons this fixture started are stopped."""
    from nephoscope.lab import libvirt_runner

    try:
        daemons = libvirt_runner.start_daemons()
    except LabError as exc:
        pytest.skip(f"libvirt unavailable: {exc}")
    name = f"pt-server-{_SUFFIX}"
    try:
        guest = libvirt_runner.start(name, server_image)
        try:
            yield guest
        finally:
            libvirt_runner.stop(name, quiet=True)
    finally:
        libvirt_runner.stop_daemons(daemons)


@pytest.fixture(scope="session")
def server_tampered_guest() -> Iterator[runner.Guest]:
    """The `server-tampered` profile under bare QEMU (shared RAM file), booted from its disk once per session."""
    yield from _boot("server-tampered", tag="srvtamp")


@pytest.fixture(scope="session")
def fleet_pg() -> Iterator[object]:
    """A throwaway PostgreSQL 15 cluster (as `nobody` when root), stopped and deleted at the end of the session."""
    import tempfile

    from nephoscope.fleet.pgcluster import PgCluster, free_port

    root = Path(tempfile.mkdtemp(prefix="nephoscope-pg-"))  # not under pytest's 0700 tree: postgres runs as nobody
    root.chmod(0o755)
    cluster = PgCluster(root / "pg", free_port())
    cluster.init()
    try:
        yield cluster
    finally:
        cluster.destroy()
        root.rmdir()


@pytest.fixture(scope="session")
def interp_guest() -> Iterator[runner.Guest]:
    """The `interp` profile under bare QEMU (shared RAM file): gunicorn/Flask, php-fpm, a Java service, an
    unpackaged Python script and py-spy; booted from its disk once per session and always stopped."""
    image = build_image(load_profile("interp"))
    name = f"interp-{_SUFFIX}"
    guest = runner.start(name, image)
    try:
        yield guest
    finally:
        runner.stop(name, quiet=True)
