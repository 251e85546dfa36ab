"""Typed payloads of observations: one frozen dataclass per kind that analysis reads, JSON only at the edge.

A method builds a payload (`Process`, `Image`, `UnknownCode`, ...) and wraps it in an `Observation`;
analysis reads its attributes. `to_json()` is the one serialisation (store, JSON output, finding
evidence) and `from_json(kind, data)` the one way back. `from_json` is strict about the type of every
field (a stored or hostile record with a wrong shape raises `PayloadError`), lenient about what is
missing (a field's default) and ignores keys it does not know. `parse(kind, data)` never raises: a
record that does not fit its kind becomes `Details` with `problem` set, which no analysis interprets.

Kinds that carry diagnostics no analysis interprets (the kernel detection report, scan problems, trap
statistics, agent info, ...) keep a generic `Details` payload: their shape follows the component that
reports them, and typing them would only freeze a report format.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from nephoscope.core.errors import NephoscopeError

P = TypeVar("P", bound="Payload")


class PayloadError(NephoscopeError):
    """An observation record does not have the shape of its kind (wrong type of a field, not an object)."""


@dataclass(frozen=True, slots=True)
class Record:
    """A typed JSON object: fields are checked on `from_json`, `None` fields are left out by `to_json`."""

    ALIASES: ClassVar[dict[str, str]] = {}  # older key -> field, read only

    def to_json(self) -> dict[str, Any]:
        """Return the JSON-ready dict of this record (tuples as lists, fields that are None left out)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = _to_json(value)
        return out

    @classmethod
    def from_json(cls: type[R], data: Any, where: str = "") -> R:
        """Return the record a JSON dict describes; raise PayloadError when a field has the wrong type."""
        where = where or cls.__name__
        if not isinstance(data, dict):
            raise PayloadError(f"{where}: expected an object, got {type(data).__name__}")
        hints = _hints(cls)
        values: dict[str, Any] = {}
        for old, new in cls.ALIASES.items():
            if old in data and new not in data:
                values[new] = data[old]
        for f in dataclasses.fields(cls):
            if f.name in data:
                values[f.name] = data[f.name]
        for name in list(values):
            values[name] = _check(values[name], hints[name], f"{where}.{name}")
        try:
            return cls(**values)
        except TypeError as exc:  # a required field is missing
            raise PayloadError(f"{where}: {exc}") from None


R = TypeVar("R", bound=Record)


@dataclass(frozen=True, slots=True)
class Payload(Record):
    """What one observation says; `KINDS` are the observation kinds this class carries."""

    KINDS: ClassVar[tuple[str, ...]] = ()


# --- processes and what the guest OS reports -------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Process(Payload):
    """A process (inspect: from the task list / PID table; agent: from the guest's /proc)."""

    KINDS = ("process",)
    pid: int
    tgid: int | None = None
    ppid: int | None = None
    comm: str = ""
    exe: str = ""
    cmdline: tuple[str, ...] = ()
    uid: int | None = None
    gid: int | None = None
    euid: int | None = None
    state: str | None = None
    start_boottime_ns: int | None = None
    kernel_thread: bool = False
    cr3: int | None = None  # gpa of the page-table root of its mm (inspect)
    notes: tuple[str, ...] = ()
    agent_own: bool | None = None  # the agent's own helper processes (agent only)

    @property
    def is_user_process(self) -> bool:
        """Return whether this is a customer's user process (not a kernel thread, not the agent's helper)."""
        return not self.kernel_thread and not self.agent_own and bool(self.exe or self.cmdline)


@dataclass(frozen=True, slots=True)
class Mapping(Payload):
    """An executable mapping of a process (gva range, permissions, backing file)."""

    KINDS = ("mapping",)
    pid: int
    start: int = 0  # gva
    end: int = 0  # gva
    perms: str = ""
    offset: int | None = None
    path: str = ""


@dataclass(frozen=True, slots=True)
class Module(Payload):
    """A kernel module (base gva and size when known)."""

    KINDS = ("module",)
    name: str
    base: int | None = None
    size: int | None = None


@dataclass(frozen=True, slots=True)
class Package(Payload):
    """An installed package as the guest's dpkg status reports it."""

    KINDS = ("package",)
    name: str
    version: str = ""
    source: str = ""
    arch: str = ""


@dataclass(frozen=True, slots=True)
class CrossView(Payload):
    """A pid seen in only one of two complete, validated kernel views (task list, PID table)."""

    KINDS = ("cross-view",)
    pid: int
    comm: str = ""
    in_task_list: bool = False
    in_pid_idr: bool = False
    views_complete: bool = False


