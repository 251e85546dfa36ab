"""Typed observation payloads: every kind survives the JSON edge, hostile records never crash analysis."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nephoscope.analysis.facts import pids_by_root
from nephoscope.analysis.malware import regions_from
from nephoscope.analysis.merge import merge
from nephoscope.analysis.vulnerable import installed_from, mapped_paths, running_from_arch
from nephoscope.core.errors import NephoscopeError
from nephoscope.core.payloads import (
    REGISTRY,
    AddressSpace,
    Candidate,
    Checkpoint,
    CrossView,
    Details,
    Exec,
    Exit,
    Image,
    Interpreter,
    KernelChange,
    KernelCode,
    KernelImage,
    KernelTamper,
    Mapping,
    ModifiedPage,
    Module,
    ModuleLoad,
    Package,
    PayloadError,
    Process,
    ScriptEntry,
    Socket,
    UnfoundRoot,
    UnknownCode,
    UnknownKernelCode,
    Unverifiable,
    Vdso,
    from_json,
    parse,
)
from nephoscope.core.records import Observation, Provenance, Verdict
from nephoscope.service.report import report_from_store
from nephoscope.store.sqlite import Store

CAND = Candidate("/usr/bin/bash", "bash", "5.2.15-2+b2", "amd64", "bash", "ab12", "00" * 32, 7)
SAMPLES: dict[str, object] = {
    "process": Process(42, 42, 1, "bash", "/usr/bin/bash", ("bash", "-i"), 0, 0, 0, "S", 123, False, 0x1000,
                       ("a note",)),
    "mapping": Mapping(42, 0x5000, 0x6000, "r-xp", 0, "/usr/bin/bash"),
    "interpreter": Interpreter(42, "python", "CPython 3.11 (python3.11-minimal 3.11.2-6+deb12u9)", "/opt/w.py",
                               (("wait (/opt/w.py:16)", "<module> (/opt/w.py:22)"),), 12,
                               (ScriptEntry("/opt/w.py", "unknown", "ab" * 32, head=("# a script",)),
                                ScriptEntry("/usr/lib/python3/dist-packages/flask/app.py", "known", "cd" * 32,
                                            "flask 2.2.2 (python3-flask 2.2.2-3)", "python3-flask", "2.2.2-3"))),
    "module": Module("crc7", 0xffffffffc0000000, 4096),
    "package": Package("bash", "5.2.15-2+b2", "bash", "amd64"),
    "cross-view": CrossView(99, "evil", True, False, True),
    "socket": Socket("tcp", "inet", "stream", "ESTABLISHED", "10.0.2.15", 40000, "10.0.2.2", 25, 0, 19, 10798,
                     ("files", "tcp-established"), (505,), False),
    "binary": Image(0x1000, 0x2000, 0x5000, 0x9000, 0x5000, 4, "/usr/bin/bash", (("bash", "5.2.15-2+b2"),), (CAND,)),
    "modified-binary": Image(0x1000, None, 0x5000, 0x9000, 0x5000, 4, "/usr/bin/bash", (("bash", "5.2"),), (CAND,),
                             (ModifiedPage(0x6000, 0x123000, 0x1000, 0x1000),)),
    "unknown-code": UnknownCode(0x1000, 0x7000, 0x8000, 1, True, (0x4000,), "90" * 8),
    "vdso": Vdso(0x1000, 0x7ffd000, 0x7fff000, "vdso", (("linux-image-6.1", "6.1.1"),)),
    "kernel-code": KernelCode(10, 40960, ((0xffffffff81000000, 0xffffffff81001000),)),
    "kernel-image": KernelImage("vmlinux", "vmlinux", "verified", "linux-image-6.1.0-57-amd64", "6.1.192-3", 2, 2,
                                ((0xffffffff81000000, 0xffffffff81002000),), (), (), {"alternative": 3}),
    "modified-kernel-image": KernelImage("e1000", "module", "modified", "linux-image-6.1.0-57-amd64", "6.1.192-3",
                                         2, 1, ((0xffffffffc0000000, 0xffffffffc0002000),), (0xffffffffc0001000,),
                                         (KernelChange(0xffffffffc0001010, "e1000_clean+0x10", "9090", "cccc"),)),
    "unknown-kernel-code": UnknownKernelCode(0xffffffffc0100000, 0xffffffffc0101000, 1, "cc" * 8),
    "address-space": AddressSpace(0x1000, 0x2000, 120, (0, 1), "/usr/bin/bash", {"wx": 1}),
    "unfound-root": UnfoundRoot(0x3000),
    "exec": Exec(42, 42, 1, "sh", 1.5, "/bin/true", "/bin/true", "/usr/bin/true", ("true",),
                 {"package": "coreutils"}, {"argv": "unreadable"}),
    "exit": Exit(42, 42, 1, "true", 2.5, 0, 0, 0),
    "module-load": ModuleLoad(0, 0, 0, "insmod", 3.0, "crc7", 0xffffffffc0001000, 0xffffffffc0000000, 8192, 4096),
    "checkpoint": Checkpoint(0.25, (0x1000,), (4,), 512 << 20),
    "kernel-tamper": KernelTamper("syscall-hook", "sys_call_table", "sys_call_table[62]", 0xffffffffc0404000,
                                  "elsewhere", None, "", "points out of kernel text"),
    "unverifiable": Unverifiable("processes"),
    "kernel": Details({"release": "6.1.0", "detection": {"stage": "ok"}}),
    "trap-stats": Details({"events": 3}),
}


def test_every_registered_kind_has_a_sample() -> None:
    assert set(REGISTRY) <= set(SAMPLES) | {"scan", "memory-image", "image-inconsistent", "agent"}


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_round_trip_through_json(kind: str) -> None:
    payload = SAMPLES[kind]
    text = json.dumps(payload.to_json())  # type: ignore[attr-defined]
    assert from_json(kind, json.loads(text)) == payload
    o = Observation(kind, "k", payload, Provenance("arch", "vm"), Verdict.VERIFIED)  # type: ignore[arg-type]
    back = Observation(kind, "k", json.loads(json.dumps(o.data)), o.provenance, o.verdict)
    assert back.payload == payload and back.to_dict() == o.to_dict()


def test_exec_problems_keep_the_event_log_keys() -> None:
    data = SAMPLES["exec"].to_json()  # type: ignore[attr-defined]
    assert data["argv_error"] == "unreadable" and "problems" not in data


def test_via_is_a_field_and_the_analysis_key_in_json() -> None:
    o = Observation("process", "pid:1", {"pid": 1, "exe": "/x", "analysis": "inspect"},
                    Provenance("checkpoint", "vm"), Verdict.VERIFIED)
    assert o.via == "inspect" and o.payload == Process(1, exe="/x")
    assert o.data["analysis"] == "inspect" and o.to_dict()["data"]["analysis"] == "inspect"


@pytest.mark.parametrize(("kind", "data"), [
    ("process", {"pid": "42"}), ("process", {"pid": True}), ("process", {"pid": 1, "cmdline": "bash"}),
    ("process", {"comm": "no pid"}), ("mapping", {"pid": 1, "start": 1.5}),
    ("binary", {"cr3": 1, "versions": [["bash"]]}), ("binary", {"candidates": [{"package": 3}]}),
    ("modified-binary", {"modified_pages": [{"gva": "0x1"}]}), ("unknown-code", {"cr3": [1]}),
    ("cross-view", {"pid": None}), ("checkpoint", {"vcpu_cr3": {"a": 1}}), ("exec", {"path": 1}),
    ("kernel", ["not", "an", "object"]),
])
def test_hostile_record_raises_a_payload_error_or_becomes_marked_details(kind: str, data: object) -> None:
    with pytest.raises(PayloadError) as err:
        from_json(kind, data)
    assert isinstance(err.value, NephoscopeError)
    d = parse(kind, data)
    assert isinstance(d, Details) and d.problem
    assert d.to_json()[Details.MARKER] == d.problem


def test_a_payload_of_another_kind_is_refused() -> None:
    with pytest.raises(PayloadError):
        Observation("process", "k", Module("x"), Provenance("inspect", "vm"), Verdict.REPORTED)


def test_hostile_stored_records_feed_no_analysis(tmp_path) -> None:
    store = Store(tmp_path / "s.db")
    good = Observation("process", "pid:7", Process(7, comm="sshd", exe="/usr/sbin/sshd", cmdline=("sshd",),
                                                   cr3=0x1000), Provenance("inspect", "vm"), Verdict.VERIFIED)
    bad = [Observation(kind, "k", data, Provenance("inspect", "vm"), Verdict.VERIFIED) for kind, data in [
        ("process", {"pid": "8", "exe": "/bin/evil"}), ("cross-view", {"pid": [1], "in_task_list": "yes"}),
        ("unknown-code", {"cr3": "0x1000", "gva_start": 1, "gva_end": 2}),
        ("binary", {"cr3": 0x1000, "versions": "bash"}), ("package", {"name": 1, "version": 2}),
        ("mapping", {"pid": 7, "start": "0", "end": None, "perms": 5})]]
    store.save_scan("vm", ["inspect"], [good, *bad], [], {}, 1.0)
    rows = store.observations(store.scans("vm")[0].id)
    assert sum(Details.MARKER in r["data"] for r in rows) == len(bad)
    report = report_from_store("vm", store, ram_path=None, owner=lambda _p: None)
    assert report.code == [] and report.vulnerable == []
    view = merge([good, *bad], ["inspect"], "vm")
    assert list(view.processes) == [7] and view.findings == []
    assert len(view.unverifiable) == len(bad) and all("malformed" in u["reason"] for u in view.unverifiable)


def test_a_damaged_store_row_becomes_details(tmp_path) -> None:
    store = Store(tmp_path / "s.db")
    scan_id = store.save_scan("vm", ["inspect"], [], [], {}, 1.0)
    with store.db:
        store.db.executemany("INSERT INTO observations VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [
            (scan_id, "inspect", "process", "pid:1", "verified", "", 1.0, "{not json"),
            (scan_id, "inspect", "process", "pid:2", "verified", "", 1.0, "[1, 2]"),
            (scan_id, "inspect", "process", "pid:3", "trust-me", "", 1.0, '{"pid": 3, "exe": "/x"}'),
            (scan_id, "checkpoint", "process", "pid:4", "verified", "", 1.0, '{"pid": 4, "exe": "/y", "analysis": 7}')])
    obs = store.load_observations(scan_id, "vm")
    assert [type(o.payload).__name__ for o in obs] == ["Details", "Details", "Process", "Process"]
    assert "not JSON" in obs[0].payload.problem and obs[1].payload.problem  # type: ignore[attr-defined]
    assert obs[2].verdict is Verdict.UNVERIFIABLE and "trust-me" in obs[2].reason
    assert obs[3].via == ""
    view = merge(obs, ["inspect", "checkpoint"], "vm")
    assert list(view.processes) == [4] and view.findings == []


FIELDS = sorted({f for p in SAMPLES.values() for f in p.to_json()} | {"start", "end", "analysis"})  # type: ignore[attr-defined]
SCALAR = st.none() | st.booleans() | st.integers(-2, 2**64) | st.floats(allow_nan=False) | st.text(max_size=8)
JSON = st.recursive(SCALAR,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(FIELDS), inner,
                                                                                 max_size=3), max_leaves=8)
RECORD = st.tuples(st.sampled_from(sorted(SAMPLES)), st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=8))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(RECORD, max_size=12), st.sampled_from(["inspect", "arch", "agent", "checkpoint"]))
def test_any_record_shape_never_crashes_analysis(records: list[tuple[str, dict]], method: str) -> None:
    obs = []
    for kind, data in records:
        with contextlib.suppress(PayloadError):  # the one way a wrong shape leaves from_json
            from_json(kind, data)
        obs.append(Observation(kind, "k", json.loads(json.dumps(data)), Provenance(method, "vm"), Verdict.VERIFIED))
        assert json.loads(json.dumps(obs[-1].to_dict()))  # the JSON edge always serialises
    merge(obs, [method], "vm")
    pids_by_root(obs), regions_from(obs), installed_from(obs), mapped_paths(obs), running_from_arch(obs)
