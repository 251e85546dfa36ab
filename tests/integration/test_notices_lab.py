"""Notices and SBOM/VEX on a real guest: the tampered lab guest is scanned, its tenant is told, exports validate.

The guest runs nginx and the planted malicious code (manifest techniques); a test vulnerability record puts
the running nginx version below a fix (the default feed may be empty here), so the running-vulnerable path
is exercised too. The notice is received by a real SMTP server and a real HTTP webhook receiver.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from nephoscope.knowledge.vulns import VulnDB, VulnRecord
from nephoscope.lab.runner import Guest
from nephoscope.response.notices import SIGNATURE_HEADER, TIMESTAMP_HEADER, Delivery, verify_signature
from nephoscope.response.tenants import parse_tenants
from nephoscope.service.notices import notify_result
from nephoscope.service.sbom import export, purl
from nephoscope.service.scan import run_scan
from nephoscope.service.targets import resolve_target
from nephoscope.store.sqlite import Store
from receivers import smtp_server, tenants_toml, webhook_receiver
from schemas import validate_cyclonedx, validate_openvex

pytestmark = pytest.mark.guest
SECRET = "tenant-secret-for-the-lab-test"
TEST_CVE = "CVE-2026-90001"  # a test record, not a real advisory
FAST = Delivery(attempts=3, backoff=0.0, timeout=10.0, sleep=lambda _s: None)


def test_scan_then_notice_and_exports(tampered_guest: Guest, default_kb: None, tmp_path: Path) -> None:
    manifest = tampered_guest.manifest()
    nginx = manifest["packages"]["nginx"]
    vulns = VulnDB.open(tmp_path / "v.sqlite")
    vulns.replace("changelog", [VulnRecord("nginx", TEST_CVE, nginx + "+fix1", urgency="high")])
    store = Store(tmp_path / "s.sqlite")
    result = run_scan(resolve_target(tampered_guest.name), ["arch", "inspect", "agent"], store=store)
    assert result.status == "ok"
    with smtp_server() as box, webhook_receiver() as hook:
        tenants = parse_tenants(tenants_toml(box, hook, tampered_guest.name, SECRET))
        out = notify_result(result, store=store, tenants=tenants, delivery=FAST, vulns=vulns)
        assert out is not None and [(d.channel, d.status) for d in out.deliveries] == [("email", "sent"),
                                                                                       ("webhook", "sent")]
        headers, body = hook.requests[0]
        assert verify_signature(SECRET, headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
        assert not verify_signature("another-tenant-secret!!", headers[TIMESTAMP_HEADER], body,
                                    headers[SIGNATURE_HEADER])
        doc = json.loads(body)
        kinds = {p["kind"] for p in doc["problems"]}
        print(sorted(kinds))
        assert {"running-vulnerable", "masquerading", "deleted-binary", "fileless", "hidden-process"} <= kinds
        assert any(p["kind"] == "running-vulnerable" and p["title"].startswith(f"nginx {nginx} is running")
                   for p in doc["problems"])
        msg = box.messages[0]
        files = {p.get_filename(): p.get_content() for p in msg.iter_attachments()}
        page = files[f"report-{tampered_guest.name}.html"]
        page = page.decode() if isinstance(page, bytes) else page
        assert TEST_CVE in page and "Security report for" in page
        everything = str(msg) + body.decode()
        for internal in (str(tampered_guest.ram_path), "/run/nephoscope", "qmp.sock", f"pid {tampered_guest.pid} "):
            assert internal not in everything, internal
        again = notify_result(result, store=store, tenants=tenants, delivery=FAST, vulns=vulns)
        assert again is not None and again.deliveries == [] and len(box.messages) == 1 and len(hook.requests) == 1
    bom = export(tampered_guest.name, "cyclonedx", store=store, vulns=vulns)
    validate_cyclonedx(bom)
    running = {c["name"]: c for c in bom["components"]}
    for proc in manifest["processes"]:  # every packaged process binary of the ground truth is in the SBOM
        if proc["package"] and not proc["technique"]:
            assert proc["package"] in running, proc
            assert running[proc["package"]]["version"] == proc["version"], proc
    vex = export(tampered_guest.name, "openvex", store=store, vulns=vulns)
    validate_openvex(vex)
    by_product = {s["products"][0]["@id"].split("?")[0]: s for s in vex["statements"]}
    assert by_product[purl("nginx", nginx).split("?")[0]]["status"] == "affected"
    common = by_product[purl("nginx-common", manifest["packages"]["nginx-common"]).split("?")[0]]  # no code
    assert common["status"] == "not_affected" and common["justification"] == "vulnerable_code_not_in_execute_path"


@pytest.fixture(scope="module")
def own_clean_guest() -> Iterator[Guest]:
    """A clean lab guest of this module only: the test stops its nginx, which the session's guests must keep."""
    from nephoscope.lab import runner
    from nephoscope.lab.build import build_image
    from nephoscope.lab.profile import load_profile

    name = f"notices-gone-{os.getpid() % 100000}"
    guest = runner.start(name, build_image(load_profile("clean")))
    try:
        yield guest
    finally:
        runner.stop(name, quiet=True)


