"""Java on the real `interp` guest: the lab's JVM service read from the host, checked against the guest.

Ground truth: what the interp profile started (its javasvc command and jar manifest), and inside the
guest through the agent: /proc/PID/cmdline, /proc/PID/task/*/comm, the jars open in /proc/PID/fd, and
`jcmd PID Thread.print` / `VM.system_properties` (the JVM's own thread names and class path).
"""

from __future__ import annotations

import re

import pytest

from nephoscope.hypervisor.qga import open_agent
from nephoscope.introspect.interp import java
from nephoscope.introspect.kernel import open_kernel
from nephoscope.lab.profile import load_profile
from nephoscope.service.targets import resolve_target

pytestmark = pytest.mark.guest
SERVICE_JAR = "/opt/javasvc/nph-service.jar"
LANG3_JAR = "/usr/share/java/commons-lang3.jar"


def _manifest_field(text: str, key: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith(key + ":"))


def test_the_lab_jvm_from_the_host_equals_the_guests_view(interp_guest) -> None:  # type: ignore[no-untyped-def]
    profile = load_profile("interp")
    started = next(s for s in profile.services if s.tag == "javasvc").command.split()
    vm = resolve_target(interp_guest.name)
    with open_kernel(vm) as k, k.paused():
        threads = k.threads().items
        jvms = [(t, java.read_process(k, t, threads)) for t in k.processes().items if java.is_java(t.exe or "")]
    assert len(jvms) == 1, [t.pid for t, _ in jvms]
    task, state = jvms[0]
    assert state is not None and state.complete, state and state.problem
    assert state.main_class == started[-1] == "lab.NphService"
    assert list(state.launch.class_path) == started[started.index("-cp") + 1].split(":")
    jars = {j.path: j for j in state.jars}
    manifest = profile.files["/opt/javasvc/manifest.txt"]
    svc = jars[SERVICE_JAR]
    assert svc.verified and svc.open_fd and svc.on_class_path, svc
    assert (svc.version, svc.title, svc.main_class) == (_manifest_field(manifest, "Implementation-Version"),
                                                        _manifest_field(manifest, "Implementation-Title"),
                                                        "lab.NphService")
    with open_agent(vm, timeout=120) as agent:
        rc, out, err = agent.exec(["/bin/sh", "-c", f"""p={task.pid}
echo "CMD $(tr '\\0' ' ' </proc/$p/cmdline)"
for t in /proc/$p/task/*; do echo "TASK $(basename $t) $(cat $t/comm)"; done
for f in /proc/$p/fd/*; do echo "FD $(readlink $f)"; done
python3 -c "import sys, zipfile; print(zipfile.ZipFile(sys.argv[1]).read('META-INF/MANIFEST.MF').decode())" \
  {LANG3_JAR} | sed 's/^/MF /'
jcmd $p Thread.print | sed -n 's/^"\\(.*\\)" .*nid=0x\\([0-9a-f]*\\).*/JT \\2 \\1/p'
jcmd $p VM.system_properties | sed -n 's/^java.class.path=/CP /p'"""], timeout=120)
    assert rc == 0, err
    lines = out.decode().splitlines()
    cmd = next(line[4:] for line in lines if line.startswith("CMD ")).split()
    assert cmd == started and state.launch.main_class == cmd[-1]
    comms = {int(line.split()[1]): line.split(" ", 2)[2] for line in lines if line.startswith("TASK ")}
    assert dict(state.threads) == comms  # every thread, each with the kernel's name for it
    open_jars = {line[3:] for line in lines if line.startswith("FD ") and line.endswith(".jar")}
    assert {p for p, j in jars.items() if j.open_fd} == open_jars
    lang3 = jars[LANG3_JAR]
    mf = "\n".join(line[3:] for line in lines if line.startswith("MF "))
    assert lang3.verified and lang3.version == java.parse_manifest(mf)["Implementation-Version"]
    # the JVM's own names: every thread jcmd lists that existed when the host read is named by its prefix
    jvm_names = {int(line.split()[1], 16): line.split(" ", 2)[2] for line in lines if line.startswith("JT ")}
    for tid, name in jvm_names.items():
        if name == "Attach Listener" and tid not in comms:  # jcmd's attach started it after the host read
            continue
        assert comms[tid] == name.encode()[:15].decode("utf-8", "replace"), (tid, name)
    named = {tid for tid in comms if tid in jvm_names}
    assert set(comms) - named == {task.pid}  # only the launcher's primordial thread has no Java name
    cp = next(line[3:] for line in lines if line.startswith("CP "))
    assert re.sub(r"\\:", ":", cp).split(":") == list(state.launch.class_path)


def test_the_registry_reports_the_jvm(interp_guest) -> None:  # type: ignore[no-untyped-def]
    from nephoscope.core.records import Verdict
    from nephoscope.introspect.interp import read_interpreters

    vm = resolve_target(interp_guest.name)
    with open_kernel(vm) as k, k.paused():
        results = read_interpreters(k, kinds=("java",))
    assert len(results) == 1, results
    jvm = results[0]
    assert jvm.kind == "java" and jvm.verdict == Verdict.REPORTED and jvm.entry == "lab.NphService"
    assert jvm.scripts == [SERVICE_JAR, LANG3_JAR]
    assert {t.name for t in jvm.threads} >= {"nph-main", "nph-worker-1"}
    svc = next(j for j in jvm.details["jars"] if j["path"] == SERVICE_JAR)
    assert svc["version"] == "1.4.2" and svc["verified"]
