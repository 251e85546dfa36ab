"""Scoring the architectural event stream against a lab manifest (no VM)."""

from __future__ import annotations

from nephoscope.introspect.archevents import PageEvent
from nephoscope.service.evaluate import DETECTED, MISSED
from nephoscope.service.evaluate_archevents import score_stream

MANIFEST = {
    "processes": [
        {"pid": 1, "ppid": 0, "exe": "/bin/busybox", "comm": "init", "cmdline": ["init"], "binary": "/bin/busybox",
         "package": "busybox-static", "version": "1.35"},
        {"pid": 10, "ppid": 1, "exe": "/usr/sbin/nginx", "comm": "nginx", "cmdline": ["nginx"],
         "binary": "/usr/sbin/nginx", "package": "nginx", "version": "1.22"},
        {"pid": 20, "ppid": 1, "exe": "/opt/x", "comm": "x", "cmdline": ["x"], "binary": "/opt/x", "package": "",
         "version": ""},
        {"pid": 21, "ppid": 20, "exe": "/opt/x", "comm": "x", "cmdline": ["x"], "binary": "/opt/x", "package": "",
         "version": ""},
        {"pid": 30, "ppid": 1, "exe": "/usr/bin/cat", "comm": "sshd", "cmdline": ["sshd"], "binary": "/usr/bin/cat",
         "package": "coreutils", "version": "9.1"},
    ],
    "techniques": [{"id": "unpackaged-binary", "pid": 20}, {"id": "masquerade", "pid": 30, "binary": "/usr/bin/cat"},
                   {"id": "code-injection", "pid": 10}, {"id": "preload-hidden", "pid": 1},
                   {"id": "hidden-module", "kind": "kernel"}],
}


def _ev(verdict: str, images: list[dict[str, str]] = (), cr3: list[int] = (), vaddr: int = 0x401000) -> PageEvent:
    return PageEvent("first", 0x5000, vaddr, 0.0, verdict, images=list(images), cr3=list(cr3))


def test_power_per_binary_and_techniques_by_attributed_unknown_code() -> None:
    events = [_ev("known", [{"path": "/usr/bin/busybox", "package": "busybox-static", "version": "1.35"}],
                  cr3=[0x1000]),
              _ev("known", [{"path": "/usr/sbin/nginx", "package": "nginx", "version": "1.21"}]),  # wrong version
              _ev("unknown", cr3=[0x21000]),
              _ev("unknown", cr3=[0x99000], vaddr=0xFFFFFFFF81000000)]  # kernel-half: never a process's code
    seen, identified, techniques = score_stream(events, MANIFEST, {20: 0x20000, 21: 0x21000, 10: 0x10000, 1: 0x1000})
    assert (seen, identified) == (2, 1)
    assert techniques == {"unpackaged-binary": DETECTED, "masquerade": MISSED, "code-injection": MISSED,
                          "preload-hidden": DETECTED}
    _s, _i, hidden_unseen = score_stream(events[1:], MANIFEST, {1: 0x1000})
    assert hidden_unseen["preload-hidden"] == MISSED
