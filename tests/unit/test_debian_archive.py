"""The in-process apt index on a small local repository that real apt fetched, with apt as the oracle.

The repository (file: URIs, no network) has four suites: a plain one, a NotAutomatic +
ButAutomaticUpgrades one (like backports), a NotAutomatic one (like experimental) and a local one,
plus preferences with version, release, origin, src: and regex pins. Every answer is compared with
`apt-cache madison/policy/show` under the same `-o` options.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from debian import deb822

from nephoscope.core.errors import KnowledgeError
from nephoscope.knowledge.debian import archive, config, index
from nephoscope.knowledge.debian.policy import (
    Match,
    PackageFile,
    choose_candidate,
    expression_matches,
    parse_preferences,
)

pytestmark = pytest.mark.skipif(shutil.which("apt-get") is None, reason="real apt is the oracle")

SUITES = {
    "bookworm": ("Origin: Debian\nLabel: Debian\nSuite: stable\nVersion: 12.15\n", [
        ("hello", "1.0-1", "amd64", ""), ("hello-doc", "1.0-1", "all", "hello"), ("libfoo1", "1.0-1", "amd64", "foo"),
        ("pinned", "1.0", "amd64", ""), ("multi", "1.0", "amd64", ""), ("foreign", "1.0", "i386", "")]),
    "bookworm-backports": ("Origin: Debian Backports\nLabel: Debian Backports\nSuite: stable-backports\n"
                           "NotAutomatic: yes\nButAutomaticUpgrades: yes\n", [
        ("hello", "2.0-1~bpo12+1", "amd64", ""), ("libfoo1", "2.0-1~bpo12+1", "amd64", "foo"),
        ("hello-doc", "2.0-1~bpo12+1", "all", "hello")]),
    "experimental": ("Origin: Debian\nLabel: Debian\nSuite: experimental\nNotAutomatic: yes\n", [
        ("hello", "3.0-1", "amd64", ""), ("onlyexp", "0.1", "amd64", ""), ("multi", "1.0", "amd64", "")]),
    "local": ("Origin: Local\nLabel: Mine\nSuite: local\n", [
        ("hello", "1.5-1", "amd64", ""), ("pinned", "2.0", "amd64", ""), ("hello-doc", "1.5-1", "all", "hello")]),
}
PREFERENCES = """\
# comments are allowed
Package: hello
Pin: version 1.5*
Pin-Priority: 200

Explanation: libraries built from foo follow backports
Package: src:foo
Pin: release n=bookworm-backports
Pin-Priority: 700

Package: *
Pin: release o=Local
Pin-Priority: 300

Explanation: the first general pin that matches a file wins, so Local stays at 300
Package: *
Pin: release l=Mine
Pin-Priority: 400

Package: pinned
Pin: release l=Mine
Pin-Priority: -1

