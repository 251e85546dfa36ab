"""What a lab profile installs, as package specs the knowledge layer can ingest or harvest."""

from __future__ import annotations

from collections.abc import Callable

from nephoscope.knowledge.debian import archive
from nephoscope.lab.build import choose_kernel, resolve_packages
from nephoscope.lab.profile import load_profile

Progress = Callable[[str], None]


def profile_packages(profile_name: str, progress: Progress = lambda _m: None) -> list[str]:
    """Return the sorted names of every package a lab profile resolves to (its own and their libraries)."""
    return sorted(resolve_packages(load_profile(profile_name), progress))


def lab_package_specs(profile_name: str, progress: Progress = lambda _m: None) -> list[str]:
    """Return NAME=VERSION for every package of a lab profile in its chosen, newest and oldest versions."""
    specs: list[str] = []
    for name, chosen in resolve_packages(load_profile(profile_name), progress).items():
        versions = archive.available_versions(name)
        specs += [f"{name}={v}" for v in dict.fromkeys([chosen, *versions[:1], *versions[-1:]])]
    kernel = choose_kernel(None, progress)
    if kernel.package:
        specs.append(f"{kernel.package}={kernel.version}")
    return specs
