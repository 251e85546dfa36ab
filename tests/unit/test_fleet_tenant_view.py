"""What a tenant token reads names nothing of the provider's side: no host, host id, tap, operator, sensor label
or other tenant, on every GET endpoint of the app (walked from its routes, so a new endpoint is covered)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fleet_docs import RULE_MARK, TAP, host_leaking_document, push, response_store, stored_document
from sqlalchemy import select
from starlette.routing import Route
from test_fleet_api import Fleet

from nephoscope.fleet.db import RISKS, tenant_text
from nephoscope.fleet.models import Host, Tenant, Token, Vm
from nephoscope.fleet.sensor import local_response

OPERATOR_NAME = "op-mallory"
LABELS = ("rack7 sensor of hv-a", "hv-b east sensor", "acme reader", "first on-call operator")
HIDDEN_KEYS = ("host_id", "idempotency_key", "net", "rules", "applied_by", "who", "target", "last_error", "tap")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """The two-tenant fleet with labelled tokens, a scan and response records that name the host side."""
    f = Fleet(tmp_path)
    op = f.call("post", "/api/v1/tokens", f.operator, json={"scope": "operator", "label": LABELS[3]})
    assert op.status_code == 201
    for label, host in ((LABELS[0], "hv-a"), (LABELS[1], "hv-b")):
        assert f.call("post", "/api/v1/tokens", f.operator, json={"scope": "sensor", "host": host, "label": label}
                      ).status_code == 201
    f.store.add_host("hv-unused.dc2.provider.example")  # a host with no VM: still a name a tenant must not read
    f.tokens["acme"] = f.call("post", "/api/v1/tokens", f.operator, json={
        "scope": "tenant", "tenant_id": f.tenants["acme"], "label": LABELS[2]}).json()["token"]
    doc = host_leaking_document()  # host paths in messages; and now the host's name too
    scan = doc["scan"]
    scan["unverifiable"].append({"method": "trap", "what": "gdbstub",
                                 "reason": "the sensor on hv-a has no gdbstub port"})
    scan["findings"][0]["title"] += " (reported by hv-a.dc1.provider.example)"
    scan["findings"][0]["evidence"][0]["seen_on"] = "hv-a"
    doc["report"]["code"][0]["title"] += " on hv-a"
    doc["report_error"] = "no KB on hv-a at /run/nephoscope/kb.sqlite"
    got = f.call("post", "/api/v1/scans", f.sensor_a, json=push("hv-a", "acme-vm", doc, at=1_800_000_000.0))
    assert got.status_code == 201
    response_store(tmp_path / "host.sqlite", "acme-vm", operator=OPERATOR_NAME)
    body = {"host": "hv-a", "vm": "acme-vm", **local_response("acme-vm", tmp_path / "host.sqlite")}
    body["filters"][0]["reason"] += " (applied by the sensor on hv-a)"
    body["audit"][0]["reason"] += " on hv-a"
    assert f.call("post", "/api/v1/response", f.sensor_a, json=body).status_code == 200
    yield f
    f.client.close()
    f.store.engine.dispose()


def _hidden(fleet: Fleet, tenant: str) -> list[str]:
    """Return every string of the provider's side (and of other tenants) the store holds for this fleet."""
    with fleet.store.session() as s:
        hosts = list(s.scalars(select(Host.name)))
        labels = [x for x in s.scalars(select(Token.label)) if x]
        others = list(s.scalars(select(Tenant.name).where(Tenant.name != tenant)))
        their_vms = list(s.scalars(select(Vm.name).where((Vm.tenant_id != fleet.tenants[tenant])
                                                         | Vm.tenant_id.is_(None))))
    assert {"hv-a", "hv-b", "hv-unused.dc2.provider.example"} <= set(hosts) and set(LABELS) <= set(labels)
    return [*hosts, *labels, *others, *their_vms, OPERATOR_NAME, TAP, RULE_MARK, "10.0.7.2", "relay.sock"]


def _samples(fleet: Fleet) -> dict[str, list[Any]]:
    """Return values to put in each path and query parameter of the app's GET endpoints."""
    operator = fleet.store.find_principal(fleet.operator)
    assert operator is not None
    vms = list(fleet.vms.values())
    scans = [s["id"] for vm in vms for s in fleet.store.vm_scans(operator, vm) or []]
    tokens = [t["id"] for t in fleet.store.list_tokens()]
    with fleet.store.session() as s:
        hosts = list(s.scalars(select(Host.name)))
    return {"vm_id": vms, "scan_id": scans, "token_id": tokens, "host": hosts, "tenant": [*fleet.tenants, "nobody"],
            "risk": list(RISKS), "limit": [1000]}


def _get_requests(fleet: Fleet) -> list[tuple[str, str]]:
    """Return (route, URL) for every GET route of the app, with every sample of its path and query parameters."""
    samples = _samples(fleet)
    out = []
    for route in fleet.client.app.routes:
        if not isinstance(route, Route) or "GET" not in (route.methods or ()):
            continue
        params = list(route.param_convertors)
        missing = [p for p in params if p not in samples]
        assert not missing, f"{route.path}: give the tenant-view test values for {missing}"
        paths = [route.path]
        for p in params:
            paths = [path.replace("{" + p + "}", str(v)) for path in paths for v in samples[p]]
        queries = [""]
        if isinstance(route, APIRoute):
            for q in route.dependant.query_params:
                assert q.name in samples, f"{route.path}: give the tenant-view test values for ?{q.name}="
                queries += [f"?{q.name}={v}" for v in samples[q.name]]
        out += [(route.path, path + query) for path in paths for query in queries]
    return out


