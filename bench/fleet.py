"""Benchmark the fleet server on loopback: N simulated sensors × M VMs pushing real scan documents.

Phases (all against one `nephoscope server` process on PostgreSQL 15, both on 127.0.0.1):
  ramp   — for 1, 2, 4, ... sensors (no faults): ingest scans/s and p50/p99 push latency; the single-node
           limit is where scans/s stops growing.
  faults — N sensors × M VMs × K rounds while a reader polls the API (read p50/p99 under load); a third
           of the way in the server is killed (SIGKILL) and restarted, two thirds in PostgreSQL is
           stopped (immediate, as a crash) and restarted. Sensors retry each push with its idempotency
           key until it lands; at the end every key must be stored exactly once.
The document is the stored real scan (tests/unit/data/fleet-scan-tampered.json.gz, inspect + arch of the
tampered lab guest, ~210 KB of JSON). Bounded: default 4 × 25 × 3 = 300 pushes in the fault phase.

    .venv/bin/python bench/fleet.py [--sensors 4] [--vms 25] [--rounds 3] [--ramp 1,2,4,8] [--json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from sqlalchemy import text

from nephoscope.fleet.db import open_engine
from nephoscope.fleet.localrun import ServerProcess
from nephoscope.fleet.pgcluster import PgCluster, free_port

DOC = Path(__file__).resolve().parents[1] / "tests" / "unit" / "data" / "fleet-scan-tampered.json.gz"
RETRY_FOR_S = 120.0


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _request(url: str, token: str, body: bytes | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Sensor(threading.Thread):
    """One simulated sensor: pushes rounds × VMs scans, retrying each until the server stores it."""

    def __init__(self, url: str, token: str, host: str, vms: int, rounds: int, doc: dict[str, Any], tag: str,
                 progress: list[int]) -> None:
        super().__init__(daemon=True)
        self.url, self.token, self.host, self.vms, self.rounds, self.tag = url, token, host, vms, rounds, tag
        self.doc = doc
        self.latencies: list[float] = []
        self.retries = 0
        self.created = 0
        self.duplicates = 0  # a retry whose first attempt had landed (the server said 200, not 201)
        self.resent = 0  # pushes sent again on purpose after they landed (a lost answer)
        self.lost: list[str] = []
        self.progress = progress

    def run(self) -> None:
        for rnd in range(self.rounds):
            for v in range(self.vms):
                key = f"{self.tag}.{self.host}.vm{v}.r{rnd}"
                body = json.dumps({"idempotency_key": key, "host": self.host, "vm": f"{self.host}-vm{v}",
                                   "started": time.time(), "finished": time.time(), "document": self.doc}).encode()
                deadline = time.monotonic() + RETRY_FOR_S
                while True:
                    t0 = time.monotonic()
                    try:
                        status, _ = _request(f"{self.url}/api/v1/scans", self.token, body)
                    except OSError:
                        status = 0
                    if status in (200, 201):
                        self.latencies.append(time.monotonic() - t0)
                        self.created += status == 201
                        self.duplicates += status == 200
                        if status == 201 and v % 10 == 0:  # as if the answer had been lost: send it again
                            try:
                                again, _ = _request(f"{self.url}/api/v1/scans", self.token, body)
                            except OSError:
                                again = 0
                            self.resent += 1
                            self.duplicates += again == 200
                        self.progress[0] += 1
                        break
                    self.retries += 1
                    if time.monotonic() > deadline:
                        self.lost.append(key)
                        break
                    time.sleep(0.2)


class Reader(threading.Thread):
    """Polls the operator's API (overview, VM list, one VM) and times each read that succeeds."""

    def __init__(self, url: str, token: str) -> None:
        super().__init__(daemon=True)
        self.url, self.token = url, token
        self.vm_path = ""
        self.latencies: list[float] = []
        self.failures = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for path in ("/api/v1/overview", "/api/v1/vms", self.vm_path):
                if not path:
                    continue
                t0 = time.monotonic()
                try:
                    status, raw = _request(self.url + path, self.token)
                except OSError:
                    status, raw = 0, b""
                if status == 200:
                    self.latencies.append(time.monotonic() - t0)
                    if path.endswith("/vms") and not self.vm_path:
                        listed = json.loads(raw)
                        self.vm_path = f"/api/v1/vms/{listed[0]['id']}" if listed else ""
                else:
                    self.failures += 1
                    time.sleep(0.2)
            self.stop.wait(0.05)


def _tokens(server: ServerProcess, n: int, tag: str) -> list[str]:
    out = []
    for i in range(n):
        status, raw = _request(f"{server.url}/api/v1/tokens", server.operator_token,
                               json.dumps({"scope": "sensor", "host": f"{tag}-hv{i}"}).encode())
        assert status == 201, raw
        out.append(json.loads(raw)["token"])
    return out


