"""An unknown jar on the real `interp` guest is shown by its manifest (read from the page cache), not zip bytes.

Ground truth: the jar's manifest read inside the guest through the agent (Python's zipfile).
"""

from __future__ import annotations

import pytest

from nephoscope.hypervisor.qga import open_agent
from nephoscope.introspect.interp.files import MANIFEST_KEYS, collect_scripts
from nephoscope.introspect.interp.java import parse_manifest
from nephoscope.introspect.kernel import open_kernel
from nephoscope.service.targets import resolve_target

pytestmark = pytest.mark.guest
SERVICE_JAR = "/opt/javasvc/nph-service.jar"


def test_the_lab_services_jar_is_shown_by_its_manifest(interp_guest) -> None:  # type: ignore[no-untyped-def]
    vm = resolve_target(interp_guest.name)
    with open_kernel(vm) as k, k.paused():
        processes = collect_scripts(k, None)
    (jar,) = [f for p in processes if p.result.kind == "java" for f in p.files if f.path == SERVICE_JAR]
    assert jar.status == "unknown", jar  # under /opt: no package installs there
    with open_agent(vm, timeout=120) as agent:
        rc, out, err = agent.exec(["python3", "-c", "import sys, zipfile; sys.stdout.write(zipfile.ZipFile("
                                   "sys.argv[1]).read('META-INF/MANIFEST.MF').decode())", SERVICE_JAR], timeout=120)
    assert rc == 0, err
    manifest = parse_manifest(out.decode())
    assert manifest["Main-Class"] == "lab.NphService"
    assert jar.head == ["META-INF/MANIFEST.MF:", *(f"{key}: {manifest[key]}" for key in MANIFEST_KEYS
                                                   if manifest.get(key))]
