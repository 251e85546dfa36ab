"""Resolve every struct member the kernel model needs in one go, failing once with all that is missing."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from nephoscope.core.errors import GuestDataError
from nephoscope.os.btf.reader import Btf
from nephoscope.os.btf.types import Member

Layout = dict[str, dict[str, Member]]


def member_offsets(btf: Btf, wanted: Mapping[str, Iterable[str]], kernel: str = "") -> Layout:
    """Return {struct: {member path: Member}} for `wanted`; a path ending in "?" is optional.

    Raise GuestDataError naming the kernel and every missing struct and member.
    """
    layout: Layout = {}
    missing: list[str] = []
    for struct_name, paths in wanted.items():
        found = btf.find_struct(struct_name)
        if found is None:
            missing.append(f"struct {struct_name}")
            continue
        members = layout.setdefault(struct_name, {})
        for path in paths:
            optional = path.endswith("?")
            path = path.rstrip("?")
            member = found.find_member(path)
            if member is not None:
                members[path] = member
            elif not optional:
                missing.append(f"{struct_name}.{path}")
    if missing:
        where = f"kernel {kernel}" if kernel else btf.label
        raise GuestDataError(f"{where}: BTF lacks {', '.join(missing)}; this kernel lays these structures out "
                             "differently — teach the kernel model its variant")
    return layout
