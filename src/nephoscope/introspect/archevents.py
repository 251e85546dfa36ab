"""The architectural event stream: every first execution of a guest-physical code page, as it happens.

The `archevents` QEMU TCG plugin (lab/plugin/archevents.c) reports each page the guest executes for the
first time, and each page executed again after a store to it (self-modifying, injected or reused code),
with the page's bytes as they were when TCG translated it. Here the stream is parsed (defensively:
bounded records, every field checked), each page is identified against the code-page DB at once (its
SHA-256, as the arch scan hashes pages, `knowledge.pagehash`), and an unknown user page is attributed
to the address spaces that map it: the plugin API of QEMU 7.2 exposes no registers, so no cr3 comes
with an event; the executable user pages of the page-table roots found in RAM (`memory.roots.scan_roots`)
are mapped back to their roots instead (at any vaddr: shared code sits at different addresses per
process). Nothing here pauses the VM.

TCG only: under KVM no plugin sees guest code; KVM hosts use periodic arch scans and trap.
Addresses: `gpa` guest-physical (the plugin's RAM offset; equal to the gpa below the PCI hole, which
is where a lab guest's shared RAM file keeps all RAM), `vaddr` guest-virtual (the first instruction
executed on the page, in whatever address space was current).
"""

from __future__ import annotations

import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nephoscope.core.errors import ConnectorError, GuestDataError, MemoryAccessError
from nephoscope.introspect.codepages import KERNEL_REASON, SCAN_BUDGET, USER_TOP, CodePageLookup
from nephoscope.knowledge.pagehash import PAGE_SIZE, page_digest
from nephoscope.memory.paging import AddressSpace, Budget
from nephoscope.memory.physical import PhysicalMemory
from nephoscope.memory.roots import scan_roots

__all__ = ["LIMIT", "MAGIC", "TCG_ONLY", "ArchEventStream", "PageEvent", "Record", "StreamParser"]

MAGIC = 0x4541504E  # "NPAE" little-endian
HEADER = struct.Struct("<IBBHIIQQQ")
KINDS = {1: "first", 2: "written", 3: "replay", 4: "hello", 5: "stats", 6: "replay-done"}
PAGE_KINDS = ("first", "written", "replay")
MAX_PAYLOAD = {"first": PAGE_SIZE, "written": PAGE_SIZE, "replay": PAGE_SIZE, "hello": 1024, "stats": 64,
               "replay-done": 0}
STATS = ("first", "written", "replayed", "sent", "send_failed", "outside_ram", "unsent", "store_marks")
MAX_GPA = 1 << 52
MAX_VADDR = (1 << 64) - 1
MAX_IMAGES = 4  # candidate files named per page (a page shared by many files names a few)
MAX_ROOT_SCANS_PER_S = 1.0  # an unknown page not mapped by any known root rescans RAM at most this often
MAX_ROOTS = 512  # address spaces walked per rebuild of the reverse map
MAX_LARGE = 2 << 20  # pages of a user large page mapped (a 1 GiB user page is not expanded past 2 MiB)
TCG_ONLY = "TCG only: under KVM no QEMU plugin sees guest code; KVM hosts use periodic arch scans and trap"
LIMIT = ("the plugin sees code as TCG translates it and CPU stores; a page changed by device DMA after it was "
         "executed is seen only if it is executed from a page never executed before")
STALE_NOTE = ("written since it last ran (before this reader connected) and no address space maps it executable "
              "now: its bytes are no longer code")
MAX_QUEUED = 64  # batches (each at most one 1 MiB read) between the socket thread and identification
VDSO_SONAME = b"linux-vdso.so.1"
BOOT_NOTE = ("identity-mapped (vaddr = gpa): firmware or early boot code; the 7.2 plugin API gives no privilege "
             "level, so user code that happened to run at its own physical address would be labelled so too")


@dataclass(frozen=True, slots=True)
class Record:
    """One record of the plugin's stream (`payload` is the page's bytes for page kinds when `has_bytes`)."""

    kind: str
    gpa: int
    vaddr: int
    time_ns: int
    payload: bytes
    has_bytes: bool
    written_since: bool = False  # a replayed page stored to after it last ran: its bytes may not be code now

    def stats(self) -> dict[str, int]:
        """Return a stats record's counters by name."""
        return dict(zip(STATS, struct.unpack("<8Q", self.payload), strict=True)) if self.kind == "stats" else {}


