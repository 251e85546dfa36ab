"""Notices to a VM's owner, received by a real SMTP server (aiosmtpd) and an HTTP webhook receiver.

The scans are stored for real (the SQLite store) and the report is built from the store as `notices send`
does; one scan comes from the shared dump of the tampered lab guest with a process renamed to markup.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nephoscope.analysis.merge import merge
from nephoscope.core.records import Observation, Provenance, Verdict
from nephoscope.knowledge.vulns import VulnDB, VulnRecord
from nephoscope.response.notices import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Delivery,
    Problem,
    notify_filter_change,
    sign,
    verify_signature,
)
from nephoscope.response.tenants import TenantError, parse_tenants
from nephoscope.service.notices import notify_vm
from nephoscope.store.notices import NoticeLog
from nephoscope.store.sqlite import Store
from receivers import Hook, Mailbox, smtp_server, tenants_toml, webhook_receiver

HOSTILE = "<script>alert(1)</script>|**x**](http://evil)\x1b[31m"
SECRET_A, SECRET_B = "a" * 8 + "-tenant-a-secret", "b" * 8 + "-tenant-b-secret"
OWNER = {"/usr/sbin/nginx": "nginx"}.get
FAST = Delivery(attempts=3, backoff=0.0, timeout=5.0, sleep=lambda _s: None)
TAMPERED_DUMP = Path(os.environ.get("NEPHOSCOPE_DUMPS", "/work/dumps")) / "tampered-6.1.elf"


def _tenants(box: Mailbox, hook: Hook, vm: str = "vm-a") -> str:
    return tenants_toml(box, hook, vm, SECRET_A) + f"""
