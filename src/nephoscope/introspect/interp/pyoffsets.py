"""CPython struct offsets from the DWARF of the exact Debian build, and the table shipped with them.

Debian's `python3.11-dbg` package carries `/usr/lib/debug/.build-id/XX/YYYY.debug`, the detached debug
information of the release interpreter `/usr/bin/python3.11` of the same source version (matched by GNU
build id). `offsets_from_dwarf` reads the members the reader needs from it (pyelftools); the results are
stored in `py_offsets.json`, keyed by build id, with the package and version they belong to. A test
regenerates the table from the dbg package and compares. Regenerate with
`python -m nephoscope.introspect.interp.pyoffsets DEBUGFILE PACKAGE VERSION`.

A build the table lacks is derived on demand (`find_offsets`): the Debian version whose binary has that
build id is found (builds.find_debian_version: the KB's record of the file, else every version apt
offers), that version's dbg package is downloaded and the offsets are read from the debug file of exactly
that build id; the result is cached in `<cache>/interp/py-builds.json` (validated on load). Host only.
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
# the Debian CPython binaries whose builds can be derived on demand: binary -> (its package, the dbg package
# with the detached debug file of the same build)
DEBIAN_BINARIES: dict[str, tuple[str, str]] = {
    "/usr/bin/python3.11": ("python3.11-minimal", "python3.11-dbg"),
    "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0": ("libpython3.11", "libpython3.11-dbg"),
}
BUILDS_CACHE = "py-builds.json"
MAX_OFFSET = 1 << 24
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
                out[_key(struct, member)] = _resolve(dies[struct], member)
        return out


def _key(struct: str, member: str) -> str:
    bit = member in ("PyASCIIObject.state.kind",) or member.startswith("state.")
    return f"{struct}.{member}" + ("@bit" if bit else "")


def offset_keys(wanted: dict[str, list[str]] = WANTED_311) -> set[str]:
    """Return the keys `offsets_from_dwarf(..., wanted)` produces."""
    return {f"sizeof.{s}" for s in wanted} | {_key(s, m) for s, members in wanted.items() for m in members}


def valid_entry(build_id: str, entry: Any) -> bool:
    """Return whether `entry` is a complete table entry for `build_id`: names, and every offset the reader needs."""
    offsets = entry.get("offsets")
    return (entry.get("build_id", build_id) == build_id and isinstance(entry.get("package"), str)
            and isinstance(entry.get("version"), str) and entry.get("python") == "3.11"
            and isinstance(offsets, dict) and set(offsets) == offset_keys()
            and all(type(v) is int and 0 <= v < MAX_OFFSET for v in offsets.values()))


def builds_path() -> Path:
    """Return the cache of builds derived on demand: <cache>/interp/py-builds.json."""
    from nephoscope.core.paths import cache_root

    return cache_root() / "interp" / BUILDS_CACHE


def find_offsets(build_id: str, binary: str) -> tuple[dict[str, Any] | None, str]:
    """Return (table entry, "") for the Debian CPython build `build_id` of `binary`, or (None, why not).

    The shipped table first, then the builds derived earlier (<cache>/interp/py-builds.json), then on
    demand: the package version whose binary has this build id (KB record, then every version apt offers;
    downloads .debs), its dbg package, the DWARF of `/usr/lib/debug/.build-id/XX/YYYY.debug`. A build id
    that is found nowhere is tried once per process. Never raises; host only, no guest access.
    """
    from nephoscope.introspect.interp import builds

    table = load_table()
    if build_id in table:
        return {**table[build_id], "build_id": build_id}, ""
    if binary not in DEBIAN_BINARIES:
        return None, (f"build id {build_id} of {binary} is not in the shipped offsets table, and {binary} is "
                      "no Debian CPython binary nephoscope can fetch the build of")
    package, dbg = DEBIAN_BINARIES[binary]
    cache = builds.BuildCache(BUILDS_CACHE, valid_entry, builds_path())
    entry = cache.get(build_id)
    if entry is not None:
        return entry, ""
    why = builds.failure(cache, package, binary, build_id)
    if why is not None:
        return None, why
    known = {e["version"]: b for b, e in table.items() if e.get("package") == package} | cache.versions(package)
    search = builds.find_debian_version(build_id, package, binary, skip=known)
    if search.version is None:
        why = search.why(build_id, package, binary)
    else:
        try:
            entry = derive_entry(build_id, package, search.version, dbg)
        except KnowledgeError as exc:
            why = f"{binary} build {build_id} is {package} {search.version}, but its offsets are unknown: {exc}"
        else:
            entry["found_by"] = "the KB's record of the file" if search.from_kb else "the build ids of apt's versions"
            cache.put(build_id, entry)
            cache.save()
            return entry, ""
    builds.remember_failure(cache, package, binary, build_id, why)
    return None, why


def derive_entry(build_id: str, package: str, version: str, dbg: str) -> dict[str, Any]:
    """Return the table entry of one build from `dbg`=`version`'s debug file of `build_id` (downloads it)."""
    from elftools.common.exceptions import DWARFError, ELFError

    from nephoscope.core.paths import cache_root
    from nephoscope.knowledge.debian import archive

    root = archive.unpack(archive.download(dbg, version, cache_root() / "debs"), cache_root() / "unpacked") / "root"
    debug = root / "usr/lib/debug/.build-id" / build_id[:2] / f"{build_id[2:]}.debug"
    if not debug.is_file():
        raise KnowledgeError(f"{dbg} {version} has no debug file for build {build_id}")
    try:
        offsets = offsets_from_dwarf(debug)
    except (ELFError, DWARFError, OSError, ValueError, KeyError, AttributeError) as exc:
        raise KnowledgeError(f"the DWARF of {debug.name} ({dbg} {version}) does not parse: {exc}") from None
    entry = {"build_id": build_id, "package": package, "version": version, "python": "3.11",
             "source": f"DWARF of .build-id/{build_id[:2]}/{debug.name} ({dbg} {version}), derived on demand",
             "offsets": offsets}
    if not valid_entry(build_id, entry):
        raise KnowledgeError(f"the DWARF of {debug.name} ({dbg} {version}) gives implausible offsets")
    return entry


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