def test_problem_gone_after_the_vulnerable_code_stops(own_clean_guest: Guest, default_kb: None,
                                                      tmp_path: Path) -> None:
    """Scan → "problem" notice (nginx below a fix is running); stop nginx in the guest; scan → "resolved"."""
    from nephoscope.hypervisor.qga import GuestAgent

    guest = own_clean_guest
    nginx = guest.manifest()["packages"]["nginx"]
    vulns = VulnDB.open(tmp_path / "v.sqlite")
    vulns.replace("changelog", [VulnRecord("nginx", TEST_CVE, nginx + "+fix1", urgency="high")])
    store = Store(tmp_path / "s.sqlite")
    with smtp_server() as box, webhook_receiver() as hook:
        tenants = parse_tenants(f'[smtp]\nhost = "127.0.0.1"\nport = {box.port}\n[tenants.acme]\n'
                                f'vms = ["{guest.name}"]\nemails = ["secops@acme.example"]\nwebhook = "{hook.url}"\n'
                                f'secret = "{SECRET}"\n')
        first = run_scan(resolve_target(guest.name), ["arch", "inspect", "agent"], store=store)
        out = notify_result(first, store=store, tenants=tenants, delivery=FAST, vulns=vulns)
        assert out is not None and [d.event for d in out.deliveries] == ["problem", "problem"]
        problems = json.loads(hook.requests[0][1])["problems"]
        print([p["title"] for p in problems])
        assert [p["kind"] for p in problems] == ["running-vulnerable"]  # the clean guest: nothing else
        with GuestAgent(guest.qga_socket, timeout=60) as agent:
            code, _out, err = agent.exec(["/bin/busybox", "sh", "-c", "killall nginx; sleep 1; "
                                          "while pidof nginx >/dev/null; do sleep 1; done"], timeout=60)
            assert code == 0, err
        second = run_scan(resolve_target(guest.name), ["arch", "inspect", "agent"], store=store)
        assert not any(p.comm == "nginx" for p in second.view.processes.values())
        out = notify_result(second, store=store, tenants=tenants, delivery=FAST, vulns=vulns)
        assert out is not None and [d.event for d in out.deliveries] == ["resolved", "resolved"]
        doc = json.loads(hook.requests[1][1])
        assert doc["problems"] == [] and [p["kind"] for p in doc["gone"]] == ["running-vulnerable"]
        assert "gone" in box.messages[1]["Subject"] and len(box.messages) == 2
    vex = export(guest.name, "openvex", store=store, vulns=vulns)
    validate_openvex(vex)
    statement = next(s for s in vex["statements"] if s["products"][0]["@id"].split("?")[0]
                     == purl("nginx", nginx).split("?")[0])
    assert statement["status"] == "affected" and "not at the latest one" in statement["status_notes"]
