"""A CPython other than 3.11 is said to be not read yet, by its version, before any guest read or download."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from nephoscope.introspect.interp import python


class _NoReads:
    def read(self, gva: int, size: int) -> bytes:
        raise AssertionError("no guest read for an unsupported CPython")


@pytest.mark.parametrize("path", ["/usr/bin/python3.13", "/usr/lib/x86_64-linux-gnu/libpython3.12.so.1.0"])
def test_other_minor_versions_are_named_not_guessed(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(python, "find_offsets", lambda *_a: pytest.fail("no offsets lookup"))
    ctx: Any = _NoReads()
    ctx.vmas = [SimpleNamespace(file_gva=0xffff888000001000, path=path, offset=0, start=0x400000)]
    why = python.find_build(ctx)
    minor = path.split("python")[1][:4]
    assert isinstance(why, str) and f"CPython {minor} is not read yet" in why and path in why


def test_no_cpython_mapped_is_none() -> None:
    ctx: Any = _NoReads()
    ctx.vmas = [SimpleNamespace(file_gva=1, path="/usr/bin/perl", offset=0, start=0x400000)]
    assert python.find_build(ctx) is None
