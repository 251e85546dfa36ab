"""The fleet API on SQLite, in-process: every endpoint's scope check, tenant isolation, idempotent pushes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from fleet_docs import HOST_HANDLES, RULE_MARK, TAP, host_leaking_document, push, response_store, stored_document

from nephoscope.fleet.db import FleetError, FleetStore, migrate, open_engine, parse_duration, risk_of, sqlite_url
from nephoscope.fleet.sensor import local_response
from nephoscope.fleet.server import create_app


class Fleet:
    """A server with an operator, two tenants with one VM each on two hosts, and their tokens."""

    def __init__(self, tmp: Path, url: str | None = None) -> None:
        engine = open_engine(url or sqlite_url(tmp / "fleet.sqlite"))
        migrate(engine)
        self.store = FleetStore(engine)
        self.client = TestClient(create_app(self.store, kb_path=tmp / "no-kb.sqlite"))
        self.operator = self.store.issue_token("operator")
        self.sensor_a = self.call("post", "/api/v1/tokens", self.operator, json={"scope": "sensor", "host": "hv-a"}
                                  ).json()["token"]
        self.sensor_b = self.call("post", "/api/v1/tokens", self.operator, json={"scope": "sensor", "host": "hv-b"}
                                  ).json()["token"]
        self.tenants: dict[str, int] = {}
        self.tokens: dict[str, str] = {}
        self.vms: dict[str, int] = {}
        for tenant, host, sensor in (("acme", "hv-a", self.sensor_a), ("globex", "hv-b", self.sensor_b)):
            tid = self.call("post", "/api/v1/tenants", self.operator, json={"name": tenant}).json()["id"]
            self.tenants[tenant] = tid
            self.tokens[tenant] = self.call("post", "/api/v1/tokens", self.operator,
                                            json={"scope": "tenant", "tenant_id": tid}).json()["token"]
            got = self.call("post", "/api/v1/scans", sensor, json=push(host, f"{tenant}-vm"))
            assert got.status_code == 201, got.text
            vm_id = self.store.get_scan(self.store.find_principal(self.operator), got.json()["scan_id"])["vm_id"]
            self.vms[tenant] = vm_id
            assert self.call("patch", f"/api/v1/vms/{vm_id}", self.operator, json={"tenant_id": tid}
                             ).status_code == 204

    def unrevoke(self) -> None:
        """Make every revoked token valid again (the fuzzer may revoke the tokens it fuzzes with)."""
        from sqlalchemy import update

        from nephoscope.fleet.models import Token

        with self.store.session() as s:
            s.execute(update(Token).where(Token.revoked_at.is_not(None)).values(revoked_at=None))

    def call(self, method: str, path: str, token: str | None, **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.client.request(method, path, headers=headers, **kw)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    yield f
    f.client.close()
    f.store.engine.dispose()


READS = ["/api/v1/overview", "/api/v1/vms", "/api/v1/vms/{vm}", "/api/v1/vms/{vm}/scans", "/api/v1/vms/{vm}/findings",
         "/api/v1/vms/{vm}/notices", "/api/v1/scans/{scan}"]


def _paths(fleet: Fleet, tenant: str) -> list[str]:
    vm = fleet.vms[tenant]
    scan = fleet.call("get", f"/api/v1/vms/{vm}", fleet.operator).json()["latest_scan_id"]
    return [p.format(vm=vm, scan=scan) for p in READS]


def test_every_endpoint_wants_a_token(fleet: Fleet) -> None:
    spec = fleet.client.get("/openapi.json").json()
    for path, ops in spec["paths"].items():
        if path == "/healthz":
            continue
        concrete = path.replace("{vm_id}", "1").replace("{scan_id}", "1").replace("{token_id}", "1")
        for method in ops:
            assert fleet.call(method, concrete, None, json={}).status_code == 401, (method, path)
            assert fleet.call(method, concrete, "nph_wrong", json={}).status_code == 401, (method, path)


def test_operator_reads_everything(fleet: Fleet) -> None:
    for tenant in ("acme", "globex"):
        for path in _paths(fleet, tenant):
            assert fleet.call("get", path, fleet.operator).status_code == 200, path
    assert {v["name"] for v in fleet.call("get", "/api/v1/vms", fleet.operator).json()} == {"acme-vm", "globex-vm"}


def test_tenant_sees_only_its_own_vms(fleet: Fleet) -> None:
    for path in _paths(fleet, "acme"):
        assert fleet.call("get", path, fleet.tokens["acme"]).status_code == 200, path
    for path in _paths(fleet, "globex")[2:]:  # every per-VM and per-scan read of another tenant's VM: 404
        assert fleet.call("get", path, fleet.tokens["acme"]).status_code == 404, path
    listed = fleet.call("get", "/api/v1/vms", fleet.tokens["acme"]).json()
    assert [v["name"] for v in listed] == ["acme-vm"]
    overview = fleet.call("get", "/api/v1/overview", fleet.tokens["acme"]).json()
    assert overview["vms"] == 1 and list(overview["by_tenant"]) == ["acme"]


def test_tenant_gets_no_raw_observations(fleet: Fleet) -> None:
    vm = fleet.call("get", f"/api/v1/vms/{fleet.vms['acme']}", fleet.tokens["acme"]).json()
    assert "observations" not in vm["latest"]["document"] and "timings" not in vm["latest"]["document"]["scan"]
    assert vm["latest"]["document"]["scan"]["processes"]
    full = fleet.call("get", f"/api/v1/vms/{fleet.vms['acme']}", fleet.operator).json()
    assert full["latest"]["document"]["observations"]


def test_tenant_and_sensor_cannot_write_or_administer(fleet: Fleet) -> None:
    for token in (fleet.tokens["acme"], fleet.sensor_a):
        assert fleet.call("post", "/api/v1/tenants", token, json={"name": "evil"}).status_code == 403
        assert fleet.call("post", "/api/v1/tokens", token, json={"scope": "operator"}).status_code == 403
        assert fleet.call("patch", f"/api/v1/vms/{fleet.vms['acme']}", token, json={"high_risk": True}
                          ).status_code == 403
    assert fleet.call("post", "/api/v1/scans", fleet.tokens["acme"], json=push("hv-a", "x")).status_code == 403
    assert fleet.call("post", "/api/v1/scans", fleet.operator, json=push("hv-a", "x")).status_code == 403


def test_sensor_pushes_only_and_only_for_its_host(fleet: Fleet) -> None:
    for path in _paths(fleet, "acme"):
        assert fleet.call("get", path, fleet.sensor_a).status_code == 403, path
    assert fleet.call("post", "/api/v1/scans", fleet.sensor_a, json=push("hv-b", "globex-vm")).status_code == 403
    assert fleet.call("post", "/api/v1/scans", fleet.sensor_a, json=push("hv-a", "new-vm")).status_code == 201


def test_kb_is_for_sensors_and_operators(fleet: Fleet) -> None:
    body = {"digests": ["00" * 32]}
    assert fleet.call("post", "/api/v1/kb/lookup", fleet.tokens["acme"], json=body).status_code == 403
    assert fleet.call("get", "/api/v1/kb/snapshot", fleet.tokens["acme"]).status_code == 403
    # this server was given no KB file: an honest 404, not an empty answer that would read as "unknown code"
    assert fleet.call("post", "/api/v1/kb/lookup", fleet.sensor_a, json=body).status_code == 404
    assert fleet.call("get", "/api/v1/kb/snapshot", fleet.operator).status_code == 404


def test_push_is_idempotent(fleet: Fleet) -> None:
    body = push("hv-a", "acme-vm", key="hv-a.retry-me-0001")
    first = fleet.call("post", "/api/v1/scans", fleet.sensor_a, json=body)
    again = fleet.call("post", "/api/v1/scans", fleet.sensor_a, json=body)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["scan_id"] == again.json()["scan_id"] and again.json()["created"] is False
    assert fleet.store.count_scans() == 3


def test_stored_document_is_the_pushed_one(fleet: Fleet) -> None:
    doc = stored_document()
    vm = fleet.call("get", f"/api/v1/vms/{fleet.vms['acme']}", fleet.operator).json()
    assert vm["latest"]["document"] == doc
    findings = fleet.call("get", f"/api/v1/vms/{fleet.vms['acme']}/findings", fleet.operator).json()
    assert sorted((f["kind"], f["title"]) for f in findings) == sorted((f["kind"], f["title"])
                                                                       for f in doc["scan"]["findings"])
    assert vm["risk"] == risk_of(doc) and vm["risk"]["malicious_unknown"] > 0


def test_high_risk_flag_reaches_the_sensor(fleet: Fleet) -> None:
    vm = fleet.vms["acme"]
    assert fleet.call("patch", f"/api/v1/vms/{vm}", fleet.operator, json={"high_risk": True}).status_code == 204
    got = fleet.call("post", "/api/v1/scans", fleet.sensor_a, json=push("hv-a", "acme-vm")).json()
    assert got["high_risk"] is True


def test_filters(fleet: Fleet) -> None:
    assert [v["name"] for v in fleet.call("get", "/api/v1/vms?host=hv-b", fleet.operator).json()] == ["globex-vm"]
    assert [v["name"] for v in fleet.call("get", "/api/v1/vms?tenant=acme", fleet.operator).json()] == ["acme-vm"]
    assert len(fleet.call("get", "/api/v1/vms?risk=malicious_unknown", fleet.operator).json()) == 2
    assert fleet.call("get", "/api/v1/vms?risk=running_vulnerable", fleet.operator).json() == []


def test_nul_in_guest_strings_is_stored_as_replacement(fleet: Fleet) -> None:
    doc = stored_document()
    doc["scan"]["processes"][0]["cmdline"] = ["a\x00b"]
    assert fleet.call("post", "/api/v1/scans", fleet.sensor_a, json=push("hv-a", "nul\x00vm", doc)).status_code == 422
    got = fleet.call("post", "/api/v1/scans", fleet.sensor_a, json=push("hv-a", "nul-vm", doc))
    assert got.status_code == 201
    stored = fleet.call("get", f"/api/v1/scans/{got.json()['scan_id']}", fleet.operator).json()
    assert stored["document"]["scan"]["processes"][0]["cmdline"] == ["a\ufffdb"]


def test_ids_beyond_the_column_are_refused(fleet: Fleet) -> None:
    for path in ("/api/v1/vms/9999999999999999999999", "/api/v1/scans/2147483648", "/api/v1/vms/0/findings"):
        assert fleet.call("get", path, fleet.operator).status_code == 422, path


def _response(tmp: Path, vm: str) -> dict[str, Any]:
    response_store(tmp / "host.sqlite", vm)
    return {"host": "hv-a", "vm": vm, **local_response(vm, tmp / "host.sqlite")}


def test_filters_and_notices_are_recorded_per_vm(fleet: Fleet, tmp_path: Path) -> None:
    vm = fleet.vms["acme"]
    before = fleet.call("get", f"/api/v1/vms/{vm}/notices", fleet.operator).json()
    assert before == {"recorded": False, "reported_at": None, "view": "operator", "filters": [], "audit": [],
                      "notices": []}
    body = _response(tmp_path, "acme-vm")
    got = fleet.call("post", "/api/v1/response", fleet.sensor_a, json=body)
    assert got.status_code == 200, got.text
    assert got.json() == {"vm_id": vm, "filters": 1, "audit": 1, "notices": 2}
    full = fleet.call("get", f"/api/v1/vms/{vm}/notices", fleet.operator).json()
    assert full["recorded"] is True
    assert full["filters"] == body["filters"] and full["audit"] == body["audit"]  # the operator reads all of it
    assert full["filters"][0]["net"]["tap"] == TAP and RULE_MARK in full["filters"][0]["rules"][0]
    assert [n["status"] for n in full["notices"]] == ["failed", "sent"]
    assert "relay.sock" in full["notices"][0]["last_error"]


def test_a_tenant_reads_what_its_filters_do_not_the_hosts_rules(fleet: Fleet, tmp_path: Path) -> None:
    vm = fleet.vms["acme"]
    body = _response(tmp_path, "acme-vm")
    assert fleet.call("post", "/api/v1/response", fleet.sensor_a, json=body).status_code == 200
    seen = fleet.call("get", f"/api/v1/vms/{vm}/notices", fleet.tokens["acme"]).json()
    (f,) = seen["filters"]
    assert (f["cve"], f["applied_at"], f["ports"]) == ("CVE-2023-44487", 1_700_000_100.0, [443])
    assert f["does"] and f["does_not_stop"]
    (a,) = seen["audit"]
    assert (a["action"], a["cve"], a["at"]) == ("applied", "CVE-2023-44487", 1_700_000_100.0)
    assert [(n["event"], n["status"]) for n in seen["notices"]] == [("problems", "failed"), ("filter-applied", "sent")]
    text = str(seen)
    for hidden in (TAP, RULE_MARK, "10.0.7.2", "'root'", "relay.sock", "hooks.acme.example", "fp1", "nphtap"):
        assert hidden not in text, hidden
    assert fleet.call("get", f"/api/v1/vms/{vm}/notices", fleet.tokens["globex"]).status_code == 404


def test_response_pushes_are_scoped_and_idempotent(fleet: Fleet, tmp_path: Path) -> None:
    body = _response(tmp_path, "acme-vm")
    for token in (fleet.operator, fleet.tokens["acme"]):
        assert fleet.call("post", "/api/v1/response", token, json=body).status_code == 403
    assert fleet.call("post", "/api/v1/response", fleet.sensor_b, json=body).status_code == 403  # not its host
    for _ in range(2):
        assert fleet.call("post", "/api/v1/response", fleet.sensor_a, json=body).status_code == 200
    vm = fleet.vms["acme"]
    once = fleet.call("get", f"/api/v1/vms/{vm}/notices", fleet.operator).json()
    assert (len(once["filters"]), len(once["audit"]), len(once["notices"])) == (1, 1, 2)
    body["filters"], body["notices"][0]["status"] = [], "sent"  # the filter was removed; the retry got through
    assert fleet.call("post", "/api/v1/response", fleet.sensor_a, json=body).status_code == 200
    now = fleet.call("get", f"/api/v1/vms/{vm}/notices", fleet.operator).json()
    assert now["filters"] == [] and [n["status"] for n in now["notices"]] == ["sent", "sent"]
    body["audit"][0]["id"] = "not-an-id"
    refused = fleet.call("post", "/api/v1/response", fleet.sensor_a, json=body)
    assert refused.status_code == 422
    # the body has the shape the spec declares for 422 (HTTPValidationError), and says what did not fit
    spec = fleet.call("get", "/openapi.json", fleet.operator).json()
    declared = spec["paths"]["/api/v1/response"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]
    assert declared["$ref"].endswith("/HTTPValidationError")
    (item,) = refused.json()["detail"]
    assert set(item) >= {"loc", "msg", "type"} and "do not fit" in item["msg"]


def test_vulnerability_db_is_served_to_sensors_with_an_etag(tmp_path: Path) -> None:
    from nephoscope.knowledge.vulns import VulnDB, VulnRecord

    fleet = Fleet(tmp_path)
    path = tmp_path / "vulns.sqlite"
    try:
        assert fleet.call("get", "/api/v1/kb/vulns", fleet.sensor_a).status_code == 404  # none given
        fleet.client.close()
        fleet.client = TestClient(create_app(fleet.store, vulns_path=path))  # the same store, given a vulns DB
        db = VulnDB.open(path)
        db.replace("osv", [VulnRecord("openssl", "CVE-2024-5535", "3.0.17-1~deb12u2")])
        assert fleet.call("get", "/api/v1/kb/vulns", fleet.tokens["acme"]).status_code == 403
        first = fleet.call("get", "/api/v1/kb/vulns", fleet.sensor_a)
        assert first.status_code == 200 and first.content.startswith(b"SQLite format 3\x00")
        etag = first.headers["etag"]
        again = fleet.client.get("/api/v1/kb/vulns", headers={"Authorization": f"Bearer {fleet.operator}",
                                                               "If-None-Match": etag})
        assert again.status_code == 304
        db.replace("osv", [VulnRecord("nginx", "CVE-2023-44487", None)])
        changed = fleet.client.get("/api/v1/kb/vulns", headers={"Authorization": f"Bearer {fleet.sensor_a}",
                                                                 "If-None-Match": etag})
        assert changed.status_code == 200 and changed.headers["etag"] != etag
        db.close()
    finally:
        fleet.client.close()
        fleet.store.engine.dispose()


def test_tenants_read_no_host_handles_operators_read_everything(fleet: Fleet) -> None:
    doc = host_leaking_document()
    got = fleet.call("post", "/api/v1/scans", fleet.sensor_a, json=push("hv-a", "acme-vm", doc, at=1_800_000_000.0))
    assert got.status_code == 201
    vm, scan = fleet.vms["acme"], got.json()["scan_id"]
    reads = {f"/api/v1/vms/{vm}": HOST_HANDLES, f"/api/v1/scans/{scan}": HOST_HANDLES,
             f"/api/v1/vms/{vm}/findings": HOST_HANDLES[2:]}  # findings carry no unverifiable reasons
    for path, named in reads.items():
        seen = fleet.call("get", path, fleet.tokens["acme"]).text
        for handle in (*HOST_HANDLES, "/run/nephoscope", "/dev/shm", "qmp.sock"):
            assert handle not in seen, (path, handle)
        assert "<host>" in seen, path
        full = fleet.call("get", path, fleet.operator).text
        assert all(h in full for h in named), path  # the operator's view is complete
    latest = fleet.call("get", f"/api/v1/vms/{vm}", fleet.tokens["acme"]).json()["latest"]["document"]
    assert latest["scan"]["processes"] == doc["scan"]["processes"]  # guest data as the guest has it
    reasons = [u["reason"] for u in latest["scan"]["unverifiable"]]
    assert "cannot map <host> Permission denied" in reasons and "QMP at <host> refused the connection" in reasons
    assert latest["report_error"] == "no KB at <host>"
    assert fleet.call("get", f"/api/v1/vms/{vm}", fleet.operator).json()["latest"]["document"] == doc


def test_expired_tokens_are_refused(fleet: Fleet) -> None:
    import time

    tid = fleet.tenants["acme"]
    gone = fleet.store.issue_token("tenant", tenant_id=tid, expires=time.time() - 1)
    live = fleet.store.issue_token("tenant", tenant_id=tid, expires=time.time() + 3600)
    old_op = fleet.store.issue_token("operator", expires=time.time() - 1)
    host = fleet.store.add_host("hv-a")
    old_sensor = fleet.store.issue_token("sensor", host_id=host, expires=time.time() - 1)
    for path in _paths(fleet, "acme"):
        assert fleet.call("get", path, gone).status_code == 401, path
        assert fleet.call("get", path, old_op).status_code == 401, path
        assert fleet.call("get", path, live).status_code == 200, path
    assert fleet.call("post", "/api/v1/scans", old_sensor, json=push("hv-a", "acme-vm")).status_code == 401
    assert fleet.store.find_principal(gone) is None and fleet.store.find_principal(live) is not None


def test_tokens_issued_with_an_expiry(fleet: Fleet) -> None:
    import time

    before = time.time()
    got = fleet.call("post", "/api/v1/tokens", fleet.operator,
                     json={"scope": "tenant", "tenant_id": fleet.tenants["acme"], "expires_in_s": 3600})
    assert got.status_code == 201
    assert before + 3600 <= got.json()["expires"] <= time.time() + 3600
    assert fleet.call("get", "/api/v1/vms", got.json()["token"]).status_code == 200
    never = fleet.call("post", "/api/v1/tokens", fleet.operator, json={"scope": "operator"}).json()
    assert never["expires"] is None
    for bad in (0, -5, 10**12):
        assert fleet.call("post", "/api/v1/tokens", fleet.operator,
                          json={"scope": "operator", "expires_in_s": bad}).status_code == 422, bad


def test_durations() -> None:
    assert [parse_duration(t) for t in ("3600", "90s", "30m", "12h", "30d", "2w", "1.5h")] == [
        3600, 90, 1800, 43200, 2592000, 1209600, 5400]
    for bad in ("", "0", "0s", "-1h", "10y", "h", "1 d 2"):
        with pytest.raises(FleetError):
            parse_duration(bad)


def test_server_cli_issues_expiring_tokens(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    from nephoscope.fleet.models import Token

    url = sqlite_url(tmp_path / "cli.sqlite")
    argv = [sys.executable, "-m", "nephoscope.cli.main", "server", "--db", url, "--token-file",
            str(tmp_path / "op.token")]
    before = time.time()
    done = subprocess.run([*argv, "--new-token", "tenant", "--tenant", "acme", "--expires", "12h"],
                          capture_output=True, text=True, timeout=120)
    after = time.time()
    assert done.returncode == 0, done.stderr
    secret = done.stdout.strip().splitlines()[-1]
    store = FleetStore(open_engine(url))
    try:
        who = store.find_principal(secret)
        assert who is not None and who.scope == "tenant" and who.tenant_id == store.add_tenant("acme")
        with store.session() as s:
            row = s.get(Token, who.token_id)
            assert row is not None and row.expires is not None
            assert before + 43200 <= row.expires <= after + 43200
        plain = subprocess.run([*argv, "--new-token", "sensor", "--host", "hv-9"], capture_output=True, text=True,
                               timeout=120)
        assert plain.returncode == 0, plain.stderr
        sensor = store.find_principal(plain.stdout.strip().splitlines()[-1])
        assert sensor is not None and sensor.scope == "sensor" and store.host_name(sensor.host_id or 0) == "hv-9"
        for bad in (["--new-token", "tenant", "--tenant", "acme", "--expires", "0"], ["--new-token", "tenant"],
                    ["--new-token", "root"]):
            refused = subprocess.run([*argv, *bad], capture_output=True, text=True, timeout=120)
            assert refused.returncode != 0 and refused.stdout.strip() == "", bad
    finally:
        store.engine.dispose()
