"""CPython struct offsets from the DWARF of the exact Debian build, and the table shipped with them.

Debian's `python3.11-dbg` package carries `/usr/lib/debug/.build-id/XX/YYYY.debug`, the detached debug
information of the release interpreter `/usr/bin/python3.11` of the same source version (matched by GNU
build id). `offsets_from_dwarf` reads the members the reader needs from it (pyelftools); the results are
stored in `py_offsets.json`, keyed by build id, with the package and version they belong to. A test
regenerates the table from the dbg package and compares. Regenerate with
`python -m nephoscope.introspect.interp.pyoffsets DEBUGFILE PACKAGE VERSION`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from nephoscope.core.errors import KnowledgeError

TABLE = Path(__file__).with_name("py_offsets.json")
MAX_DEPTH = 16
# Every member the 3.11 reader uses (struct tag or typedef name -> member paths); sizes of the structs too
WANTED_311: dict[str, list[str]] = {
    "pyruntimestate": ["interpreters.head", "interpreters.main", "gilstate.tstate_current"],
    "_is": ["next", "id", "threads.head", "modules", "runtime"],
    "_ts": ["prev", "next", "interp", "cframe", "thread_id", "native_thread_id"],
    "_PyCFrame": ["current_frame", "previous"],
    "_PyInterpreterFrame": ["f_code", "previous", "prev_instr", "owner", "is_entry"],
    "PyCodeObject": ["co_filename", "co_name", "co_qualname", "co_linetable", "co_firstlineno",
                     "co_code_adaptive", "ob_base.ob_size"],
    "_object": ["ob_refcnt", "ob_type"],
    "PyVarObject": ["ob_size"],
    "PyASCIIObject": ["length", "state", "state.kind", "state.compact", "state.ascii"],
    "PyCompactUnicodeObject": ["utf8_length", "utf8"],
    "PyBytesObject": ["ob_sval"],
    "PyDictObject": ["ma_used", "ma_keys", "ma_values"],
    "_dictkeysobject": ["dk_log2_size", "dk_log2_index_bytes", "dk_kind", "dk_nentries", "dk_indices"],
    "PyDictKeyEntry": ["me_hash", "me_key", "me_value"],
    "PyDictUnicodeEntry": ["me_key", "me_value"],
    "PyModuleObject": ["md_dict"],
    # thread names: threading._active {ident: Thread}, each Thread's _name (an instance attribute)
    "_typeobject": ["tp_flags", "tp_dictoffset"],
    "_heaptypeobject": ["ht_cached_keys"],
    "_longobject": ["ob_digit"],
}
SYMBOLS_311 = ("_PyRuntime", "PyCode_Type", "PyUnicode_Type", "PyBytes_Type", "PyDict_Type", "PyModule_Type",
               "PyLong_Type")
MODIFIERS = {"DW_TAG_typedef", "DW_TAG_const_type", "DW_TAG_volatile_type", "DW_TAG_atomic_type"}


def _name(die: Any) -> str | None:
    attr = die.attributes.get("DW_AT_name")
    return attr.value.decode() if attr is not None else None


def _strip(die: Any) -> Any:
    for _ in range(MAX_DEPTH):
        if die.tag not in MODIFIERS or "DW_AT_type" not in die.attributes:
            return die
        die = die.get_DIE_from_attribute("DW_AT_type")
    raise KnowledgeError("DWARF typedef chain too deep")


def _member(die: Any, name: str) -> Any | None:
    for child in die.iter_children():
        if child.tag != "DW_TAG_member":
            continue
        if _name(child) == name:
            return child
        if _name(child) is None and "DW_AT_type" in child.attributes:  # an anonymous struct/union
            inner = _member(_strip(child.get_DIE_from_attribute("DW_AT_type")), name)
            if inner is not None:
                base = child.attributes.get("DW_AT_data_member_location")
                return (base.value if base else 0, inner)
    return None


def _resolve(struct_die: Any, path: str) -> int:
    """Return the byte offset of `path` in struct_die; bitfields as bit offsets (key ends with a bit name)."""
    die, offset = struct_die, 0
    parts = path.split(".")
    for i, part in enumerate(parts):
        found = _member(die, part)
        if found is None:
            raise KnowledgeError(f"DWARF: struct {_name(struct_die)} has no member {path}")
        extra = 0
        if isinstance(found, tuple):
            extra, found = found
        if "DW_AT_data_bit_offset" in found.attributes:  # a bitfield: return its bit offset from the struct start
            return (offset + extra) * 8 + int(found.attributes["DW_AT_data_bit_offset"].value)
        loc = found.attributes.get("DW_AT_data_member_location")
        offset += extra + (int(loc.value) if loc is not None else 0)
        if i < len(parts) - 1:
            die = _strip(found.get_DIE_from_attribute("DW_AT_type"))
    return offset


def offsets_from_dwarf(debug_file: Path, wanted: dict[str, list[str]] = WANTED_311) -> dict[str, int]:
    """Return {"struct.member": offset, "sizeof.struct": size} for `wanted` from an ELF's DWARF."""
    from elftools.elf.elffile import ELFFile

    with debug_file.open("rb") as fh:
        dwarf = ELFFile(fh).get_dwarf_info()
        dies: dict[str, Any] = {}
        for cu in dwarf.iter_CUs():
            for die in cu.get_top_DIE().iter_children():
                name = _name(die)
                if name not in wanted or name in dies:
                    continue
                if die.tag == "DW_TAG_structure_type" and "DW_AT_byte_size" in die.attributes:
                    dies[name] = die
                elif die.tag == "DW_TAG_typedef":
                    target = _strip(die)
                    if target.tag == "DW_TAG_structure_type" and "DW_AT_byte_size" in target.attributes:
                        dies[name] = target
            if len(dies) == len(wanted):
                break
        missing = sorted(set(wanted) - set(dies))
        if missing:
            raise KnowledgeError(f"{debug_file}: DWARF defines no {', '.join(missing)}")
        out: dict[str, int] = {}
        for struct, members in wanted.items():
            out[f"sizeof.{struct}"] = int(dies[struct].attributes["DW_AT_byte_size"].value)
            for member in members:
                bit = member in ("PyASCIIObject.state.kind",) or member.startswith("state.")
                value = _resolve(dies[struct], member)
                out[f"{struct}.{member}" + ("@bit" if bit else "")] = value
        return out


def load_table() -> dict[str, dict[str, Any]]:
    """Return the shipped table: {build id: {package, version, python, offsets}}."""
    try:
        return dict(json.loads(TABLE.read_text()))
    except (OSError, ValueError) as exc:
        raise KnowledgeError(f"{TABLE} unreadable ({exc}); reinstall nephoscope") from exc


def main(argv: list[str]) -> int:
    """Add one build to the table: DEBUGFILE PACKAGE VERSION (the build id is the debug file's name)."""
    debug, package, version = Path(argv[0]), argv[1], argv[2]
    table = load_table() if TABLE.exists() else {}
    table[debug.parent.name + debug.stem] = {"package": package, "version": version, "python": "3.11",
                         "source": f"DWARF of {debug.name} (python3.11-dbg {version})",
                         "offsets": offsets_from_dwarf(debug)}
    TABLE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
