"""What code one process executes, in short: its main binary (package, version), its libraries, unknown code.

Input is a merged process view's executable images (arch's, and checkpoint's arch on a copy of the same
RAM, so one image can appear once per method); each image and each unknown region is counted once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nephoscope.introspect.codepages import main_of


@dataclass(frozen=True, slots=True)
class MainBinary:
    """The program an address space runs, as identified from its executable pages."""

    path: str
    package: str | None
    versions: tuple[str, ...]
    modified: bool  # some pages differ from every known version


@dataclass(frozen=True, slots=True)
class CodeSummary:
    """One process's executing code: the main binary, and counts of everything else."""

    main: MainBinary | None
    libraries: int  # identified images other than the main binary (distinct path + package)
    unknown_regions: int  # distinct executable ranges that match no known binary
    modified_libraries: int  # libraries whose pages differ from every known version
    methods: tuple[str, ...] = field(default=())  # the methods whose images this summarises

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        main = self.main
        return {"main": None if main is None else {"path": main.path, "package": main.package,
                                                    "versions": list(main.versions), "modified": main.modified},
                "libraries": self.libraries, "unknown_regions": self.unknown_regions,
                "modified_libraries": self.modified_libraries, "methods": list(self.methods)}


def _image_key(image: dict[str, Any]) -> tuple[Any, Any]:
    return image.get("path"), image.get("package")


def main_binary(exe: str, images: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Return the image that is the main program of an address space, or None when it is unknown code.

    `exe` is the process's executable path as the kernel names it (may end in " (deleted)" or be a
    memfd); `images` are the space's executable regions (path, package, gva_start, gva_end, status;
    status "unknown" for code in no known file). The rule is the one every layer uses,
    `introspect.codepages.main_of`: the image whose file is the executable; else the lowest region that
    is not a shared library (an unknown region counts, and then there is no main *binary*)."""
    regions = [((str(b.get("path") or ""),) if b.get("status") != "unknown" else (), int(b.get("gva_start") or 0))
               for b in images]
    index = main_of(regions, exe)
    if index is None or images[index].get("status") == "unknown":
        return None
    return images[index]


def summarize_code(exe: str, images: Sequence[dict[str, Any]]) -> CodeSummary:
    """Return the code summary of a process from its executable images (each counted once across methods)."""
    known = [b for b in images if b.get("status") != "unknown"]
    main = main_binary(exe, images)
    main_key = _image_key(main) if main is not None else None
    libraries = {_image_key(b) for b in known if _image_key(b) != main_key}
    modified = {_image_key(b) for b in known if _image_key(b) != main_key and b.get("status") == "modified"}
    unknown = {(b.get("gva_start"), b.get("gva_end")) for b in images if b.get("status") == "unknown"}
    methods = tuple(sorted({str(b["method"]) for b in images if b.get("method")}))
    top = None
    if main is not None:
        versions = sorted({v for b in known if _image_key(b) == main_key for v in b.get("versions", [])})
        top = MainBinary(str(main.get("path") or "?"), main.get("package"), tuple(versions),
                         any(b.get("status") == "modified" for b in known if _image_key(b) == main_key))
    return CodeSummary(top, len(libraries), len(unknown), len(modified), methods)