def _keys(value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield k, v
            yield from _keys(v)
    elif isinstance(value, list):
        for v in value:
            yield from _keys(v)


def test_no_get_endpoint_shows_a_tenant_the_providers_side(fleet: Fleet) -> None:
    hidden = _hidden(fleet, "acme")
    assert not any(h in json.dumps(stored_document()) for h in hidden)  # the stored guest data names none of them
    answered: dict[str, set[int]] = {}
    for route, url in _get_requests(fleet):
        got = fleet.call("get", url, fleet.tokens["acme"])
        answered.setdefault(route, set()).add(got.status_code)
        assert got.status_code in (200, 403, 404), (url, got.status_code, got.text[:300])
        for name in hidden:
            assert name not in got.text, (url, name)
        if url.startswith("/api/v1/") and got.status_code == 200:  # the data (not the spec, which names fields)
            for key, value in _keys(got.json()):
                assert key not in HIDDEN_KEYS or value is None, (url, key, value)
                assert key != "host" or value is None, (url, value)
                assert key != "by_host" or value is None, (url, value)
    reads = {r for r, codes in answered.items() if 200 in codes and r.startswith("/api/v1/")}
    assert {"/api/v1/overview", "/api/v1/vms", "/api/v1/vms/{vm_id}", "/api/v1/vms/{vm_id}/scans",
            "/api/v1/vms/{vm_id}/findings", "/api/v1/vms/{vm_id}/notices", "/api/v1/scans/{scan_id}"} <= reads
    assert answered["/api/v1/tokens"] == {403} and answered["/api/v1/tokens/audit"] == {403}
    assert fleet.call("get", "/api/v1/vms?host=hv-a", fleet.tokens["acme"]).status_code == 403  # no host oracle
    assert fleet.call("get", "/api/v1/vms?host=hv-nowhere", fleet.tokens["acme"]).status_code == 403


def test_the_tenant_still_reads_its_vm_with_the_host_name_scrubbed(fleet: Fleet) -> None:
    vm = fleet.vms["acme"]
    seen = fleet.call("get", f"/api/v1/vms/{vm}", fleet.tokens["acme"]).json()
    assert (seen["name"], seen["tenant"], seen["host"]) == ("acme-vm", "acme", None)
    doc = seen["latest"]["document"]
    assert {"what": "gdbstub", "method": "trap", "reason": "the sensor on <host> has no gdbstub port"} in [
        {k: u[k] for k in ("what", "method", "reason")} for u in doc["scan"]["unverifiable"]]
    assert doc["report_error"] == "no KB on <host> at <host>"
    assert doc["scan"]["processes"] == stored_document()["scan"]["processes"]
    findings = fleet.call("get", f"/api/v1/vms/{vm}/findings", fleet.tokens["acme"]).json()
    assert any(f["title"].endswith("(reported by <host>.dc1.provider.example)") for f in findings)
    notices = fleet.call("get", f"/api/v1/vms/{vm}/notices", fleet.tokens["acme"]).json()
    assert notices["filters"][0]["reason"].endswith("(applied by the sensor on <host>)")
    overview = fleet.call("get", "/api/v1/overview", fleet.tokens["acme"]).json()
    assert (overview["view"], overview["vms"], overview["by_host"], list(overview["by_tenant"])) == (
        "tenant", 1, None, ["acme"])
    scans = fleet.call("get", f"/api/v1/vms/{vm}/scans", fleet.tokens["acme"]).json()
    assert len(scans) == 2 and all(s["idempotency_key"] is None for s in scans)


def test_operators_still_read_the_hosts(fleet: Fleet) -> None:
    vms = fleet.call("get", "/api/v1/vms", fleet.operator).json()
    assert {(v["name"], v["host"]) for v in vms} == {("acme-vm", "hv-a"), ("globex-vm", "hv-b")}
    assert [v["name"] for v in fleet.call("get", "/api/v1/vms?host=hv-a", fleet.operator).json()] == ["acme-vm"]
    overview = fleet.call("get", "/api/v1/overview", fleet.operator).json()
    assert overview["view"] == "operator" and set(overview["by_host"]) == {"hv-a", "hv-b"}
    vm = fleet.vms["acme"]
    seen = fleet.call("get", f"/api/v1/vms/{vm}", fleet.operator).json()
    assert seen["host"] == "hv-a" and "the sensor on hv-a has no gdbstub port" in json.dumps(seen)
    scans = fleet.call("get", f"/api/v1/vms/{vm}/scans", fleet.operator).json()
    assert all(s["idempotency_key"].startswith("hv-a.") for s in scans)
    findings = fleet.call("get", f"/api/v1/vms/{vm}/findings", fleet.operator).text
    assert "hv-a.dc1.provider.example" in findings
    notices = fleet.call("get", f"/api/v1/vms/{vm}/notices", fleet.operator).json()
    assert notices["filters"][0]["net"]["tap"] == TAP and OPERATOR_NAME in json.dumps(notices)


def test_the_host_name_is_replaced_only_as_a_whole_name() -> None:
    assert tenant_text("hv-1 and hv-1.dc1, not hv-12 or xhv-1 or hv-1_b", "hv-1") == (
        "<host> and <host>.dc1, not hv-12 or xhv-1 or hv-1_b")
    assert tenant_text("QMP at /run/nephoscope/x/qmp.sock on hv-1", "hv-1") == "QMP at <host> on <host>"
    assert tenant_text("nothing here", "") == "nothing here"
