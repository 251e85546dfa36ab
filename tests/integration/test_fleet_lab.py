"""A sensor's one sweep of a real lab guest, pushed to a real server on real PostgreSQL, equals a local scan.

The guest is paused for the comparison (the methods leave a paused VM paused), so both scans see the
same memory; it is resumed at the end, whatever happens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from nephoscope.fleet.localrun import ServerProcess
from nephoscope.hypervisor.qmp import Qmp
from nephoscope.service.scan import run_scan
from nephoscope.service.targets import resolve_target

METHODS = ["inspect", "arch"]


def _api(server: ServerProcess, path: str, body: dict[str, Any] | None = None) -> Any:
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode() if body is not None else None,
                                 method="POST" if body is not None else "GET",
                                 headers={"Authorization": f"Bearer {server.operator_token}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


@pytest.mark.guest
def test_sensor_once_stores_what_a_local_scan_sees(clean_guest: Any, default_kb: None, fleet_pg: Any,
                                                   tmp_path: Path) -> None:
    server = ServerProcess(fleet_pg.url, tmp_path / "server")
    server.start()
    try:
        token = _api(server, "/api/v1/tokens", {"scope": "sensor", "host": "lab-host"})["token"]
        (tmp_path / "sensor.token").write_text(token)
        rules = "".join(f'[[rule]]\nmethod = "{m}"\nevery_s = 0\n' for m in METHODS)
        (tmp_path / "policy.toml").write_text(f'include = ["{clean_guest.name}"]\n[budget]\nnice = 0\n{rules}')
        with Qmp(clean_guest.qmp_socket) as qmp:
            qmp.command("stop")
        try:
            done = subprocess.run(
                [sys.executable, "-m", "nephoscope.cli.main", "sensor", "--once", "--server", server.url,
                 "--token-file", str(tmp_path / "sensor.token"), "--policy", str(tmp_path / "policy.toml"),
                 "--state-dir", str(tmp_path / "state"), "--host", "lab-host"],
                capture_output=True, text=True, timeout=900, env={**os.environ})
            assert done.returncode == 0, done.stderr[-3000:]
            sweep = json.loads(done.stdout.strip().splitlines()[-1])
            local = run_scan(resolve_target(clean_guest.name), METHODS).to_dict()
            with Qmp(clean_guest.qmp_socket) as qmp:
                assert qmp.command("query-status")["running"] is False  # the sweep left the paused VM paused
        finally:
            with Qmp(clean_guest.qmp_socket) as qmp:
                qmp.command("cont")
        print("sensor sweep:", json.dumps({k: sweep[k] for k in ("cpu_s", "wall_s", "max_rss_mib", "kb_sharing")}))
        assert sweep["scanned"] == {clean_guest.name: METHODS} and sweep["pushed"] == 1 and sweep["buffered"] == 0
        (vm,) = _api(server, "/api/v1/vms")
        assert (vm["name"], vm["host"]) == (clean_guest.name, "lab-host")
        stored = _api(server, f"/api/v1/vms/{vm['id']}")["latest"]["document"]["scan"]
        assert stored["status"] == local["status"] == "ok"
        assert stored["processes"] == local["processes"]
        assert len(stored["processes"]) > 10
        assert sorted((f["kind"], f["title"]) for f in stored["findings"]) == \
            sorted((f["kind"], f["title"]) for f in local["findings"])
        findings = _api(server, f"/api/v1/vms/{vm['id']}/findings")
        assert len(findings) == len(local["findings"])
    finally:
        server.stop()
