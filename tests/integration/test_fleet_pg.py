"""The fleet on real PostgreSQL: migrations, a real server process, the sensor's outbox while the server is away."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, text

from nephoscope.core.errors import NephoscopeError
from nephoscope.fleet.db import FleetStore, Principal, migrate, open_engine
from nephoscope.fleet.localrun import ServerProcess
from nephoscope.fleet.sensor import Client, Sensor, fetch_knowledge, local_response, parse_policy, vm_lock
from nephoscope.hypervisor.discover import Discovery, HostVm
from nephoscope.hypervisor.target import VmTarget

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from fleet_docs import TAP, response_store, stored_document

HEAD = "0004"  # the newest migration
POLICY = """
include = ["vm-*"]
[[rule]]
method = "inspect"
every_s = 0
[[rule]]
method = "trap"
every_s = 0
high_risk_only = true
"""


def StoredResult(name: str) -> dict[str, Any]:
    """Return the stored scan document as if `name` had been scanned."""
    doc = stored_document()
    doc["scan"]["vm"] = name
    return doc


def _vms(*names: str) -> Discovery:
    return Discovery([HostVm(n, "qemu", VmTarget(n, live=True), methods={"inspect": None, "trap": None})
                      for n in names], {})


def _get(server: ServerProcess, path: str) -> Any:
    req = urllib.request.Request(server.url + path, headers={"Authorization": f"Bearer {server.operator_token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _post(server: ServerProcess, path: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {server.operator_token}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.fixture
def server(fleet_pg: Any, tmp_path: Path) -> Iterator[ServerProcess]:
    engine = open_engine(fleet_pg.url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    proc = ServerProcess(fleet_pg.url, tmp_path / "server")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def test_migrations_create_the_schema_on_postgresql(server: ServerProcess, fleet_pg: Any) -> None:
    engine = open_engine(fleet_pg.url)
    try:
        tables = set(inspect(engine).get_table_names())
        assert {"tenants", "hosts", "vms", "tokens", "scans", "findings", "alembic_version", "vm_filters",
                "vm_filter_audit", "vm_notices"} <= tables
        migrate(engine)  # a second upgrade is a no-op
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == HEAD
            kinds = {r[0]: r[1] for r in conn.execute(text(
                "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'scans'"))}
        assert kinds["document"] == "jsonb"
        with engine.connect() as conn:
            token_columns = {r[0]: r[1] for r in conn.execute(text(
                "SELECT column_name, is_nullable FROM information_schema.columns WHERE table_name = 'tokens'"))}
        assert token_columns["expires"] == "YES"  # tokens issued before the migration never expire
        assert token_columns["revoked_at"] == "YES" and token_columns["last_used"] == "YES"
    finally:
        engine.dispose()


def test_migration_0004_upgrades_a_0003_database_on_postgresql(fleet_pg: Any) -> None:
    """A 0003 database's tokens keep working after 0004, can be listed and revoked; down to 0003 and up again."""
    from test_fleet_tokens import check_downgrade_0004, check_migration_0004

    engine = open_engine(fleet_pg.url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    check_migration_0004(fleet_pg.url)
    check_downgrade_0004(fleet_pg.url)


def test_a_revoked_token_is_refused_by_a_running_server(server: ServerProcess, fleet_pg: Any) -> None:
    """Revocation through the API of a real server on PostgreSQL: the next request with the token is 401."""
    tenant = _post(server, "/api/v1/tenants", {"name": "acme"})["id"]
    issued = _post(server, "/api/v1/tokens", {"scope": "tenant", "tenant_id": tenant, "label": "portal"})
    req = urllib.request.Request(server.url + "/api/v1/vms", headers={"Authorization": f"Bearer {issued['token']}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
    row = _post(server, f"/api/v1/tokens/{issued['id']}/revoke", {})
    assert row["state"] == "revoked" and row["revoked_by"].startswith("token ")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=30)
    assert refused.value.code == 401
    listed = {t["id"]: t for t in _get(server, "/api/v1/tokens")}
    assert listed[issued["id"]]["revoked_at"] == row["revoked_at"] and listed[issued["id"]]["last_used"] is not None


def test_sensor_buffers_while_the_server_is_away_and_catches_up(server: ServerProcess, fleet_pg: Any,
                                                                tmp_path: Path) -> None:
    token = _post(server, "/api/v1/tokens", {"scope": "sensor", "host": "hv-1"})["token"]
    state = tmp_path / "sensor"
    sensor = Sensor(Client(server.url, token, timeout=5), parse_policy(POLICY), state, host="hv-1",
                    discover=lambda: _vms("vm-a", "vm-b", "other"), scanner=lambda vm, _m: StoredResult(vm.name))
    server.stop()
    away = sensor.sweep()
    assert sorted(away.scanned) == ["vm-a", "vm-b"] and away.pushed == 0 and away.buffered == 2
    assert away.push_error
    server.start()
    back = sensor.sweep()  # two more scans, and the two buffered ones first
    assert back.pushed == 4 and back.buffered == 0
    store = FleetStore(open_engine(fleet_pg.url))
    try:
        assert store.count_scans() == 4
        assert len(set(back.scan_ids.values())) == 4
    finally:
        store.engine.dispose()
    vms = {v["name"]: v for v in _get(server, "/api/v1/vms")}
    assert set(vms) == {"vm-a", "vm-b"}
    latest = _get(server, f"/api/v1/vms/{vms['vm-a']['id']}")["latest"]["document"]["scan"]
    assert latest["processes"] == stored_document()["scan"]["processes"]


def test_sensor_reports_filters_and_notices(server: ServerProcess, fleet_pg: Any, tmp_path: Path) -> None:
    """A sweep pushes the scanned VM's filters and notices from the host store; away, it retries next sweep."""
    token = _post(server, "/api/v1/tokens", {"scope": "sensor", "host": "hv-f"})["token"]
    host_store = tmp_path / "host.sqlite"
    response_store(host_store, "vm-f")
    sensor = Sensor(Client(server.url, token, timeout=5), parse_policy(POLICY), tmp_path / "s", host="hv-f",
                    discover=lambda: _vms("vm-f"), scanner=lambda vm, _m: StoredResult(vm.name),
                    response=lambda vm: local_response(vm, host_store))
    server.stop()
    away = sensor.sweep()
    assert away.responses == 0 and sensor.state["response_due"] == ["vm-f"]
    server.start()
    back = sensor.sweep()
    assert back.pushed == 2 and back.responses == 1 and sensor.state["response_due"] == []
    vm_id = _get(server, "/api/v1/vms")[0]["id"]
    got = _get(server, f"/api/v1/vms/{vm_id}/notices")
    assert got["recorded"] and [f["net"]["tap"] for f in got["filters"]] == [TAP]
    assert [a["action"] for a in got["audit"]] == ["applied"]
    assert sorted(n["status"] for n in got["notices"]) == ["failed", "sent"]
    sensor.sweep()  # the same state again: nothing doubles
    again = _get(server, f"/api/v1/vms/{vm_id}/notices")
    assert (len(again["filters"]), len(again["audit"]), len(again["notices"])) == (1, 1, 2)
    engine = open_engine(fleet_pg.url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM vm_notices")).scalar() == 2
            assert conn.execute(text("SELECT jsonb_typeof(data) FROM vm_filters")).scalar() == "object"
    finally:
        engine.dispose()


def test_an_expired_sensor_token_keeps_the_scans_buffered(server: ServerProcess, fleet_pg: Any,
                                                           tmp_path: Path) -> None:
    """A 401 is the token's fault, not the scan's: the outbox keeps the scan until a valid token pushes it."""
    import time

    store = FleetStore(open_engine(fleet_pg.url))
    try:
        host = store.add_host("hv-e")
        expired = store.issue_token("sensor", host_id=host, expires=time.time() - 1)
        live = store.issue_token("sensor", host_id=host, expires=time.time() + 3600)
    finally:
        store.engine.dispose()
    sensor = Sensor(Client(server.url, expired), parse_policy(POLICY), tmp_path / "s", host="hv-e",
                    discover=lambda: _vms("vm-e"), scanner=lambda vm, _m: StoredResult(vm.name), response=None)
    refused = sensor.sweep()
    assert refused.pushed == 0 and refused.buffered == 1 and "401" in (refused.push_error or "")
    assert not list((tmp_path / "s" / "outbox").glob("*.refused"))
    sensor.client = Client(server.url, live)
    done = sensor.flush()
    assert done.pushed == 1 and done.buffered == 0
    assert [v["name"] for v in _get(server, "/api/v1/vms")] == ["vm-e"]


def test_a_retried_push_is_stored_once(server: ServerProcess, fleet_pg: Any, tmp_path: Path) -> None:
    token = _post(server, "/api/v1/tokens", {"scope": "sensor", "host": "hv-2"})["token"]
    sensor = Sensor(Client(server.url, token), parse_policy(POLICY), tmp_path / "s", host="hv-2",
                    discover=lambda: _vms("vm-x"), scanner=lambda vm, _m: StoredResult(vm.name))
    sensor.client = None  # buffer only
    sensor.sweep()
    (pending,) = sensor.outbox.pending()
    copy = pending.with_name("0" + pending.name)  # the same push twice (a push whose answer was lost)
    copy.write_text(pending.read_text())
    sensor.client = Client(server.url, token)
    done = sensor.flush()
    assert done.pushed == 2 and len(set(done.scan_ids.values())) == 1
    store = FleetStore(open_engine(fleet_pg.url))
    try:
        assert store.count_scans() == 1
    finally:
        store.engine.dispose()


def test_high_risk_vms_get_the_trap_rule(server: ServerProcess, tmp_path: Path) -> None:
    token = _post(server, "/api/v1/tokens", {"scope": "sensor", "host": "hv-3"})["token"]
    seen: dict[str, list[str]] = {}

    def scanner(vm: HostVm, methods: list[str]) -> dict[str, Any]:
        seen[vm.name] = methods
        return StoredResult(vm.name)

    sensor = Sensor(Client(server.url, token), parse_policy(POLICY), tmp_path / "s", host="hv-3",
                    discover=lambda: _vms("vm-r"), scanner=scanner)
    sensor.sweep()
    assert seen["vm-r"] == ["inspect"]
    vm_id = _get(server, "/api/v1/vms")[0]["id"]
    req = urllib.request.Request(f"{server.url}/api/v1/vms/{vm_id}", data=b'{"high_risk": true}', method="PATCH",
                                 headers={"Authorization": f"Bearer {server.operator_token}",
                                          "Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30).close()
    sensor.sweep()  # the answer to this push carries the flag
    sensor.sweep()
    assert seen["vm-r"] == ["inspect", "trap"]


def test_a_vm_being_scanned_is_not_scanned_again(tmp_path: Path) -> None:
    sensor = Sensor(None, parse_policy(POLICY), tmp_path / "s", host="hv",
                    discover=lambda: _vms("vm-l"), scanner=lambda vm, _m: StoredResult(vm.name))
    with vm_lock(tmp_path / "s" / "locks", "vm-l") as mine:
        assert mine
        busy = sensor.sweep()
    assert busy.skipped == {"vm-l": "being scanned by another sweep"} and not busy.scanned
    assert "vm-l" in sensor.sweep().scanned


def test_budget_defers_and_errors_do_not_stop_the_sweep(tmp_path: Path) -> None:
    policy = parse_policy(POLICY + "\n[budget]\ncpu_s_per_sweep = 0\n")
    sensor = Sensor(None, policy, tmp_path / "s", host="hv", discover=lambda: _vms("vm-1", "vm-2"),
                    scanner=lambda vm, _m: StoredResult(vm.name))
    sweeps = [sensor.sweep() for _ in range(3)]  # a spent budget still scans one VM per sweep
    assert [list(r.scanned) for r in sweeps] == [["vm-1"], ["vm-2"], ["vm-1"]]  # the deferred VM goes first next
    assert sweeps[0].skipped == {"vm-2": "deferred: this sweep's CPU budget is spent"}

    def broken(vm: HostVm, _m: list[str]) -> dict[str, Any]:
        if vm.name == "vm-1":
            raise NephoscopeError("cannot reach it")
        return StoredResult(vm.name)

    sensor = Sensor(None, parse_policy(POLICY), tmp_path / "t", host="hv", discover=lambda: _vms("vm-1", "vm-2"),
                    scanner=broken)
    report = sensor.sweep()
    assert list(report.scanned) == ["vm-2"] and "cannot reach it" in report.errors["vm-1"]
    assert report.cpu_s >= 0 and report.max_rss_mib > 0


def test_api_fuzz_on_postgresql(fleet_pg: Any, tmp_path: Path) -> None:
    """Schemathesis over the API on PostgreSQL (narrower types than SQLite: int4 ids, no NUL in text)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance
    from test_fleet_api import Fleet

    engine = open_engine(fleet_pg.url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    fleet = Fleet(tmp_path, url=fleet_pg.url)
    schema = schemathesis.openapi.from_asgi("/openapi.json", fleet.client.app)
    tokens = [fleet.operator, fleet.tokens["acme"], fleet.sensor_a]
    try:
        for op in schema.get_all_operations():
            operation = op.ok()

            @given(case=operation.as_strategy())
            @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
            def fuzz(case: Any) -> None:
                for token in tokens:
                    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}
                    try:
                        case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])
                    finally:
                        fleet.unrevoke()  # an operator case may revoke a token the next ones fuzz with

            fuzz()
    finally:
        fleet.client.close()
        fleet.store.engine.dispose()


def test_central_kb_lookup_and_snapshot(tmp_path: Path) -> None:
    """The server's KB (a real ELF ingested) answers page lookups and is downloaded once, then 304."""
    import hashlib

    from nephoscope.knowledge.binaries import CodePageDB, PackageMeta
    from nephoscope.knowledge.elfpages import exec_pages

    binary = Path("/usr/bin/true").resolve()
    data = binary.read_bytes()
    kb_path = tmp_path / "kb.sqlite"
    db = CodePageDB.open(kb_path)
    db.add_file(db.package_id(PackageMeta("coreutils", "9.1-1", "amd64")), "/usr/bin/true", exec_pages(data))
    db.commit()
    db.close()
    offset = exec_pages(data).pages[0].file_offset
    digest = hashlib.sha256(data[offset:offset + 4096]).hexdigest()  # computed here, not by the KB code
    server = ServerProcess(f"sqlite:///{tmp_path / 'fleet.sqlite'}", tmp_path / "server", kb=kb_path)
    server.start()
    try:
        token = _post(server, "/api/v1/tokens", {"scope": "sensor", "host": "hv-kb"})["token"]
        req = urllib.request.Request(f"{server.url}/api/v1/kb/lookup", method="POST",
                                     data=json.dumps({"digests": [digest, "ab" * 32]}).encode(),
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            hits = json.loads(resp.read())
        assert hits["ab" * 32] == []
        assert any(h["path"] == "/usr/bin/true" and h["package"] == "coreutils" and h["file_offset"] == offset
                   for h in hits[digest])
        client = Client(server.url, token)
        cached = tmp_path / "sensor-kb.sqlite"
        assert client.fetch_kb(cached) is True
        assert cached.read_bytes() == kb_path.read_bytes()
        assert client.fetch_kb(cached) is False  # unchanged: 304, not downloaded again
    finally:
        server.stop()


def test_sensor_takes_kb_and_vulnerability_db_from_the_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`sensor --kb-from-server`: both DBs downloaded once (then 304), re-fetched when changed, used by default."""
    from nephoscope.knowledge import binaries, vulns
    from nephoscope.knowledge.binaries import CodePageDB
    from nephoscope.knowledge.vulns import VulnDB, VulnRecord

    for env in ("NEPHOSCOPE_KB", "NEPHOSCOPE_VULNS"):
        monkeypatch.setenv(env, str(tmp_path / "unused.sqlite"))  # restored after the test
    kb_path, vulns_path = tmp_path / "central-kb.sqlite", tmp_path / "central-vulns.sqlite"
    CodePageDB.open(kb_path).close()
    central = VulnDB.open(vulns_path)
    central.replace("debian-tracker", [VulnRecord("openssl", "CVE-2024-5535", "3.0.17-1~deb12u2", urgency="low")],
                    {"libssl3": "openssl"})
    server = ServerProcess(f"sqlite:///{tmp_path / 'fleet.sqlite'}", tmp_path / "server", kb=kb_path,
                           vulns=vulns_path)
    server.start()
    state = tmp_path / "sensor"
    state.mkdir()
    try:
        token = _post(server, "/api/v1/tokens", {"scope": "sensor", "host": "hv-k"})["token"]
        client = Client(server.url, token)
        assert fetch_knowledge(client, state) == {"kb": True, "vulns": True}
        assert binaries.default_path() == state / "kb.sqlite" and vulns.default_path() == state / "vulns.sqlite"
        local = VulnDB.open()  # what the report opens: now the server's copy
        assert [(r.source, r.cve) for r in local.records()] == [("openssl", "CVE-2024-5535")]
        assert local.binaries() == {"libssl3": "openssl"}
        local.close()
        assert fetch_knowledge(client, state) == {"kb": False, "vulns": False}  # 304 both
        central.replace("debian-tracker", [VulnRecord("nginx", "CVE-2023-44487", "1.22.1-9+deb12u1")])
        assert fetch_knowledge(client, state) == {"kb": False, "vulns": True}
        local = VulnDB.open()
        assert {r.cve for r in local.records()} == {"CVE-2024-5535", "CVE-2023-44487"}
        local.close()
        server.stop()
        assert fetch_knowledge(client, state) == {"kb": False, "vulns": False}  # away: the cached copies serve
        assert vulns.default_path() == state / "vulns.sqlite"
    finally:
        central.close()
        server.stop()


def test_concurrent_pushes_of_one_key_store_one_scan(fleet_pg: Any) -> None:
    """Two replicas (here: two threads with their own engines) storing the same key race on the unique index."""
    import threading

    engine = open_engine(fleet_pg.url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    migrate(engine)
    stores = [FleetStore(engine), FleetStore(open_engine(fleet_pg.url))]
    host = stores[0].add_host("hv-race")
    doc = stored_document()
    results: list[tuple[int, bool, bool]] = []
    barrier = threading.Barrier(8)

    def push_once(store: FleetStore, key: str, vm: str) -> None:
        barrier.wait()
        results.append(store.ingest(host, {"idempotency_key": key, "host": "hv-race", "vm": vm,
                                           "started": 1.0, "finished": 2.0, "document": doc}))

    def race(keys: list[str], vm: str) -> None:
        results.clear()
        threads = [threading.Thread(target=push_once, args=(stores[i % 2], k, vm)) for i, k in enumerate(keys)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    try:
        race(["hv-race.same-key"] * 8, "vm")  # one key, eight concurrent pushes
        assert len(results) == 8 and len({r[0] for r in results}) == 1
        assert sum(1 for r in results if r[1]) == 1
        assert stores[0].count_scans() == 1
        race([f"hv-race.k{i}" for i in range(8)], "new-vm")  # eight keys, one VM nobody has seen yet
        assert len(results) == 8 and all(r[1] for r in results) and stores[0].count_scans() == 9
        operator = Principal("operator")
        assert [v["name"] for v in stores[0].list_vms(operator)] == ["vm", "new-vm"]
    finally:
        for s in stores:
            s.engine.dispose()


MEMORY_PROBE = """
import json, resource, sys
from pathlib import Path
from nephoscope.fleet.sensor import Sensor, apply_budget, parse_policy
from nephoscope.hypervisor.discover import Discovery, HostVm
from nephoscope.hypervisor.target import VmTarget
policy = parse_policy(sys.argv[2])
apply_budget(policy)
def scanner(vm, methods):
    if vm.name == "vm-greedy":
        hog = bytearray(400 << 20)  # more than the cap: must fail here, not take the host's memory
        return {"scan": {"size": len(hog)}}
    return {"scan": {"processes": [], "findings": [], "status": "ok"}}
vms = Discovery([HostVm(n, "qemu", VmTarget(n, live=True), methods={"inspect": None})
                 for n in ("vm-greedy", "vm-fine")], {})
report = Sensor(None, policy, Path(sys.argv[1]), host="hv", discover=lambda: vms, scanner=scanner).sweep()
print(json.dumps({"limit": resource.getrlimit(resource.RLIMIT_DATA)[0], "report": report.to_dict()}))
"""


def test_memory_cap_stops_a_greedy_scan_and_the_sweep_goes_on(tmp_path: Path) -> None:
    import subprocess

    policy = '[budget]\nmemory_mib = 300\nnice = 0\n[[rule]]\nmethod = "inspect"\nevery_s = 0\n'
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "s"), policy], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["limit"] == 300 << 20
    assert out["report"]["errors"]["vm-greedy"].startswith("MemoryError")
    assert list(out["report"]["scanned"]) == ["vm-fine"]
