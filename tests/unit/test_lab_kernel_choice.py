"""Choosing a Debian kernel (host apt, then the private extra-suite setup) and preparing its modules."""

from __future__ import annotations

import lzma
import shutil
import subprocess
from pathlib import Path

import pytest

from nephoscope.core.errors import LabError
from nephoscope.knowledge.debian import archive
from nephoscope.knowledge.ingest import decompress_bzimage
from nephoscope.lab import build

HOST_NAMES = ["linux-image-6.1.0-55-amd64", "linux-image-6.1.0-56-amd64", "linux-image-6.1.0-56-cloud-amd64",
              "linux-image-6.1.0-56-amd64-dbg"]
EXTRA_NAMES = ["linux-image-6.12.88+deb12-amd64", "linux-image-6.12.95+deb12-amd64-unsigned",
               "linux-image-6.12.95+deb12-amd64", "linux-image-6.12.95+deb12-rt-amd64",
               "linux-image-6.12.95+deb12-amd64-dbg", "linux-image-6.12-amd64"]
VERSIONS = {"linux-image-6.1.0-55-amd64": ("6.1.158-1",), "linux-image-6.1.0-56-amd64": ("6.1.192-2",),
            "linux-image-6.12.88+deb12-amd64": ("6.12.88-1~bpo12+1",),
            "linux-image-6.12.95+deb12-amd64": ("6.12.95-1~bpo12+1",),
            "linux-image-6.12.95+deb12-amd64-unsigned": ("6.12.95-1~bpo12+1",)}


@pytest.fixture
def fake_apt(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Host apt knows 6.1 only; the extra setup knows 6.12 (no network, no apt)."""
    calls: list[str] = []

    def names(prefix: str, options: tuple[str, ...] = ()) -> list[str]:
        return [n for n in (EXTRA_NAMES if options else HOST_NAMES) if n.startswith(prefix)]

    def versions(name: str, options: tuple[str, ...] = ()) -> tuple[str, ...]:
        return VERSIONS.get(name, ()) if (name in EXTRA_NAMES) == bool(options) else ()

    def ensure() -> tuple[str, ...]:
        calls.append("ensure_extra")
        return archive.extra_options(Path("/x"))

    monkeypatch.setattr(archive, "package_names", names)
    monkeypatch.setattr(archive, "available_versions", versions)
    monkeypatch.setattr(archive, "ensure_extra", ensure)
    return calls


def test_series_and_releases_prefer_host_then_extra(fake_apt: list[str]) -> None:
    assert build._kernel_package("6.1", print)[:2] == ("linux-image-6.1.0-56-amd64", "6.1.192-2")
    assert build._kernel_package("6.1.0-55-amd64", print)[:2] == ("linux-image-6.1.0-55-amd64", "6.1.158-1")
    assert fake_apt == []  # the host's apt knew both: the extra suites were not touched
    package, version, options = build._kernel_package("6.12", print)
    assert (package, version) == ("linux-image-6.12.95+deb12-amd64", "6.12.95-1~bpo12+1")  # signed beats -unsigned
    assert "Dir::Etc::SourceParts=/dev/null" in options and fake_apt == ["ensure_extra"]
    assert build._kernel_package("6.12.88+deb12-amd64", print)[0] == "linux-image-6.12.88+deb12-amd64"
    with pytest.raises(LabError, match="also looked in bookworm-backports"):
        build._kernel_package("6.99", print)


def test_unsigned_image_is_used_when_no_signed_one_exists(fake_apt: list[str], monkeypatch) -> None:
    monkeypatch.setitem(VERSIONS, "linux-image-6.12.95+deb12-amd64", ())
    assert build._kernel_package("6.12", print)[0] == "linux-image-6.12.95+deb12-amd64-unsigned"
    assert build._kernel_package("6.12.95+deb12-amd64", print)[0] == "linux-image-6.12.95+deb12-amd64-unsigned"


def test_extra_options_keep_the_host_configuration_out(tmp_path: Path) -> None:
    opts = archive.extra_options(tmp_path)
    values = dict(o.split("=", 1) for o in opts[1::2])
    assert values["Dir::Etc::SourceList"] == str(tmp_path / "sources.list")
    assert values["Dir::State::Lists"] == str(tmp_path / "lists")
    assert values["Dir::Cache"] == str(tmp_path / "cache")
    assert values["Dir::Etc::SourceParts"] == "/dev/null"
    assert archive.extra_sources() == ("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
                                   "http://deb.debian.org/debian bookworm-backports main\n")


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to make a tiny ELF module")
def test_compressed_modules_are_decompressed_and_builtins_skipped(tmp_path: Path) -> None:
    src = tmp_path / "m.c"
    src.write_text('__attribute__((section(".modinfo"), used)) static const char d[] = "depends=dep";\n')
    obj = tmp_path / "m.o"
    subprocess.run(["gcc", "-c", "-o", str(obj), str(src)], check=True)
    mods = tmp_path / "lib" / "modules" / "6.12.0-test"
    (mods / "kernel" / "a").mkdir(parents=True)
    (mods / "kernel" / "a" / "top.ko.xz").write_bytes(lzma.compress(obj.read_bytes()))
    (tmp_path / "dep.c").write_text("int dep;\n")
    subprocess.run(["gcc", "-c", "-o", str(mods / "kernel" / "a" / "dep.ko"), str(tmp_path / "dep.c")], check=True)
    (mods / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    order = build.module_closure(mods, ("top", "virtio_pci"))
    assert order == ["kernel/a/dep.ko", "kernel/a/top.ko.xz"]
    assert [build.module_target(r) for r in order] == ["kernel/a/dep.ko", "kernel/a/top.ko"]
    assert build.module_bytes(mods / order[1]) == obj.read_bytes()
    with pytest.raises(LabError, match="not in"):
        build.module_closure(mods, ("e1000",))


@pytest.mark.parametrize("codec", ["xz", "zstd"])
def test_bzimage_payloads_decompress(codec: str) -> None:
    if shutil.which(codec) is None:
        pytest.skip(f"the `{codec}` tool is missing")
    vmlinux = b"\x7fELF" + bytes(range(256)) * 64
    packed = subprocess.run([codec, "-c", "-q"], input=vmlinux, capture_output=True, check=True).stdout
    payload = packed + len(vmlinux).to_bytes(4, "little")  # the kernel appends the decompressed size
    image = bytearray(0x600)
    image[0x1F1], image[0x202:0x206] = 1, b"HdrS"
    image[0x248:0x250] = (0).to_bytes(4, "little") + len(payload).to_bytes(4, "little")
    assert decompress_bzimage(bytes(image[:0x400]) + payload) == vmlinux