@dataclass(frozen=True, slots=True)
class Socket(Payload):
    """A socket (inspect: from kernel memory, the views that saw it and its owning pids; agent: /proc/net)."""

    KINDS = ("socket",)
    proto: str
    family: str = ""
    type: str = ""
    state: str = ""
    local: str = ""
    local_port: int = 0
    remote: str = ""
    remote_port: int = 0
    rx_queue: int = 0
    tx_queue: int = 0
    inode: int = 0
    views: tuple[str, ...] = ()  # files, tcp-established, tcp-listen, udp, raw, ... (agent: proc-net)
    owners: tuple[int, ...] = ()  # pids whose file tables hold it
    hidden: bool = False  # in the kernel's tables, in no file table: both views complete, confirmed twice


# --- arch: code identified from page tables and page contents --------------------------------------

@dataclass(frozen=True, slots=True)
class Candidate(Record):
    """A packaged file an image's pages are byte-identical to."""

    path: str = ""
    package: str = ""
    version: str = ""
    arch: str = ""
    source_package: str = ""
    build_id: str | None = None
    sha256: str = ""
    file_id: int | None = None


@dataclass(frozen=True, slots=True)
class ModifiedPage(Record):
    """A page of an identified image whose bytes differ from the file (gva virtual, gpa physical)."""

    gva: int | None = None  # None: a record that names no page (skipped)
    gpa: int | None = None
    vaddr: int | None = None
    file_offset: int | None = None


@dataclass(frozen=True, slots=True)
class Image(Payload):
    """An executable image in one address space identified by its pages ("modified-binary": some differ)."""

    KINDS = ("binary", "modified-binary")
    cr3: int | None = None  # gpa of the kernel page-table root
    user_cr3: int | None = None  # gpa of the user root with PTI
    gva_start: int | None = None
    gva_end: int | None = None
    base: int | None = None
    pages: int = 0
    path: str = "?"
    versions: tuple[tuple[str, str], ...] = ()  # (package, version) the pages fit
    candidates: tuple[Candidate, ...] = ()
    modified_pages: tuple[ModifiedPage, ...] | None = None

    @property
    def roots(self) -> set[int]:
        """Return the page-table roots (gpa) this image belongs to (kernel and, with PTI, user PGD)."""
        return {r for r in (self.cr3, self.user_cr3) if r is not None}

    def identity(self) -> dict[str, Any]:
        """Return path, package and versions (of its first package) and its gva range, as a plain dict."""
        package = self.versions[0][0] if self.versions else (self.candidates[0].package if self.candidates
                                                              else None)
        package = package or None
        return {"path": self.path, "package": package,
                "versions": sorted({v for p, v in self.versions if p == package}),
                "gva_start": self.gva_start, "gva_end": self.gva_end}


@dataclass(frozen=True, slots=True)
class UnknownCode(Payload):
    """Executable pages in one address space that match no known binary."""

    KINDS = ("unknown-code",)
    ALIASES: ClassVar[dict[str, str]] = {"start": "gva_start", "end": "gva_end"}  # older records
    cr3: int | None = None
    gva_start: int | None = None
    gva_end: int | None = None
    pages: int = 0
    writable: bool = False
    gpas: tuple[int, ...] = ()
    head: str = ""  # hex of the first bytes

    @property
    def roots(self) -> set[int]:
        """Return the page-table roots (gpa) this region belongs to."""
        return {self.cr3} if self.cr3 is not None else set()


@dataclass(frozen=True, slots=True)
class Vdso(Payload):
    """The vdso of one address space (verified against the KB, or named by its ELF header)."""

    KINDS = ("vdso",)
    cr3: int | None = None
    gva_start: int | None = None
    gva_end: int | None = None
    name: str = ""
    kernel: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class KernelCode(Payload):
    """Kernel text seen executable (patched at boot, so not identified page by page)."""

    KINDS = ("kernel-code",)
    pages: int = 0
    bytes: int = 0
    ranges: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class KernelChange(Record):
    """Bytes of kernel code that differ from every legitimate variant (old: the package's, new: the guest's)."""

    gva: int = 0
    function: str = ""
    old: str = ""  # hex
    new: str = ""  # hex
    site: str = ""  # the patch-site kind when the bytes lie in a site


@dataclass(frozen=True, slots=True)
class KernelImage(Payload):
    """One kernel image's code identity: the vmlinux text, a module, the real-mode trampoline or BPF JIT memory."""

    KINDS = ("kernel-image", "modified-kernel-image")
    name: str = "?"
    kind: str = ""  # vmlinux | module | bpf
    status: str = ""  # verified | modified | unverifiable
    package: str = ""
    version: str = ""
    pages: int = 0
    pages_verified: int = 0
    ranges: tuple[tuple[int, int], ...] = ()
    modified_pages: tuple[int, ...] = ()
    changes: tuple[KernelChange, ...] = ()
    normalised: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class UnknownKernelCode(Payload):
    """Executable supervisor memory that belongs to no kernel image or known module."""

    KINDS = ("unknown-kernel-code",)
    gva_start: int = 0
    gva_end: int = 0
    pages: int = 0
    head: str = ""  # first bytes, hex


