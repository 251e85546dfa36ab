"""Our in-process view of the host's apt indexes against apt itself (`apt-cache madison/policy/show`)."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from debian import deb822

from nephoscope.knowledge.debian import archive

PACKAGES = ["nginx", "nginx-common", "libssl3", "openssl", "bash", "python3.11", "libpython3.11-stdlib",
            "linux-image-amd64", "busybox-static", "libc6", "zlib1g", "tzdata", "ca-certificates",
            "qemu-guest-agent", "no-such-package-nephoscope"]
_POLICY_VERSION = re.compile(r"^ {5}(?:\*\*\* )?(\S+) (-?\d+)$")
HOST_EXTRA_ROOT = archive.extra_root()  # before the tests point NEPHOSCOPE_CACHE elsewhere

pytestmark = pytest.mark.skipif(shutil.which("apt-cache") is None, reason="apt-cache is needed as the oracle")


def _apt_cache(*args: str) -> str:
    proc = subprocess.run(["apt-cache", *args], capture_output=True, text=True, check=False)
    return proc.stdout


def _madison(name: str, *options: str) -> list[tuple[str, str]]:
    """Return (version, index) of the binary-package lines `apt-cache madison NAME` prints."""
    lines = [[f.strip() for f in line.split("|")] for line in _apt_cache(*options, "madison", name).splitlines()]
    return sorted((v, where) for n, v, where in lines if n == name and where.endswith(" Packages"))


@pytest.fixture(scope="module", autouse=True)
def fresh_index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Read the host's indexes from scratch into a private cache (so the build path is what is tested)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("NEPHOSCOPE_CACHE", str(tmp_path_factory.mktemp("cache")))
    archive.archive_index.cache_clear()
    if not archive.archive_index().files:
        pytest.skip("the host's apt has no package lists (run `apt-get update`)")
    yield
    archive.archive_index.cache_clear()
    mp.undo()


@pytest.mark.parametrize("name", PACKAGES)
def test_versions_and_indexes_are_what_madison_prints(name: str) -> None:
    want = _madison(name)
    assert want or name.startswith("no-such-")
    assert sorted(archive.version_sources(name)) == want
    assert set(archive.available_versions(name)) == {v for v, _ in want}


@pytest.mark.parametrize("name", PACKAGES)
def test_priorities_and_candidate_are_what_policy_prints(name: str) -> None:
    # Dir::State::status=/dev/null: what is installed on this host must not sway apt's candidate
    text = _apt_cache("-o", "Dir::State::status=/dev/null", "policy", name)
    table = [m.groups() for line in text.splitlines() if (m := _POLICY_VERSION.match(line))]
    want = [(v, int(p)) for v, p in table]
    assert want or name.startswith("no-such-"), text
    assert archive.archive_index().priorities(name) == want
    cand = re.search(r"^  Candidate: (\S+)$", text, re.M)
    expected = None if cand is None or cand.group(1) == "(none)" else cand.group(1)
    assert archive.find_candidate(name) == expected


@pytest.mark.parametrize("name", ["nginx", "libssl3", "bash", "linux-image-amd64"])
def test_records_are_what_show_prints(name: str) -> None:
    for version in archive.available_versions(name):
        shown = deb822.Packages(_apt_cache("show", f"{name}={version}").split("\n\n", 1)[0])
        ours = archive.package_record(name, version)
        for key in ("Package", "Version", "Architecture", "Filename", "Size", "SHA256", "Depends",
                    "Pre-Depends", "Source", "Multi-Arch", "Installed-Size"):
            assert ours.get(key) == shown.get(key), (name, version, key)


def test_package_names_are_what_pkgnames_prints() -> None:
    want = sorted(set(_apt_cache("pkgnames", "linux-image-6.").split()))
    assert want and archive.package_names("linux-image-6.") == want


def test_extra_suites_match_madison_with_the_private_options() -> None:
    if not any((HOST_EXTRA_ROOT / "lists").glob("*_Packages*")):
        pytest.skip("the private extra-suite lists were never fetched on this host")
    options = archive.extra_options(HOST_EXTRA_ROOT)
    for name in ("linux-image-amd64", "linux-headers-amd64"):
        want = _madison(name, *options)
        assert want and sorted(archive.version_sources(name, options)) == want