Package: /^hello-d/
Pin: release a=stable-backports
Pin-Priority: 50
"""
NAMES = ["hello", "hello-doc", "libfoo1", "pinned", "multi", "onlyexp", "foreign", "absent"]
_POLICY_VERSION = re.compile(r"^ {5}(?:\*\*\* )?(\S+) (-?\d+)$")


def _packages(suite: str, entries: list[tuple[str, str, str, str]]) -> str:
    out = []
    for name, version, arch, source in entries:
        src = f"Source: {source}\n" if source else ""
        digest = hashlib.sha256((name + version + suite).encode()).hexdigest()
        out.append(f"Package: {name}\n{src}Version: {version}\nArchitecture: {arch}\n"
                   f"Maintainer: Lab <lab@example.org>\nDepends: libc6 (>= 2.36), libfoo1 | libbar1\n"
                   f"Filename: pool/{name}_{version}_{arch}.deb\nSize: {len(name) * 100}\nSHA256: {digest}\n"
                   f"Description: {name} from {suite}\n")
    return "\n".join(out)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Write the repository and its private apt setup, and let real apt fetch it (`apt-get update`)."""
    root = tmp_path_factory.mktemp("apt")
    sources = []
    for suite, (head, entries) in SUITES.items():
        dist = root / "repo" / "dists" / suite
        (dist / "main" / "binary-amd64").mkdir(parents=True)
        text = _packages(suite, entries).encode()
        (dist / "main" / "binary-amd64" / "Packages").write_bytes(text)
        (dist / "Release").write_text(
            f"{head}Codename: {suite}\nDate: Thu, 01 Jan 2026 00:00:00 UTC\nArchitectures: amd64\nComponents: main\n"
            f"SHA256:\n {hashlib.sha256(text).hexdigest()} {len(text)} main/binary-amd64/Packages\n")
        sources.append(f"deb [trusted=yes] file:{root / 'repo'} {suite} main\n")
    (root / "sources.list").write_text("".join(sources))
    (root / "preferences").write_text(PREFERENCES)
    for sub in ("lists/partial", "cache/archives/partial"):
        (root / sub).mkdir(parents=True)
    proc = subprocess.run(["apt-get", *_options(root), "-q", "update"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return root


def _options(root: Path, *extra: str) -> tuple[str, ...]:
    opts = [f"Dir::Etc::SourceList={root / 'sources.list'}", "Dir::Etc::SourceParts=/dev/null",
            f"Dir::State::Lists={root / 'lists'}", f"Dir::Cache={root / 'cache'}",
            f"Dir::Etc::Preferences={root / 'preferences'}", "Dir::Etc::PreferencesParts=/dev/null",
            "Dir::State::status=/dev/null", "Acquire::Languages=none", *extra]
    if os.geteuid() == 0:
        opts.append("APT::Sandbox::User=root")
    else:
        opts.append("Debug::NoLocking=1")
    return tuple(arg for opt in opts for arg in ("-o", opt))


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("NEPHOSCOPE_CACHE", str(tmp_path / "cache"))
    archive.archive_index.cache_clear()
    yield
    archive.archive_index.cache_clear()


def _apt_cache(options: tuple[str, ...], *args: str) -> str:
    return subprocess.run(["apt-cache", *options, *args], capture_output=True, text=True, check=False).stdout


@pytest.mark.parametrize("default_release", ["", "experimental"])
def test_versions_priorities_and_candidates_match_apt(repo: Path, default_release: str) -> None:
    options = _options(repo, *([f"APT::Default-Release={default_release}"] if default_release else []))
    for name in NAMES:
        lines = [[f.strip() for f in line.split("|")] for line in _apt_cache(options, "madison", name).splitlines()]
        assert sorted(archive.version_sources(name, options)) == sorted((v, w) for n, v, w in lines if n == name)
        text = _apt_cache(options, "policy", name)
        table = [m.groups() for line in text.splitlines() if (m := _POLICY_VERSION.match(line))]
        want = [(v, int(p)) for v, p in table]
        assert archive.archive_index(options).priorities(name) == want, name
        cand = re.search(r"^  Candidate: (\S+)$", text, re.M)
        assert archive.find_candidate(name, options) == (None if not cand or cand.group(1) == "(none)"
                                                         else cand.group(1)), name
    # the repository exercises what it should (each value above was also apt's)
    index_ = archive.archive_index(options)
    if default_release:
        assert archive.find_candidate("hello", options) == "3.0-1"  # Default-Release: 990 beats NotAutomatic
    else:
        assert index_.priorities("hello") == [("3.0-1", 1), ("2.0-1~bpo12+1", 100), ("1.5-1", 200), ("1.0-1", 500)]
        assert archive.find_candidate("libfoo1", options) == "2.0-1~bpo12+1"  # src: pin
        assert index_.priorities("pinned") == [("2.0", -1), ("1.0", 500)]
        assert index_.priorities("hello-doc") == [("2.0-1~bpo12+1", 50), ("1.5-1", 300), ("1.0-1", 500)]
        assert index_.priorities("multi") == [("1.0", 500)] and len(archive.version_sources("multi", options)) == 2
    assert archive.available_versions("foreign", options) == () and archive.available_versions("absent", options) == ()


def test_records_and_names_match_apt(repo: Path) -> None:
    options = _options(repo)
    for name in ("hello", "hello-doc", "libfoo1"):
        for version in archive.available_versions(name, options):
            shown = deb822.Packages(_apt_cache(options, "show", f"{name}={version}").split("\n\n", 1)[0])
            ours = archive.package_record(name, version, options)
            assert {k: ours.get(k) for k in shown if k != "Description-md5"} == {
                k: shown.get(k) for k in shown if k != "Description-md5"}
    assert archive.package_names("hel", options) == sorted(set(_apt_cache(options, "pkgnames", "hel").split()))
    with pytest.raises(KnowledgeError, match="apt knows no hello=9"):
        archive.package_record("hello", "9", options)


def test_answers_come_from_the_cache_until_the_lists_change(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    options = _options(repo)
    archive.available_versions("hello", options)  # builds the cache
    calls: list[list[str]] = []
    real_run = subprocess.run

    def counting_run(cmd: list[str], *args: object, **kwargs: object) -> subprocess.CompletedProcess:
        calls.append(list(cmd))
        return real_run(cmd, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(subprocess, "run", counting_run)
    archive.archive_index.cache_clear()  # a new process: only the cache file is left
    for name in NAMES:
        archive.available_versions(name, options)
        archive.find_candidate(name, options)
    archive.package_record("hello", "1.0-1", options)
    assert [c[0] for c in calls] == ["apt-config"]  # one `apt-config dump` for the key, nothing per package
    lists = sorted((repo / "lists").glob("*Packages*"))
    os.utime(lists[0], ns=(lists[0].stat().st_atime_ns, lists[0].stat().st_mtime_ns + 10**9))
    archive.archive_index.cache_clear()
    calls.clear()
    assert archive.available_versions("hello", options)
    assert "indextargets" in [arg for c in calls for arg in c]  # changed lists: apt's indexes are read again


def test_the_lab_resolver_spawns_no_apt_per_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """`lab up` of a cached image: resolution of the clean profile and its kernel from the host's indexes."""
    from nephoscope.lab import build
    from nephoscope.lab.profile import load_profile

    monkeypatch.delenv("NEPHOSCOPE_CACHE", raising=False)  # the real cache, as `lab up` uses it
    if not archive.available_versions("linux-image-amd64"):
        pytest.skip("the host's apt has no Debian 12 package lists")
    archive.archive_index.cache_clear()
    calls: list[list[str]] = []
    real_popen = subprocess.Popen

    def counting_popen(cmd: list[str], *args: object, **kwargs: object) -> subprocess.Popen:
        calls.append(list(cmd))  # subprocess.run and every other helper start processes through Popen
        return real_popen(cmd, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(subprocess, "Popen", counting_popen)
    packages = build.resolve_packages(load_profile("clean"))
    kernel = build._kernel_package(None, lambda _m: None)
    assert len(packages) > 20 and kernel[0].startswith("linux-image-")
    assert not [c for c in calls if c[0] in ("apt-cache", "apt-get")], calls
    assert len(calls) <= 1  # at most the one `apt-config dump` that checks the cache is current


def test_pins_parse_and_match_like_apt() -> None:
    pins = parse_preferences(PREFERENCES, "prefs")
    assert [(p.package, p.kind, p.priority) for p in pins] == [
        ("hello", "version", 200), ("src:foo", "release", 700), ("", "release", 300), ("", "release", 400),
        ("pinned", "release", -1),
        ("/^hello-d/", "release", 50)]
    bpo = PackageFile("x", "d", origin="Debian Backports", archive="stable-backports", codename="bookworm-backports",
                      not_automatic=True, but_automatic_upgrades=True)
    assert bpo.default_priority == 100 and PackageFile("y", "d", not_automatic=True).default_priority == 1
    assert Match("release", "a=stable-backports,o=Debian*").file_matches(bpo)
    assert not Match("release", "a=stable-backports,o=Local").file_matches(bpo)
    assert Match("release", "bookworm-backports").file_matches(bpo)  # bare: archive or codename
    assert Match("version", "1.5*").version_matches("1.5-1", []) and not Match("version", "1.5").version_matches(
        "1.5-1", [])
    assert expression_matches("/^LIB/", "libfoo1") and expression_matches("Hello*", "hello-doc")
    assert choose_candidate([("3", 1), ("2", 100), ("1", 100)]) == "2"
    assert choose_candidate([("2", -1), ("1", 0)]) is None
    for bad in ("Pin: release a=x\nPin-Priority: 5\n", "Package: x\nPin: release a=x\nPin-Priority: 99999\n"):
        with pytest.raises(KnowledgeError):
            parse_preferences(bad, "prefs")
    assert parse_preferences("Package: x\nPin: nonsense\nPin-Priority: 5\n", "prefs") == []


def test_state_key_follows_apt_files(repo: Path) -> None:
    cfg = config.read_config(_options(repo))
    assert cfg.find_file("Dir::State::Lists") == repo / "lists"
    assert cfg.find_file("Dir::Etc::Preferences") == repo / "preferences"
    key = config.state_key(cfg, index.FORMAT)
    assert key == config.state_key(cfg, index.FORMAT) != config.state_key(cfg, "other format")
    prefs = repo / "preferences"
    os.utime(prefs, ns=(prefs.stat().st_atime_ns, prefs.stat().st_mtime_ns + 10**9))
    assert config.state_key(cfg, index.FORMAT) != key