def _run(server: ServerProcess, n: int, vms: int, rounds: int, doc: dict[str, Any], tag: str,
         faults: PgCluster | None = None) -> dict[str, Any]:
    tokens = _tokens(server, n, tag)
    progress = [0]
    sensors = [Sensor(server.url, t, f"{tag}-hv{i}", vms, rounds, doc, tag, progress) for i, t in enumerate(tokens)]
    reader = Reader(server.url, server.operator_token)
    total = n * vms * rounds
    events: list[str] = []
    start = time.monotonic()
    reader.start()
    for s in sensors:
        s.start()
    if faults is not None:
        while progress[0] < total // 3 and any(s.is_alive() for s in sensors):
            time.sleep(0.05)
        t0 = time.monotonic()
        server.kill()
        server.start()
        events.append(f"server killed and restarted at {progress[0]}/{total} pushes ({time.monotonic() - t0:.1f} s)")
        while progress[0] < 2 * total // 3 and any(s.is_alive() for s in sensors):
            time.sleep(0.05)
        t0 = time.monotonic()
        faults.stop("immediate")
        time.sleep(1.0)
        faults.start()
        events.append(f"PostgreSQL crashed and restarted at {progress[0]}/{total} pushes "
                      f"({time.monotonic() - t0:.1f} s)")
    for s in sensors:
        s.join()
    wall = time.monotonic() - start
    reader.stop.set()
    reader.join()
    lat = [x for s in sensors for x in s.latencies]
    return {"sensors": n, "vms_per_sensor": vms, "rounds": rounds, "pushes": total, "wall_s": round(wall, 2),
            "scans_per_s": round(total / wall, 1), "ingest_p50_ms": round(_pct(lat, 0.5) * 1000, 1),
            "ingest_p99_ms": round(_pct(lat, 0.99) * 1000, 1),
            "read_p50_ms": round(_pct(reader.latencies, 0.5) * 1000, 1),
            "read_p99_ms": round(_pct(reader.latencies, 0.99) * 1000, 1), "reads": len(reader.latencies),
            "read_failures": reader.failures, "retries": sum(s.retries for s in sensors),
            "created": sum(s.created for s in sensors), "answered_duplicate": sum(s.duplicates for s in sensors),
            "resent_on_purpose": sum(s.resent for s in sensors),
            "lost": [k for s in sensors for k in s.lost], "events": events}


def _check_stored(url: str, tag: str, expected: int) -> dict[str, int]:
    engine = open_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT count(*), count(DISTINCT idempotency_key) FROM scans "
                                     "WHERE idempotency_key LIKE :p"), {"p": f"{tag}.%"}).one()
    finally:
        engine.dispose()
    return {"expected": expected, "stored": int(rows[0]), "distinct_keys": int(rows[1])}


def main() -> int:
    """Run the phases and print the results (JSON with --json)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sensors", type=int, default=4)
    ap.add_argument("--vms", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ramp", default="1,2,4,8", help="sensor counts of the ramp phase ('' to skip)")
    ap.add_argument("--ramp-pushes", type=int, default=80, help="pushes per ramp step")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with gzip.open(DOC, "rt") as f:
        doc = json.load(f)
    work = Path(tempfile.mkdtemp(prefix="nephoscope-fleet-bench-"))
    work.chmod(0o755)
    pg = PgCluster(work / "pg", free_port())
    pg.init()
    server = ServerProcess(pg.url, work / "server")
    out: dict[str, Any] = {"document_bytes": len(json.dumps(doc)), "ramp": []}
    try:
        server.start()
        for n in [int(x) for x in args.ramp.split(",") if x]:
            per = max(1, args.ramp_pushes // n)
            step = _run(server, n, per, 1, doc, f"ramp{n}")
            step["stored"] = _check_stored(pg.url, f"ramp{n}", n * per)
            out["ramp"].append(step)
            if not args.json:
                print(f"ramp {n:2d} sensors: {step['scans_per_s']:7.1f} scans/s  ingest p50 {step['ingest_p50_ms']} ms "
                      f"p99 {step['ingest_p99_ms']} ms  read p50 {step['read_p50_ms']} ms p99 {step['read_p99_ms']} ms")
        faults = _run(server, args.sensors, args.vms, args.rounds, doc, "faults", faults=pg)
        faults["stored"] = _check_stored(pg.url, "faults", args.sensors * args.vms * args.rounds)
        out["faults"] = faults
        if out["ramp"]:
            best = max(out["ramp"], key=lambda s: s["scans_per_s"])
            out["single_node_limit"] = {"scans_per_s": best["scans_per_s"], "at_sensors": best["sensors"]}
    finally:
        server.stop()
        pg.destroy()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        f = out["faults"]
        print(f"faults: {f['pushes']} pushes by {f['sensors']} sensors in {f['wall_s']} s ({f['scans_per_s']} scans/s "
              f"including outages), ingest p50 {f['ingest_p50_ms']} ms p99 {f['ingest_p99_ms']} ms, read p50 "
              f"{f['read_p50_ms']} ms p99 {f['read_p99_ms']} ms ({f['read_failures']} reads failed during outages)")
        for e in f["events"]:
            print("  " + e)
        print(f"  retries {f['retries']}, sent again on purpose {f['resent_on_purpose']}, answered as already stored "
              f"{f['answered_duplicate']}, lost {len(f['lost'])}; "
              f"stored {f['stored']['stored']} of {f['stored']['expected']}, distinct keys "
              f"{f['stored']['distinct_keys']}")
        if "single_node_limit" in out:
            print(f"single-node limit: {out['single_node_limit']['scans_per_s']} scans/s "
                  f"(at {out['single_node_limit']['at_sensors']} sensors)")
    ok = out["faults"]["stored"]["stored"] == out["faults"]["stored"]["expected"] == \
        out["faults"]["stored"]["distinct_keys"] and not out["faults"]["lost"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
