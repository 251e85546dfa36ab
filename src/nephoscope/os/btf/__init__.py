"""nephoscope os/btf layer: the kernel's BTF type information, parsed and located in guest RAM."""

from nephoscope.os.btf.layout import member_offsets
from nephoscope.os.btf.reader import Btf
from nephoscope.os.btf.types import Kind, Member, Struct, Type

__all__ = ["Btf", "Kind", "Member", "Struct", "Type", "member_offsets"]