[tenants.other]
vms = ["vm-b*"]
emails = ["soc@other.example"]
webhook = "{hook.url}"
secret = "{SECRET_B}"
"""


def _obs(vm: str, comm: str, nginx: str = "1.0-1", t: float = 1.0) -> list[Observation]:
    def o(method: str, kind: str, key: str, data: dict, verdict: Verdict = Verdict.REPORTED) -> Observation:
        return Observation(kind, key, data, Provenance(method, vm, t), verdict, "")

    return [o("agent", "process", "pid:10", {"pid": 10, "ppid": 1, "comm": comm, "exe": "/usr/sbin/nginx",
                                             "cmdline": [comm]}),
            o("agent", "package", "package:nginx", {"name": "nginx", "version": nginx, "source": "nginx"})]


@pytest.fixture()
def vulns(tmp_path: Path) -> VulnDB:
    db = VulnDB.open(tmp_path / "v.sqlite")
    db.replace("changelog", [VulnRecord("nginx", "CVE-2026-1111", "1.0-2", urgency="high")])
    return db


def _save(store: Store, vm: str, obs: list[Observation]) -> int:
    view = merge(obs, ["agent"], vm)
    return store.save_scan(vm, ["agent"], obs, view.findings, {"status": "ok"}, started=1.0)


def _body(msg: object, subtype: str) -> str:
    part = msg.get_body(preferencelist=(subtype,))  # type: ignore[attr-defined]
    return str(part.get_content())


def test_mail_and_webhook_with_report_escaped_and_signed(tmp_path: Path, vulns: VulnDB) -> None:
    store = Store(tmp_path / "s.sqlite")
    _save(store, "vm-a", _obs("vm-a", HOSTILE))
    _save(store, "vm-b1", _obs("vm-b1", "secret-of-other-tenant"))
    with smtp_server() as box, webhook_receiver() as hook:
        tenants = parse_tenants(_tenants(box, hook))
        out = notify_vm("vm-a", store=store, tenants=tenants, delivery=FAST, vulns=vulns, owner=OWNER)
        assert [(d.channel, d.status, d.attempts) for d in out.deliveries] == [("email", "sent", 1),
                                                                               ("webhook", "sent", 1)]
        assert len(box.messages) == 1 and box.recipients == [["secops@acme.example"]]
        msg = box.messages[0]
        assert "vm-a" in msg["Subject"] and "2 problem" in msg["Subject"]  # vulnerable nginx; comm masquerading
        files = {p.get_filename(): p.get_content() for p in msg.iter_attachments()}
        assert set(files) == {"report-vm-a.html", "report-vm-a.md"}
        page = files["report-vm-a.html"]
        page = page.decode() if isinstance(page, bytes) else page
        assert "Security report for vm-a" in page and "CVE-2026-1111" in page
        assert "<script>" not in page and "&lt;script&gt;" in page and "\x1b" not in page
        md = files["report-vm-a.md"]
        md = md.decode() if isinstance(md, bytes) else md
        assert "<script>" not in md and "](http" not in md and "\\*\\*x" in md
        html_body, text_body = _body(msg, "html"), _body(msg, "plain")
        assert "nginx 1.0-1 is running" in text_body and "CVE-2026-1111" in html_body
        assert "<script>" not in html_body and "\x1b" not in text_body + html_body
        # the webhook: signed with tenant acme's secret, not with the other tenant's
        headers, body = hook.requests[0]
        stamp, signature = headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER]
        assert verify_signature(SECRET_A, stamp, body, signature)
        assert not verify_signature(SECRET_B, stamp, body, signature)
        assert not verify_signature(SECRET_A, stamp, body + b" ", signature)
        assert not verify_signature(SECRET_A, str(int(stamp) - 3600), body, sign(SECRET_A, str(int(stamp) - 3600),
                                                                                   body))  # replayed late
        doc = json.loads(body)
        assert doc["event"] == "problem" and doc["vm"] == "vm-a" and doc["tenant"] == "acme"
        assert sorted(p["kind"] for p in doc["problems"]) == ["masquerading", "running-vulnerable"]
        assert "\x1b" not in body.decode() and "\\x1b" in body.decode()  # control characters escaped
        assert doc["report"]["vulnerable"][0]["processes"][0]["comm"] == HOSTILE  # JSON is data: kept as is
        everything = body.decode() + str(msg)
        for internal in ("vm-b1", "secret-of-other-tenant", "/run/nephoscope", str(tmp_path), "qmp.sock"):
            assert internal not in everything, internal


def test_no_second_notice_then_problem_gone(tmp_path: Path, vulns: VulnDB) -> None:
    store = Store(tmp_path / "s.sqlite")
    with smtp_server() as box, webhook_receiver() as hook:
        tenants = parse_tenants(_tenants(box, hook))
        _save(store, "vm-a", _obs("vm-a", "nginx"))
        first = notify_vm("vm-a", store=store, tenants=tenants, delivery=FAST, vulns=vulns, owner=OWNER)
        assert len(first.deliveries) == 2
        _save(store, "vm-a", _obs("vm-a", "nginx", t=2.0))  # a later scan, same state
        again = notify_vm("vm-a", store=store, tenants=tenants, delivery=FAST, vulns=vulns, owner=OWNER)
        assert again.deliveries == [] and again.reason == "unchanged since the last notice"
        assert len(box.messages) == 1 and len(hook.requests) == 1
        _save(store, "vm-a", _obs("vm-a", "nginx", nginx="1.0-2", t=3.0))  # updated: fixed version running
        gone = notify_vm("vm-a", store=store, tenants=tenants, delivery=FAST, vulns=vulns, owner=OWNER)
        assert [d.event for d in gone.deliveries] == ["resolved", "resolved"]
        assert "gone" in box.messages[1]["Subject"]
        doc = json.loads(hook.requests[1][1])
        assert doc["event"] == "resolved" and doc["problems"] == [] and doc["gone"][0]["kind"] == "running-vulnerable"
        quiet = notify_vm("vm-a", store=store, tenants=tenants, delivery=FAST, vulns=vulns, owner=OWNER)
        assert quiet.deliveries == [] and len(box.messages) == 2


def test_failing_receiver_retried_and_recorded(tmp_path: Path, vulns: VulnDB) -> None:
    store = Store(tmp_path / "s.sqlite")
    _save(store, "vm-a", _obs("vm-a", "nginx"))
    slept: list[float] = []
    delivery = Delivery(attempts=4, backoff=0.5, timeout=5.0, sleep=slept.append)
    with smtp_server() as box, webhook_receiver(fail=2) as hook:
        text = _tenants(box, hook).replace(f"port = {box.port}", "port = 1")  # nothing listens on port 1
        out = notify_vm("vm-a", store=store, tenants=parse_tenants(text), delivery=delivery, vulns=vulns,
                        owner=OWNER)
        mail, web = out.deliveries
        assert (mail.status, mail.attempts) == ("failed", 4) and "Connection refused" in mail.last_error
        assert (web.status, web.attempts, web.last_error) == ("sent", 3, "")
        assert len(hook.requests) == 3 and slept == [0.5, 1.0, 2.0, 0.5, 1.0]  # doubling backoff per channel
        signatures = {h[SIGNATURE_HEADER] for h, _b in hook.requests}
        assert all(verify_signature(SECRET_A, h[TIMESTAMP_HEADER], b, h[SIGNATURE_HEADER]) for h, b in hook.requests)
        assert len(signatures) >= 1
    listed = NoticeLog(store).notices("vm-a")
    assert {(r.channel, r.status) for r in listed} == {("email", "failed"), ("webhook", "sent")}
    with smtp_server() as box, webhook_receiver(status=500) as hook:  # every channel fails: the next run retries
        tenants = parse_tenants(_tenants(box, hook).replace(f"port = {box.port}", "port = 1"))
        _save(store, "vm-a", _obs("vm-a", "nginx", nginx="0.9-1", t=2.0))
        failed = notify_vm("vm-a", store=store, tenants=tenants, delivery=FAST, vulns=vulns, owner=OWNER)
        assert [d.status for d in failed.deliveries] == ["failed", "failed"]
        assert "HTTP 500" in failed.deliveries[1].last_error
        tenants = parse_tenants(_tenants(box, hook))
        hook.status = 200
        retried = notify_vm("vm-a", store=store, tenants=tenants, delivery=FAST, vulns=vulns, owner=OWNER)
        assert [d.status for d in retried.deliveries] == ["sent", "sent"] and len(box.messages) == 1


def test_webhook_redirect_is_a_failure(tmp_path: Path) -> None:
    with smtp_server() as box, webhook_receiver(status=307) as hook:
        tenant = parse_tenants(_tenants(box, hook)).get_tenant("acme")
        sent = notify_filter_change(tenant, "vm-a", "applied", "CVE-1", "x", NoticeLog(Store(tmp_path / "s.sqlite")),
                                    delivery=FAST)
        web = next(d for d in sent if d.channel == "webhook")
        assert (web.status, web.attempts) == ("failed", 3) and "307" in web.last_error


def test_filter_change_notice(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    with smtp_server() as box, webhook_receiver() as hook:
        tenant = parse_tenants(_tenants(box, hook)).get_tenant("acme")
        log = NoticeLog(store)
        summary = "HTTP/2 stream resets limited on port 443 <b>haproxy</b>; does not stop other HTTP/2 attacks"
        problem = Problem("running-vulnerable:nginx", "running-vulnerable", "high", "nginx 1.0-1 is running")
        sent = notify_filter_change(tenant, "vm-a", "applied", "CVE-2023-44487", summary, log, problems=[problem],
                                    delivery=FAST)
        assert [d.status for d in sent] == ["sent", "sent"]
        assert notify_filter_change(tenant, "vm-a", "applied", "CVE-2023-44487", summary, log, delivery=FAST) == []
        removed = notify_filter_change(tenant, "vm-a", "removed", "CVE-2023-44487", "nginx was updated", log,
                                       delivery=FAST)
        assert [d.event for d in removed] == ["filter", "filter"]
        assert "CVE-2023-44487 was applied" in box.messages[0]["Subject"]
        assert "removed from" in box.messages[1]["Subject"]
        assert "<b>haproxy</b>" not in _body(box.messages[0], "html")
        doc = json.loads(hook.requests[0][1])
        assert doc["filter"] == {"action": "applied", "cve": "CVE-2023-44487", "summary": summary}
        with pytest.raises(ValueError):
            notify_filter_change(tenant, "vm-a", "paused", "CVE-1", "", log)


@pytest.mark.skipif(not TAMPERED_DUMP.exists(), reason="the shared dump of the tampered guest is not here")
def test_stored_dump_scan_with_markup_process_name(tmp_path: Path, vulns: VulnDB) -> None:
    """A real scan (inspect on the tampered guest's dump), one process renamed to markup, stored, notified."""
    from nephoscope.service.scan import run_scan
    from nephoscope.service.targets import resolve_target

    manifest = json.loads(TAMPERED_DUMP.with_name("tampered-6.1.manifest.json").read_text())
    planted = {t["id"]: t["pid"] for t in manifest["techniques"]}
    result = run_scan(resolve_target(str(TAMPERED_DUMP)), ["inspect"])
    victim = planted["deleted-binary"]  # its finding's title names the process: the name reaches the notice
    renamed = [Observation(o.kind, o.key, {**o.data, "comm": HOSTILE}
                           if o.kind == "process" and o.data.get("pid") == victim else o.data, o.provenance,
                           o.verdict, o.reason) for o in result.observations]
    store = Store(tmp_path / "s.sqlite")
    view = merge(renamed, ["inspect"], "tampered")
    store.save_scan("tampered", ["inspect"], renamed, view.findings, {"status": "ok"}, started=1.0)
    with smtp_server() as box, webhook_receiver() as hook:
        out = notify_vm("tampered", store=store, tenants=parse_tenants(_tenants(box, hook, "tampered")),
                        delivery=FAST, vulns=vulns)
        assert [d.status for d in out.deliveries] == ["sent", "sent"]
        problems = json.loads(hook.requests[0][1])["problems"]
        kinds = {p["kind"] for p in problems}
        # what inspect alone sees of the planted techniques (the manifest's ground truth)
        assert {"masquerading", "deleted-binary", "fileless"} <= kinds, kinds
        for kind, technique in (("masquerading", "masquerade"), ("deleted-binary", "deleted-binary"),
                                ("fileless", "fileless-memfd")):
            assert any(f"pid {planted[technique]} " in p["title"] for p in problems if p["kind"] == kind), kind
        msg = box.messages[0]
        files = {p.get_filename(): p.get_content() for p in msg.iter_attachments()}
        page = files["report-tampered.html"]
        page = page.decode() if isinstance(page, bytes) else page
        assert "deleted file" in page and "<script>" not in page and "&lt;script&gt;" in page
        assert "\x1b" not in page and "<script>" not in _body(msg, "html") and "&lt;script&gt;" in _body(msg, "html")
        assert "\x1b" not in _body(msg, "plain") and "\\x1b[31m" in _body(msg, "plain")  # inert in plain text
        text = str(msg) + hook.requests[0][1].decode()
        assert str(TAMPERED_DUMP) not in text and "/work/dumps" not in text


def test_tenants_validation(tmp_path: Path) -> None:
    ok = '[tenants.a]\nvms = ["x"]\nemails = ["a@b.example"]\n'
    assert parse_tenants(ok).find_tenant("x").name == "a"  # type: ignore[union-attr]
    assert parse_tenants(ok).find_tenant("y") is None
    bad = {
        '[tenants.a]\nvms = ["x"]\nwebhook = "https://h.example/"\nsecret = "short"\n': "secret of at least",
        '[tenants.a]\nvms = ["x"]\nemails = ["a@b.example\\nBcc: c@d.example"]\n': "plain addresses",
        '[tenants.a]\nvms = ["x"]\nemails = ["a@b.example"]\ncolour = 1\n': "unknown key",
        '[tenants.a]\nvms = []\nemails = ["a@b.example"]\n': "non-empty list",
        '[tenants.a]\nvms = ["x"]\n': "nobody is told",
        ok + '[tenants.b]\nvms = ["x"]\nemails = ["c@d.example"]\n': "claimed by tenants",
        '[tenants.a]\nvms = ["x"]\nemails = ["a@b.example"]\n[tenants.a.smtp]\nport = "25"\n': "wrong type",
        '[tenants.a]\nvms = ["x"]\nwebhook = "file:///etc/passwd"\nsecret = "0123456789abcdef"\n': "http",
        "tenants = 3": "no [tenants.NAME]",
        "[[": "not valid TOML",
    }
    for text, why in bad.items():
        with pytest.raises(TenantError, match=why.replace("[", r"\[")):
            parse_tenants(text)
    overlap = parse_tenants(ok + '[tenants.b]\nvms = ["x*"]\nemails = ["c@d.example"]\n')
    with pytest.raises(TenantError, match="disjoint"):
        overlap.find_tenant("x")
    (tmp_path / "s").write_text("0123456789abcdef-from-file\n")
    text = '[tenants.a]\nvms = ["x"]\nwebhook = "http://h.example/"\nsecret_file = "s"\n'
    (tmp_path / "t.toml").write_text(text)
    from nephoscope.response.tenants import load_tenants

    tenant = load_tenants(tmp_path / "t.toml").get_tenant("a")
    assert tenant.secret == "0123456789abcdef-from-file" and "0123456789" not in repr(tenant)
    assert tenant.describe()["secret"] == "set"


def test_cli_send_list_tenants_and_exports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`notices tenants/send/list` and `report --format cyclonedx|openvex` through the real command line."""
    import subprocess
    import sys

    cache = tmp_path / "cache"
    VulnDB.open(cache / "vulns.sqlite").replace("changelog", [VulnRecord("nginx", "CVE-2026-1111", "1.0-2")])
    store = Store(tmp_path / "s.sqlite")
    _save(store, "vm-a", _obs("vm-a", "kworker"))  # calls itself kworker, runs nginx: masquerading
    store.close()
    with smtp_server() as box, webhook_receiver() as hook:
        (tmp_path / "tenants.toml").write_text(_tenants(box, hook))
        env = {**os.environ, "NEPHOSCOPE_CACHE": str(cache), "NEPHOSCOPE_DB": str(tmp_path / "s.sqlite"),
               "NEPHOSCOPE_TENANTS": str(tmp_path / "tenants.toml"), "COLUMNS": "200"}

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "nephoscope.cli.main", *args], env=env, text=True,
                                  capture_output=True, timeout=120)

        checked = run("notices", "tenants", "--json", "--vm", "vm-b7")
        assert checked.returncode == 0, checked.stderr
        doc = json.loads(checked.stdout)
        assert doc["owner"] == "other" and SECRET_A not in checked.stdout and SECRET_B not in checked.stdout
        sent = run("notices", "send", "vm-a", "--json")
        assert sent.returncode == 0, sent.stderr
        assert [d["status"] for d in json.loads(sent.stdout)["deliveries"]] == ["sent", "sent"]
        assert "masquerading" in hook.requests[0][1].decode() and len(box.messages) == 1
        again = run("notices", "send", "vm-a")
        assert again.returncode == 0 and "no notice sent" in again.stderr
        listed = run("notices", "list", "vm-a", "--json")
        assert sorted(r["channel"] for r in json.loads(listed.stdout)) == ["email", "webhook"]
        bom = run("report", "vm-a", "--format", "cyclonedx")
        assert bom.returncode == 0 and json.loads(bom.stdout)["specVersion"] == "1.5"
        missing = run("notices", "send", "vm-nobody")
        assert missing.returncode != 0 and "no tenant owns" in missing.stderr


@pytest.mark.skipif(not TAMPERED_DUMP.exists(), reason="the shared dump of the tampered guest is not here")
def test_scan_notify_hook(tmp_path: Path) -> None:
    """`scan DUMP --notify`: the scan path tells the tenant; a second scan of the same state sends nothing."""
    import subprocess
    import sys

    with smtp_server() as box, webhook_receiver() as hook:
        (tmp_path / "tenants.toml").write_text(_tenants(box, hook, TAMPERED_DUMP.name))
        env = {**os.environ, "NEPHOSCOPE_CACHE": str(tmp_path / "cache"), "NEPHOSCOPE_DB": str(tmp_path / "s.sqlite"),
               "NEPHOSCOPE_TENANTS": str(tmp_path / "tenants.toml")}
        argv = [sys.executable, "-m", "nephoscope.cli.main", "scan", str(TAMPERED_DUMP), "-m", "inspect", "--json",
                "--notify"]
        outs = [subprocess.run(argv, env=env, text=True, capture_output=True, timeout=300) for _ in range(2)]
        assert "problem notice: email sent, webhook sent" in outs[0].stderr, outs[0].stderr
        assert "nothing sent (unchanged since the last notice)" in outs[1].stderr, outs[1].stderr
        assert len(box.messages) == 1 and len(hook.requests) == 1
        assert json.loads(outs[0].stdout)["vm"] == TAMPERED_DUMP.name  # --json output stays JSON
