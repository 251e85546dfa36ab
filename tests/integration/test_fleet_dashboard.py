"""The dashboard in a real browser: Debian's Chromium driven by Playwright (the system browser, no download).

Each page is screenshotted and checked (not blank, the expected text present); a process named with
markup and script is shown as literal text and no dialog fires.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nephoscope.fleet.localrun import ServerProcess

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from fleet_docs import (
    HOST_HANDLES,
    HOSTILE_COMM,
    RULE_MARK,
    TAP,
    host_leaking_document,
    hostile_document,
    push,
    response_store,
    stored_document,
)

from nephoscope.fleet.sensor import local_response

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (scripts/setup.sh)")
VULN = {"package": "openssl", "versions": ["3.0.11-1~deb12u2"], "running": True, "fixed_version": "3.0.17-1~deb12u2",
        "cves": [{"cve": "CVE-2024-5535", "fixed": "3.0.17-1~deb12u2", "urgency": "low", "origins": ["debian"]}],
        "processes": [{"pid": 117, "comm": "python3"}], "evidence": "arch (verified)"}


def _call(server: ServerProcess, method: str, path: str, token: str, body: Any = None) -> Any:
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode() if body is not None else None,
                                 method=method, headers={"Authorization": f"Bearer {token}",
                                                         "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        raw = resp.read()
        return json.loads(raw) if raw else None


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("fleet-dash")
    server = ServerProcess(f"sqlite:///{work / 'fleet.sqlite'}", work / "server")
    server.start()
    try:
        op = server.operator_token
        sensor = _call(server, "POST", "/api/v1/tokens", op, {"scope": "sensor", "host": "hv-east"})["token"]
        acme = _call(server, "POST", "/api/v1/tenants", op, {"name": "acme"})["id"]
        tenant = _call(server, "POST", "/api/v1/tokens", op, {"scope": "tenant", "tenant_id": acme})["token"]
        vulnerable = copy.deepcopy(stored_document())
        vulnerable["report"]["vulnerable"] = [VULN]
        ids = {}
        for name, doc in (("web-1", vulnerable), ("hostile-vm", hostile_document()), ("db-1", stored_document())):
            scan = _call(server, "POST", "/api/v1/scans", sensor, push("hv-east", name, doc))
            ids[name] = _call(server, "GET", f"/api/v1/scans/{scan['scan_id']}", op)["vm_id"]
        leaking = host_leaking_document()  # web-1's latest scan names host handles in titles and reasons
        leaking["report"]["vulnerable"] = [VULN]
        leaking["report"]["unverified"].append({"what": "gdbstub", "method": "trap",
                                                "reason": "the sensor on hv-east has no gdbstub port"})
        _call(server, "POST", "/api/v1/scans", sensor, push("hv-east", "web-1", leaking, at=1_700_000_100.0))
        _call(server, "PATCH", f"/api/v1/vms/{ids['web-1']}", op, {"tenant_id": acme})
        response_store(work / "host.sqlite", "app-1")  # a VM with a filter in force and two notices, no scan yet
        pushed = _call(server, "POST", "/api/v1/response", sensor,
                       {"host": "hv-east", "vm": "app-1", **local_response("app-1", work / "host.sqlite")})
        ids["app-1"] = pushed["vm_id"]
        _call(server, "PATCH", f"/api/v1/vms/{ids['app-1']}", op, {"tenant_id": acme})
        yield {"server": server, "operator": op, "tenant": tenant, "ids": ids, "shots": work / "shots"}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def _shot(page: Any, path: Path) -> None:
    """Save a full-page screenshot and check it is not blank (many distinct colours)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    with Image.open(path) as img:
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
        assert img.size[0] > 500 and img.size[1] > 300
    assert colours is not None and len(colours) > 20, f"{path} looks blank"


def _open(browser: Any, seeded: dict[str, Any], token: str, hash_: str) -> tuple[Any, list[str]]:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(f"{seeded['server'].url}/#token={token}")
    page.wait_for_selector("h1:has-text('Fleet overview')")
    if hash_:
        page.goto(f"{seeded['server'].url}/{hash_}")
        page.wait_for_selector("#vm-name")
    page.wait_for_load_state("networkidle")
    return page, dialogs


def test_overview_shows_vms_by_risk_per_host_and_tenant(browser: Any, seeded: dict[str, Any]) -> None:
    from playwright.sync_api import expect

    page, dialogs = _open(browser, seeded, seeded["operator"], "")
    text = page.inner_text("main")
    for expected in ("VMs by risk per host", "VMs by risk per tenant", "hv-east", "acme", "web-1", "hostile-vm",
                     "db-1", "running-vulnerable", "malicious/unknown code", "unverifiable", "Evaluation charts"):
        assert expected in text, expected
    assert page.inner_text("[data-risk=running_vulnerable] b") == "1"
    assert page.inner_text("[data-risk=malicious_unknown] b") == "3"
    _shot(page, seeded["shots"] / "overview.png")
    page.select_option("select[name=risk]", "running_vulnerable")
    page.click("#filters button")
    expect(page.locator("[data-section=VMs] tbody tr")).to_have_count(1)
    assert "web-1" in page.inner_text("[data-section=VMs]")
    _shot(page, seeded["shots"] / "overview-filtered.png")
    assert not dialogs
    page.close()


