"""Scan documents for the fleet tests: a stored real scan (tampered lab guest dump), and hostile variants."""

from __future__ import annotations

import copy
import gzip
import json
import uuid
from pathlib import Path
from typing import Any

STORED = Path(__file__).with_name("data") / "fleet-scan-tampered.json.gz"
HOSTILE_COMM = "<script>alert(1)</script><b>x</b>"


def stored_document() -> dict[str, Any]:
    """Return the stored scan document (inspect + arch on the tampered-6.1 dump, as a sensor pushes it)."""
    with gzip.open(STORED, "rt") as f:
        return json.load(f)  # type: ignore[no-any-return]


def hostile_document() -> dict[str, Any]:
    """Return the stored document with a process named with markup and script (guest strings are hostile)."""
    doc = copy.deepcopy(stored_document())
    procs = doc["scan"]["processes"]
    victim = next(p for p in procs if not p.get("kernel_thread"))
    victim["comm"] = HOSTILE_COMM
    victim["cmdline"] = [HOSTILE_COMM, "<img src=x onerror=alert(2)>"]
    return doc


def push(host: str, vm: str, document: dict[str, Any] | None = None, at: float = 1_700_000_000.0,
         key: str | None = None) -> dict[str, Any]:
    """Return one push body as the sensor sends it."""
    return {"idempotency_key": key or f"{host}.{uuid.uuid4().hex}", "host": host, "vm": vm, "started": at,
            "finished": at + 5, "document": document if document is not None else stored_document()}
