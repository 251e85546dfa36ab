"""opcache's shared script cache on the real `interp` guest: every php-fpm process, idle ones too, lists it.

Ground truth: the pool's own `opcache_get_status()['scripts']`, printed by a status script the test writes
into the guest's web root through the agent and requests through nginx (php-cli has its own cache, so it
cannot answer for fpm's); the lab's PHP files must be among them after the test requested them.
"""

from __future__ import annotations

import struct
import time
import urllib.request

import pytest

from nephoscope.hypervisor.qga import open_agent
from nephoscope.introspect.interp import php, php_opcache
from nephoscope.introspect.interp.php_layout import PHP82_NTS as L
from nephoscope.introspect.kernel import open_kernel
from nephoscope.lab.profile import load_profile
from nephoscope.service.targets import resolve_target

pytestmark = pytest.mark.guest
STATUS = "/var/www/php/nph-opcache-status.php"
STATUS_PHP = "<?php foreach (array_keys(opcache_get_status(true)['scripts'] ?? []) as $k) { echo $k, \"\\n\"; }\n"


def _get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=300) as reply:
        return reply.read()


@pytest.fixture(scope="module")
def pool_truth(interp_guest) -> set[str]:  # type: ignore[no-untyped-def]
    """Request the lab's PHP files, then ask the pool which scripts its cache holds; return their paths."""
    vm = resolve_target(interp_guest.name)
    assert _get(interp_guest.http_port, "/info.php").startswith(b"nephoscope lab php 8.2.")
    assert _get(interp_guest.http_port, "/slow.php?s=1") == b"slept"
    with open_agent(vm, timeout=60) as agent:
        rc, _out, err = agent.exec(["/bin/sh", "-c", f"cat > {STATUS} <<'EOF'\n{STATUS_PHP}EOF\nchmod 644 {STATUS}"],
                                   timeout=60)
        assert rc == 0, err
        try:
            listed = _get(interp_guest.http_port, "/" + STATUS.rsplit("/", 1)[1]).decode()
        finally:
            agent.exec(["/bin/rm", "-f", STATUS], timeout=60)
    time.sleep(2)  # the worker that served the status script returns to idle (EG(active) cleared)
    return {line for line in listed.splitlines() if line}


def _states(vm):  # type: ignore[no-untyped-def]
    with open_kernel(vm) as k, k.paused():
        procs = k.processes().items
        return k, {t.pid: (t, php.read_process(k, t, procs)) for t in procs if php.php_binary(t.exe or "")}


def test_every_fpm_process_lists_the_pools_cache(interp_guest, pool_truth) -> None:  # type: ignore[no-untyped-def]
    lab = {p for p in load_profile("interp").files if p.endswith(".php")}
    # the pool compiled what was requested; the status script itself was written a moment before it ran, and
    # opcache.file_update_protection (2 s) keeps so fresh a file out of the cache
    assert lab <= pool_truth and STATUS not in pool_truth, pool_truth
    _k, states = _states(resolve_target(interp_guest.name))
    assert len(states) >= 2  # the master and at least one worker
    for pid, (_task, state) in states.items():
        assert state is not None and state.complete, (pid, state and state.problem)
        cache = state.opcache
        assert cache is not None and cache.mapped and cache.started and cache.complete, (pid, cache)
        assert set(cache.scripts) == pool_truth, (pid, cache.scripts)
        assert len(cache.scripts) == cache.direct and cache.entries >= cache.direct
        assert cache.max_entries == 16229  # Debian's opcache.max_accelerated_files=10000, rounded up
    pointers = {s.opcache.shared_globals for _t, s in states.values() if s and s.opcache}
    assert len(pointers) == 1  # one segment, inherited from the master at the same address
    idle = [s for _t, s in states.values() if s and not s.busy]
    assert idle and all(set(s.opcache.scripts) == pool_truth for s in idle if s.opcache)


def test_the_registry_and_scripts_show_cached_files_for_idle_workers(interp_guest, pool_truth) -> None:  # type: ignore[no-untyped-def]
    from nephoscope.core.records import Verdict
    from nephoscope.service.scripts import scripts_report

    report = scripts_report(resolve_target(interp_guest.name))
    fpm = [p for p in report.processes if p.result.kind == "php"]
    assert fpm and all(p.result.verdict is Verdict.VERIFIED for p in fpm), [p.result.reason for p in fpm]
    for p in fpm:
        assert not p.result.details["busy"]
        assert set(p.result.scripts) == pool_truth
        assert p.result.details["opcache"]["cached_scripts"] == len(pool_truth)
        files = {f.path: f for f in p.files}
        # the lab's scripts are of no package under /var/www: unknown, hashed from the page cache
        assert files["/var/www/php/info.php"].status == "unknown", files["/var/www/php/info.php"]
        assert files["/var/www/php/info.php"].head[0].startswith("<?php echo")


def test_a_corrupted_copy_of_the_segment_is_unverifiable(interp_guest, pool_truth) -> None:  # type: ignore[no-untyped-def]
    vm = resolve_target(interp_guest.name)
    with open_kernel(vm) as k, k.paused():
        procs = k.processes().items
        master = next(t for t in procs if php.php_binary(t.exe or "") and t.ppid == 1)
        vmas = k.vmas(master).items
        space = k.user_space(k.u64(master.mm_gva + k.off["mm_struct.pgd"]))
        real = php_opcache.segment_reader(k, lambda g, n: k.read_in(space, g, n), vmas)
        good = php_opcache.read_cache(real, L, vmas)
        assert good.complete and set(good.scripts) == pool_truth, good.problem
        zcsg = good.shared_globals
        entries = int.from_bytes(real(zcsg + L["zend_accel_shared_globals.hash.hash_entries"], 8), "little")

        def patched(patches: dict[int, bytes]) -> php_opcache.Read:
            def read(gva: int, n: int) -> bytes:
                blob = bytearray(real(gva, n))
                for at, value in patches.items():
                    for i, b in enumerate(value):
                        if 0 <= at + i - gva < n:
                            blob[at + i - gva] = b
                return bytes(blob)
            return read

        absurd = php_opcache.read_cache(patched({zcsg + L["zend_accel_shared_globals.hash.num_entries"]:
                                                 struct.pack("<I", 1 << 30)}), L, vmas)
        assert not absurd.complete and absurd.scripts == [] and "counts out of order" in absurd.problem
        first = entries  # the first entry the hash handed out: make its chain point back at itself
        loop = php_opcache.read_cache(patched({first + L["zend_accel_hash_entry.next"]: struct.pack("<Q", first)}),
                                      L, vmas)
        assert not loop.complete and loop.scripts == [] and "reached twice" in loop.problem