@dataclass(frozen=True, slots=True)
class AddressSpace(Payload):
    """One page-table root and what it executes."""

    KINDS = ("address-space",)
    cr3: int | None = None
    user_cr3: int | None = None
    exec_pages: int = 0
    vcpus: tuple[int, ...] = ()
    main: str | None = None  # path of the main binary, "unknown" for unknown code
    anomalies: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class UnfoundRoot(Payload):
    """A vCPU's page-table root the scan did not accept as a root."""

    KINDS = ("unfound-root",)
    cr3: int | None = None


# --- trap: events seen by the vCPU ----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TrapEvent(Payload):
    """Who a trapped event happened to (the current task) and when."""

    pid: int | None = None
    tid: int | None = None
    ppid: int | None = None
    comm: str = ""
    time: float | None = None


@dataclass(frozen=True, slots=True)
class Exec(TrapEvent):
    """An exec: the path asked for, what really loads, argv, and the code identity when known."""

    KINDS = ("exec",)
    path: str | None = None
    interp: str | None = None
    file: str | None = None
    argv: tuple[str, ...] | None = None
    identity: dict[str, Any] | None = None  # the exec's code identity (its identity record)
    problems: dict[str, str] = field(default_factory=dict)  # field -> why it could not be read

    def to_json(self) -> dict[str, Any]:
        """Return the JSON dict; each problem is a `<field>_error` key, as the event log writes it."""
        out = Record.to_json(self)
        out.pop("problems", None)
        out.update({f"{what}_error": why for what, why in self.problems.items()})
        return out

    @classmethod
    def from_json(cls, data: Any, where: str = "") -> Exec:
        """Return the exec a JSON dict describes (with its `<field>_error` keys as problems)."""
        base = super(Exec, cls).from_json(data, where)
        problems = {k.removesuffix("_error"): v for k, v in data.items() if k.endswith("_error")}
        return dataclasses.replace(base, problems=_check(problems, dict[str, str], "Exec.problems"))


@dataclass(frozen=True, slots=True)
class Exit(TrapEvent):
    """A task entering do_exit."""

    KINDS = ("exit",)
    code: int | None = None
    status: int | None = None
    signal: int | None = None


@dataclass(frozen=True, slots=True)
class ModuleLoad(TrapEvent):
    """A kernel module being initialised (its struct module gva, core base and sizes)."""

    KINDS = ("module-load",)
    name: str | None = None
    struct_gva: int | None = None
    core_base: int | None = None
    core_size: int | None = None
    init_size: int | None = None


# --- kernel integrity --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class KernelTamper(Payload):
    """Kernel-level tampering one cross-view or pointer check found, with the check and its evidence.

    `technique`: hidden-task, hidden-module, syscall-hook, idt-hook, inline-hook, ftrace-hook, kprobe-hook,
    ops-hook; `check` names the view or check that saw it; `target` is the code pointer (kernel gva)."""

    KINDS = ("kernel-tamper",)
    technique: str = ""
    check: str = ""
    where: str = ""
    target: int | None = None
    owner: str = ""  # core-text, module:NAME or elsewhere
    pid: int | None = None
    module: str = ""
    evidence: str = ""


# --- interpreters: what scripts a process runs -------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ScriptEntry(Record):
    """One script file an interpreter runs, read from the guest page cache and identified by its sha256.

    `status`: known (a packaged file), unknown (outside the package trees, in no package), modified (a
    packaged path with other bytes), unverifiable (not cached, not found; `reason` says why)."""

    path: str = ""
    status: str = ""
    sha256: str = ""
    identity: str = ""  # "flask 2.2.2 (python3-flask 2.2.2-3)"
    package: str = ""
    version: str = ""
    reason: str = ""
    head: tuple[str, ...] = ()  # first lines, escaped (unknown and modified files)


@dataclass(frozen=True, slots=True)
class Interpreter(Payload):
    """What one interpreter process runs: its build, entry script, every thread's stack and script files."""

    KINDS = ("interpreter",)
    pid: int = 0
    kind: str = ""  # python, php, java
    runtime: str = ""
    entry: str = ""
    stacks: tuple[tuple[str, ...], ...] = ()  # per thread, innermost first: "function (file:line)"
    scripts: int = 0  # script files loaded
    files: tuple[ScriptEntry, ...] = ()