def test_vm_page_shows_what_runs_vulnerabilities_findings(browser: Any, seeded: dict[str, Any]) -> None:
    page, dialogs = _open(browser, seeded, seeded["operator"], f"#/vm/{seeded['ids']['web-1']}")
    text = page.inner_text("main")
    for expected in ("What runs", "/usr/bin/python3.11", "inspect: verified", "Running vulnerable packages",
                     "openssl", "CVE-2024-5535", "3.0.17-1~deb12u2", "Malicious or unknown code", "Findings over time",
                     "masquerading", "Could not be verified"):
        assert expected in text, expected
    for empty in ("Filters", "Notices"):
        assert "none recorded" in page.inner_text(f"[data-section={empty}]")
    _shot(page, seeded["shots"] / "vm-web-1.png")
    assert not dialogs
    page.close()


def test_hostile_process_names_are_text(browser: Any, seeded: dict[str, Any]) -> None:
    page, dialogs = _open(browser, seeded, seeded["operator"], f"#/vm/{seeded['ids']['hostile-vm']}")
    runs = page.locator("[data-section='What runs']")
    assert HOSTILE_COMM in runs.inner_text()  # "<script>alert(1)</script><b>x</b>" as literal characters
    assert runs.locator("script").count() == 0 and runs.locator("b").count() == 0
    assert page.locator("main img").count() == 0
    page.wait_for_timeout(500)  # give an injected handler the chance it must not have
    _shot(page, seeded["shots"] / "vm-hostile.png")
    assert dialogs == []
    page.close()


def test_tenant_sees_only_its_vm(browser: Any, seeded: dict[str, Any]) -> None:
    page, dialogs = _open(browser, seeded, seeded["tenant"], "")
    table = page.inner_text("[data-section=VMs]")
    assert "web-1" in table and "hostile-vm" not in table and "db-1" not in table
    assert "hv-east" not in page.inner_text("main") and "hv-east" not in page.content()  # a tenant reads no host
    assert page.locator("[data-section='VMs by risk per host']").count() == 0
    assert page.locator("select[name=host]").count() == 0 and "host" not in page.inner_text("[data-section=VMs] thead")
    _shot(page, seeded["shots"] / "tenant-overview.png")
    page.goto(f"{seeded['server'].url}/#/vm/{seeded['ids']['hostile-vm']}")
    page.wait_for_selector("main .error")
    assert "404" in page.inner_text("main .error")
    assert not dialogs
    page.close()


def test_vm_page_shows_filters_and_notices(browser: Any, seeded: dict[str, Any]) -> None:
    page, dialogs = _open(browser, seeded, seeded["operator"], f"#/vm/{seeded['ids']['app-1']}")
    filters, notices = page.inner_text("[data-section=Filters]"), page.inner_text("[data-section=Notices]")
    for expected in ("CVE-2023-44487", "cve-2023-44487-h2-rst", "nginx 1.22.1-9", "port(s) 443",
                     "2023-11-14 22:15:00Z", "limits new TCP connections", "a slow attack under the limit",
                     TAP, RULE_MARK, "Filter changes", "applied", "root"):
        assert expected in filters, expected
    for expected in ("filter-applied", "email", "sent", "problems", "failed", "relay.sock"):
        assert expected in notices, expected
    assert "none recorded" not in filters + notices
    _shot(page, seeded["shots"] / "vm-app-1-operator.png")
    page.close()
    page, more = _open(browser, seeded, seeded["tenant"], f"#/vm/{seeded['ids']['app-1']}")
    filters, notices = page.inner_text("[data-section=Filters]"), page.inner_text("[data-section=Notices]")
    for expected in ("CVE-2023-44487", "limits new TCP connections", "a slow attack under the limit",
                     "2023-11-14 22:15:00Z", "applied", "filter-applied", "sent", "failed"):
        assert expected in filters + notices, expected
    for hidden in (TAP, RULE_MARK, "root", "relay.sock", "sec@acme.example"):
        assert hidden not in page.inner_text("main"), hidden
    _shot(page, seeded["shots"] / "vm-app-1-tenant.png")
    assert not dialogs and not more
    page.close()


def test_tenant_pages_carry_no_host_handles(browser: Any, seeded: dict[str, Any]) -> None:
    vm = f"#/vm/{seeded['ids']['web-1']}"
    page, dialogs = _open(browser, seeded, seeded["tenant"], vm)
    text = page.inner_text("main")
    assert "Could not be verified" in text and "<host>" in page.inner_text("[data-section='Could not be verified']")
    assert "the sensor on <host> has no gdbstub port" in text
    for handle in (*HOST_HANDLES, "/run/nephoscope", "/dev/shm", "qmp.sock", "hv-east"):
        assert handle not in text and handle not in page.content(), handle
    _shot(page, seeded["shots"] / "vm-web-1-tenant.png")
    page.close()
    page, more = _open(browser, seeded, seeded["operator"], vm)
    assert HOST_HANDLES[0] in page.inner_text("[data-section='Could not be verified']")  # the operator's is complete
    assert "host hv-east" in page.inner_text("main")
    assert not dialogs and not more
    page.close()


def test_screenshots_are_kept(seeded: dict[str, Any]) -> None:
    """Copy the screenshots where the run can be inspected (NEPHOSCOPE_SHOTS, default: the pytest temp dir)."""
    import os

    dest = os.environ.get("NEPHOSCOPE_SHOTS")
    shots = sorted(seeded["shots"].glob("*.png"))
    if dest and shots:
        Path(dest).mkdir(parents=True, exist_ok=True)
        for s in shots:
            shutil.copy(s, Path(dest) / s.name)