class StreamParser:
    """Split the plugin's byte stream into Records; a malformed header ends the stream (`broken` says why).

    Memory is bounded by one record (40 + 4096 bytes) plus the chunk being fed: the parser keeps only
    an incomplete tail. The stream comes from the plugin inside QEMU, but the page bytes are guest data
    and a garbled stream must not crash, hang or invent events."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.broken = ""
        self.records = 0

    def feed(self, data: bytes) -> list[Record]:
        """Return the complete records in `data` appended to the kept tail (none once broken)."""
        if self.broken:
            return []
        self._buf += data
        out: list[Record] = []
        pos = 0
        buf = self._buf
        while len(buf) - pos >= HEADER.size:
            magic, code, flags, _r0, length, _r1, gpa, vaddr, time_ns = HEADER.unpack_from(buf, pos)
            problem = _check(magic, code, flags, length, gpa)
            if problem:
                self.broken = f"record {self.records}: {problem}"
                self._buf = bytearray()
                return out
            if len(buf) - pos < HEADER.size + length:
                break
            kind = KINDS[code]
            payload = bytes(buf[pos + HEADER.size:pos + HEADER.size + length])
            out.append(Record(kind, gpa, vaddr, time_ns, payload, bool(flags & 1) and length == PAGE_SIZE,
                              bool(flags & 2) and kind == "replay"))
            self.records += 1
            pos += HEADER.size + length
        del buf[:pos]
        return out

    def close(self) -> str:
        """Return why the stream ended badly ("" when it ended on a record boundary)."""
        if self.broken:
            return self.broken
        return f"truncated record ({len(self._buf)} bytes after record {self.records})" if self._buf else ""


def _check(magic: int, code: int, flags: int, length: int, gpa: int) -> str:
    if magic != MAGIC:
        return f"bad magic {magic:#x}"
    kind = KINDS.get(code)
    if kind is None:
        return f"unknown kind {code}"
    if flags & ~3:
        return f"unknown flags {flags:#x}"
    if length > MAX_PAYLOAD[kind]:
        return f"{kind} payload of {length} bytes (limit {MAX_PAYLOAD[kind]})"
    if kind in PAGE_KINDS and (length not in (0, PAGE_SIZE) or gpa % PAGE_SIZE or gpa >= MAX_GPA):
        return f"{kind} record with length {length} at gpa {gpa:#x}"
    if kind == "stats" and length != 64:
        return f"stats payload of {length} bytes"
    return ""


@dataclass(slots=True)
class PageEvent:
    """One executed page, identified: `verdict` known/unknown/kernel/vdso/boot/stale/unreadable/unverifiable."""

    kind: str  # first, written (executed after a store to it), replay (executed before the reader connected)
    gpa: int
    vaddr: int
    time: float
    verdict: str
    digest: str = ""
    images: list[dict[str, str]] = field(default_factory=list)
    cr3: list[int] = field(default_factory=list)  # roots (guest-physical) mapping gpa executable, user pages only
    note: str = ""

    @property
    def user(self) -> bool:
        return self.vaddr <= USER_TOP

    def to_dict(self) -> dict[str, Any]:
        """Return the event as JSON-ready values (addresses as hex strings)."""
        out: dict[str, Any] = {"kind": self.kind, "gpa": hex(self.gpa), "vaddr": hex(self.vaddr), "time": self.time,
                               "space": "user" if self.user else "kernel", "verdict": self.verdict,
                               "digest": self.digest}
        if self.images:
            out["images"] = self.images
        if self.cr3 or (self.verdict == "unknown" and self.user):
            out["cr3"] = [hex(c) for c in self.cr3]
        if self.note:
            out["note"] = self.note
        return out


class ArchEventStream:
    """Read the archevents plugin's socket and identify each executed page (reads RAM only, never pauses)."""

    def __init__(self, socket_path: Path, phys: PhysicalMemory | None, db: CodePageLookup | None, *,
                 levels: int = 4, attribute: bool = True, attribute_known: bool = False,
                 db_reason: str = "no code-page DB") -> None:
        self.socket_path = socket_path
        self.phys, self.db, self.levels, self.attribute = phys, db, levels, attribute
        self.attribute_known = attribute_known  # also name the roots of known pages (evaluation: who runs what)
        self.db_reason = db_reason
        self.parser = StreamParser()
        self.hello = ""
        self.plugin_stats: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        self.replay_done = False
        self.ended = ""
        self._sock: socket.socket | None = None
        self._queue: queue.Queue[list[Record]] = queue.Queue(maxsize=MAX_QUEUED)
        self._reader: threading.Thread | None = None
        self._closing = threading.Event()
        self._end_reason = ""
        self._owners: dict[int, list[int]] = {}  # gpa of an executable user page -> roots mapping it
        self._roots_at = 0.0
        self.ram_end = max((e for _, e in phys.ranges), default=0) if phys is not None else 0

    def connect(self, timeout: float = 10.0) -> None:
        """Connect to the plugin's socket (retrying until `timeout`: QEMU creates it at start-up)."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.socket_path))
                break
            except OSError as exc:
                sock.close()
                if time.monotonic() > deadline:
                    raise ConnectorError(f"cannot reach the archevents plugin at {self.socket_path} ({exc}); "
                                         "start the guest with `nephoscope lab up NAME --arch-events` "
                                         f"({TCG_ONLY})") from exc
                time.sleep(0.2)
        sock.settimeout(0.2)
        self._sock = sock

    def close(self) -> None:
        """Disconnect (the plugin keeps tracking pages; the next reader gets them as a replay)."""
        self._closing.set()
        if self._reader is not None:
            self._reader.join(timeout=5)
            self._reader = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _read_loop(self, sock: socket.socket) -> None:
        """Read the socket into the queue (its own thread: identification stalls never stall the guest's sends)."""
        while not self._closing.is_set():
            try:
                data = sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError as exc:
                self._end_reason = f"plugin socket error ({exc})"
                return
            if not data:
                tail = self.parser.close()
                self._end_reason = (f"{tail} at the end of the stream" if tail else
                                    "the plugin closed the stream (QEMU exited, or it dropped a reader stalled 5 s)")
                return
            records = self.parser.feed(data)
            while records and not self._closing.is_set():
                try:  # a full queue stops reading: the plugin's sends then wait (back-pressure, bounded memory)
                    self._queue.put(records, timeout=0.2)
                    break
                except queue.Full:
                    continue
            if self.parser.broken:
                self._end_reason = f"malformed stream: {self.parser.broken}"
                return
        tail = self.parser.close()
        self._end_reason = self._end_reason or tail

    def request_stats(self) -> None:
        """Ask the plugin for a stats record (arrives in the stream)."""
        if self._sock is not None:
            try:
                self._sock.sendall(b"s")
            except OSError as exc:
                self.ended = self.ended or f"plugin socket closed ({exc})"

    def iter_events(self, *, duration: float | None = None, should_stop: Callable[[], bool] = lambda: False,
                    replay: bool = True) -> Iterator[PageEvent]:
        """Yield identified page events until `duration` s, `should_stop()` or the end of the stream."""
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        if self._reader is None:
            self._reader = threading.Thread(target=self._read_loop, args=(self._sock,), daemon=True,
                                            name="archevents-reader")
            self._reader.start()
        end = time.monotonic() + duration if duration else None
        while not should_stop() and (end is None or time.monotonic() < end) and not self.ended:
            try:
                records = self._queue.get(timeout=0.2)
            except queue.Empty:
                if not self._reader.is_alive():  # drained after the reader stopped: the stream is over
                    self.ended = self._end_reason or "the plugin closed the stream"
                continue
            pages = []
            for rec in records:
                if rec.kind == "hello":
                    self.hello = rec.payload.decode("ascii", "replace").strip()[:200]
                elif rec.kind == "stats":
                    self.plugin_stats = rec.stats()
                elif rec.kind == "replay-done":
                    self.replay_done = True
                elif replay or rec.kind != "replay":
                    pages.append(rec)
            yield from self.identify(pages)

    def identify(self, records: Sequence[Record]) -> list[PageEvent]:
        """Identify page records against the code-page DB (one batched lookup); attribute unknown user pages."""
        pages: list[tuple[Record, bytes | None]] = [(r, self._page_bytes(r)) for r in records]
        digests = [page_digest(b) if b is not None else b"" for _, b in pages]
        wanted = [d for (r, b), d in zip(pages, digests, strict=True) if b is not None and r.vaddr <= USER_TOP]
        hits = iter(self.db.lookup_digests(wanted) if self.db is not None and wanted else [])
        out = []
        for (rec, data), digest in zip(pages, digests, strict=True):
            ev = PageEvent(rec.kind, rec.gpa, rec.vaddr, rec.time_ns / 1e9, "unknown", digest.hex())
            if data is None:
                ev.verdict, ev.note = "unreadable", "page bytes neither in the record nor readable from RAM"
            elif rec.vaddr > USER_TOP:
                ev.verdict, ev.note = "kernel", KERNEL_REASON + "; the arch scan's kernel check covers it"
            elif self.db is None:
                ev.verdict, ev.note = "unverifiable", self.db_reason
            else:
                found = next(hits)
                if found:
                    ev.verdict = "known"
                    seen: dict[tuple[str, str, str], None] = {}
                    for h in found:
                        seen.setdefault((h.path, h.package, h.version), None)
                    ev.images = [{"path": p, "package": k, "version": v} for p, k, v in list(seen)[:MAX_IMAGES]]
                    if self.attribute_known:
                        ev.cr3 = self._attribute(rec.gpa, rec.vaddr)
                elif self._is_vdso(rec, data):
                    ev.verdict, ev.note = "vdso", "the kernel's vDSO (arch scans check it against the kernel package)"
                elif rec.vaddr & ~(PAGE_SIZE - 1) == rec.gpa:
                    ev.verdict, ev.note = "boot", BOOT_NOTE
                elif self.attribute or rec.written_since:
                    ev.cr3 = self._attribute(rec.gpa, rec.vaddr)
                    if not ev.cr3 and rec.written_since:
                        ev.verdict, ev.note = "stale", STALE_NOTE
                    elif not ev.cr3:
                        ev.note = "no address space in RAM maps it now (the process may have exited)"
            self.counts[ev.verdict] = self.counts.get(ev.verdict, 0) + 1
            out.append(ev)
        return out

    def _page_bytes(self, rec: Record) -> bytes | None:
        if rec.has_bytes:
            return rec.payload
        if self.phys is None:
            return None
        try:  # the plugin sent no bytes (bytes=off): read them now, after the fact
            data = self.phys.read(rec.gpa, PAGE_SIZE)
        except (MemoryAccessError, GuestDataError):
            return None
        return data if len(data) == PAGE_SIZE else None

    def _is_vdso(self, rec: Record, data: bytes) -> bool:
        """Return whether the page is (in) the kernel's vDSO image: its ELF header names linux-vdso.so.1."""
        if data[:4] == b"\x7fELF":
            return VDSO_SONAME in data
        if self.phys is None or rec.gpa < PAGE_SIZE:
            return False
        try:  # the vDSO's second page: its first page is the one before, physically (kernel .rodata)
            prev = self.phys.read(rec.gpa - PAGE_SIZE, PAGE_SIZE)
        except (MemoryAccessError, GuestDataError):
            return False
        return prev[:4] == b"\x7fELF" and VDSO_SONAME in prev

    def _attribute(self, gpa: int, vaddr: int) -> list[int]:
        """Return the roots whose user tables map `gpa` executable (any vaddr: shared code sits at different
        addresses per process), rebuilding the reverse map of RAM's roots when it has not got `gpa` (rate-limited)."""
        found = self._owners.get(gpa, [])
        if not found and self.phys is not None and time.monotonic() - self._roots_at > 1.0 / MAX_ROOT_SCANS_PER_S:
            self._rescan()
            found = self._owners.get(gpa, [])
        return list(found)

    def _rescan(self) -> None:
        """Map every executable user page of every root found in RAM to its roots (bounded by one Budget)."""
        assert self.phys is not None
        self._roots_at = time.monotonic()
        owners: dict[int, list[int]] = {}
        budget = Budget(*SCAN_BUDGET)
        try:
            roots = scan_roots(self.phys).process_roots[:MAX_ROOTS]
        except (MemoryAccessError, GuestDataError, ValueError):
            roots = []
        for root in roots:
            asp = AddressSpace(self.phys, root.user_gpa, self.levels)
            for m in asp.iter_mappings(user_only=True, exec_only=True, end=USER_TOP + PAGE_SIZE, budget=budget):
                for off in range(0, min(m.size, MAX_LARGE), PAGE_SIZE):
                    roots_of = owners.setdefault(m.gpa + off, [])
                    if root.gpa not in roots_of:
                        roots_of.append(root.gpa)
        self._owners = owners