# --- method bookkeeping -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Checkpoint(Payload):
    """A consistent copy of the VM's RAM: pause time, the paused vCPUs' roots and paging levels, its size,
    how much of it was copied (touched RAM only: the copy is sparse) and where RAM came from."""

    KINDS = ("checkpoint",)
    pause_s: float = 0.0
    vcpu_cr3: tuple[int, ...] = ()
    vcpu_levels: tuple[int, ...] = ()
    bytes: int = 0
    bytes_copied: int = 0
    ram_from: str = ""  # "RAM file" or "QEMU process"


@dataclass(frozen=True, slots=True)
class Unverifiable(Payload):
    """Something a method could not obtain (`what`; the observation's reason says why)."""

    KINDS = ("unverifiable",)
    what: str = ""


@dataclass(frozen=True, slots=True)
class Details(Payload):
    """A diagnostic record no analysis interprets, or a record that did not fit its kind (`problem`)."""

    MARKER: ClassVar[str] = "invalid_payload"
    KINDS = ("kernel", "scan", "memory-image", "image-inconsistent", "trap-stats", "agent")
    data: dict[str, Any] = field(default_factory=dict)
    problem: str = ""  # why the record is not its kind's payload (empty: a diagnostic kind)

    def to_json(self) -> dict[str, Any]:
        """Return the record as it came (with the problem marker when it did not fit its kind)."""
        out = dict(self.data)
        if self.problem:
            out[self.MARKER] = self.problem
        return out

    @classmethod
    def from_json(cls, data: Any, where: str = "") -> Details:
        """Return the record as details (raise PayloadError when it is not an object)."""
        if not isinstance(data, dict):
            raise PayloadError(f"{where or 'Details'}: expected an object, got {type(data).__name__}")
        rest = {str(k): v for k, v in data.items() if k != cls.MARKER}
        problem = data.get(cls.MARKER)
        return cls(rest, problem if isinstance(problem, str) else "")


PAYLOADS: tuple[type[Payload], ...] = (Process, Mapping, Module, Package, CrossView, Image, UnknownCode, Vdso,
                                       KernelCode, KernelImage, UnknownKernelCode, AddressSpace, UnfoundRoot, Exec,
                                       Exit, ModuleLoad, Checkpoint, KernelTamper, Unverifiable, Details, Socket,
                                       Interpreter)
REGISTRY: dict[str, type[Payload]] = {kind: cls for cls in PAYLOADS for kind in cls.KINDS}


def payload_class(kind: str) -> type[Payload]:
    """Return the payload class of an observation kind (`Details` for a kind no analysis interprets)."""
    return REGISTRY.get(kind, Details)


def from_json(kind: str, data: Any) -> Payload:
    """Return the payload of a `kind` observation from its JSON dict; raise PayloadError on a wrong shape."""
    return payload_class(kind).from_json(data, kind)


def parse(kind: str, data: Any) -> Payload:
    """Return the payload of a `kind` record, or `Details` with `problem` set when it does not fit (no raise)."""
    try:
        return from_json(kind, data)
    except PayloadError as exc:
        return Details(dict(data) if isinstance(data, dict) else {"value": data}, str(exc))


def check_kind(kind: str, payload: Payload) -> None:
    """Raise PayloadError when `payload` is not a payload of `kind` (Details goes with any kind)."""
    if not isinstance(payload, Payload):
        raise PayloadError(f"a {kind!r} observation needs a Payload, got {type(payload).__name__}")
    if not isinstance(payload, Details) and kind not in type(payload).KINDS:
        raise PayloadError(f"a {type(payload).__name__} payload is not a {kind!r} observation "
                           f"(it is one of {', '.join(type(payload).KINDS)})")


# --- the checks ---------------------------------------------------------------------------------------

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _to_json(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


def _check(value: Any, tp: Any, where: str) -> Any:
    """Return `value` as type `tp` (lists become tuples); raise PayloadError when it is not one."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        problems = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                continue
            try:
                return _check(value, arm, where)
            except PayloadError as exc:
                problems.append(str(exc))
        raise PayloadError(problems[0] if len(problems) == 1 else f"{where}: {_name(value)} fits none of {tp}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise PayloadError(f"{where}: expected a list, got {_name(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise PayloadError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_check(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        key_t, value_t = typing.get_args(tp)
        if not isinstance(value, dict):
            raise PayloadError(f"{where}: expected an object, got {_name(value)}")
        return {_check(k, key_t, f"{where} key"): _check(v, value_t, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Record):
        return tp.from_json(value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise PayloadError(f"{where}: expected true/false, got {_name(value)}")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise PayloadError(f"{where}: expected an integer, got {_name(value)}")
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise PayloadError(f"{where}: expected a number, got {_name(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise PayloadError(f"{where}: expected a string, got {_name(value)}")
        return value
    raise PayloadError(f"{where}: no check for {tp}")  # a payload declared a type this module cannot check


def _name(value: Any) -> str:
    return "null" if value is None else type(value).__name__
