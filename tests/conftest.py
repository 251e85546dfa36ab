"""Shared fixtures: lab guests booted once per session and always stopped, even when tests fail."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from nephoscope.lab import runner
from nephoscope.lab.build import Image, build_image
from nephoscope.lab.profile import load_profile

_SUFFIX = f"{os.getpid() % 100000}"


def _boot(profile: str, **kwargs: object) -> Iterator[runner.Guest]:
    image = build_image(load_profile(profile))
    name = f"pt-{profile}-{_SUFFIX}"
    guest = runner.start(name, image, **kwargs)  # type: ignore[arg-type]
    try:
        yield guest
    finally:
        runner.stop(name, quiet=True)


@pytest.fixture(scope="session")
def clean_image() -> Image:
    return build_image(load_profile("clean"))


@pytest.fixture(scope="session")
def default_kb() -> None:
    """Make sure the default code-page DB holds the lab's packages (ingests what is missing, once)."""
    from nephoscope.service.demo import ensure_knowledge

    problems = ensure_knowledge("clean", lambda _m: None)
    assert not problems, problems


@pytest.fixture(scope="session")
def clean_guest() -> Iterator[runner.Guest]:
    yield from _boot("clean")


@pytest.fixture(scope="session")
def tampered_guest() -> Iterator[runner.Guest]:
    yield from _boot("tampered", kaslr=True)
