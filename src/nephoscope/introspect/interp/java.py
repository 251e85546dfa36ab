"""Describe what a JVM (OpenJDK's `java` launcher) runs: main class or jar, class path, jars, thread names.

Sources, all outside the guest's own reporting: the launcher's command line (the kernel's view of the
argument area), the process's open files and mappings (kernel walkers), each jar's manifest read from
the guest page cache (a jar is a zip: the central directory and the manifest entry must be cached, and
zipfile checks the entry's CRC-32), and the threads' task comm: HotSpot names every thread it starts
with pthread_setname_np, which the kernel keeps truncated to 15 bytes, so a name is a prefix of the Java
thread name (threads the JVM did not name, like the launcher's primordial one, keep "java").

Nothing here reads JVM heap objects: no offsets, nothing to guess. Guest data is hostile: every input is
bounded, a zip that does not parse or a manifest on pages the cache lacks is unverifiable with the
reason. Nothing here pauses the VM.
"""

from __future__ import annotations

import io
import posixpath
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from nephoscope.core.errors import GuestDataError, MemoryAccessError

if TYPE_CHECKING:
    from nephoscope.introspect.interp import InterpResult, ProcessContext
    from nephoscope.os.linux.model import LinuxKernel
    from nephoscope.os.linux.walkers import Task

_BAD = (MemoryAccessError, GuestDataError)
PAGE = 4096
MAX_MANIFEST = 1 << 20
MAX_CLASS_PATH = 4096  # entries
MAX_JARS = 4096
# launcher options that take the next argument (java -help, JDK 17 src/java.base/share/native/libjli/java.c)
ARG_OPTIONS = frozenset({
    "-cp", "-classpath", "--class-path", "-p", "--module-path", "--upgrade-module-path", "--add-modules",
    "--limit-modules", "--add-reads", "--add-exports", "--add-opens", "--patch-module", "--describe-module",
    "-d", "--enable-native-access", "--source",
})
VERSION_KEYS = ("Implementation-Version", "Bundle-Version", "Specification-Version")


@dataclass(frozen=True, slots=True)
class Launch:
    """What the java command line asks for."""

    main_class: str = ""
    jar: str = ""  # -jar FILE
    module: str = ""  # -m / --module MODULE[/CLASS]
    class_path: tuple[str, ...] = ()
    source: str = ""  # a single source file launched directly (JEP 330)
    args: tuple[str, ...] = ()  # the application's arguments
    problem: str = ""


@dataclass(frozen=True, slots=True)
class JarInfo:
    """One jar of a JVM: how it is used and what its manifest says (read from the guest page cache)."""

    path: str
    open_fd: bool
    mapped: bool
    on_class_path: bool
    title: str = ""
    version: str = ""
    vendor: str = ""
    main_class: str = ""
    verified: bool = False  # the manifest was read whole from cached pages and its CRC matched
    problem: str = ""  # why the manifest is unverifiable


@dataclass(slots=True)
class JvmState:
    """What one JVM process runs."""

    launch: Launch
    jars: list[JarInfo] = field(default_factory=list)
    threads: list[tuple[int, str]] = field(default_factory=list)  # (tid, comm: the Java name, <=15 bytes)
    main_class: str = ""  # from the command line, else the -jar file's Main-Class
    complete: bool = True
    problem: str = ""

    def fail(self, problem: str) -> JvmState:
        """Mark the state incomplete (keeping the first problem) and return it."""
        if self.complete:
            self.complete, self.problem = False, problem
        return self

    def to_json(self) -> dict[str, object]:
        """Return the state as JSON-ready data."""
        return {"launch": asdict(self.launch), "main_class": self.main_class,
                "jars": [asdict(j) for j in self.jars], "threads": [list(t) for t in self.threads],
                "complete": self.complete, "problem": self.problem}


def is_java(exe: str) -> bool:
    """Return whether `exe` is an OpenJDK `java` launcher (Debian: /usr/lib/jvm/<jdk>/bin/java)."""
    return posixpath.basename(exe or "") == "java" and "/jvm/" in (exe or "")


def parse_launch(argv: Sequence[str]) -> Launch:
    """Return what a java command line runs (options as the JDK 17 launcher reads them)."""
    cp: tuple[str, ...] = ()
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg in ("-cp", "-classpath", "--class-path"):
            if i + 1 >= len(argv):
                return Launch(problem=f"{arg} without a value")
            cp = split_class_path(argv[i + 1])
            i += 2
            continue
        for opt in ("--class-path=",):
            if arg.startswith(opt):
                cp = split_class_path(arg[len(opt):])
        if arg == "-jar":
            if i + 1 >= len(argv):
                return Launch(problem="-jar without a file")
            # with -jar the class path is the jar (and its manifest's Class-Path); -cp is ignored
            return Launch(jar=argv[i + 1], class_path=(argv[i + 1],), args=tuple(argv[i + 2:]))
        if arg in ("-m", "--module"):
            if i + 1 >= len(argv):
                return Launch(problem=f"{arg} without a module")
            return Launch(module=argv[i + 1], class_path=cp, args=tuple(argv[i + 2:]))
        if arg.startswith("--module="):
            return Launch(module=arg.split("=", 1)[1], class_path=cp, args=tuple(argv[i + 1:]))
        if arg.startswith("@"):
            return Launch(class_path=cp, problem=f"options in an argument file ({arg}) are not read")
        if arg in ARG_OPTIONS:
            i += 2
            continue
        if arg.startswith("-"):
            i += 1
            continue
        if arg.endswith(".java"):
            return Launch(source=arg, class_path=cp, args=tuple(argv[i + 1:]))
        return Launch(main_class=arg, class_path=cp, args=tuple(argv[i + 1:]))
    return Launch(class_path=cp, problem="no main class, -jar or module on the command line")


def split_class_path(value: str) -> tuple[str, ...]:
    """Return the entries of a class path value (":"-separated on Linux; empty entries dropped)."""
    parts = [p for p in value.split(":") if p]
    if len(parts) > MAX_CLASS_PATH:
        parts = parts[:MAX_CLASS_PATH]
    return tuple(parts)


def parse_manifest(text: str) -> dict[str, str]:
    """Return the main section of a JAR manifest (continuation lines start with one space)."""
    out: dict[str, str] = {}
    last = ""
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line:
            if out:
                break  # the main section ends at the first blank line
            continue
        if line.startswith(" ") and last:
            out[last] += line[1:]
            continue
        key, sep, value = line.partition(":")
        if sep:
            last = key.strip()
            out[last] = value.strip()
    return out


def read_manifest(data: bytes, absent: Sequence[int], size: int) -> tuple[dict[str, str], str]:
    """Return (manifest main section, problem) of a jar's bytes from the page cache.

    `absent`: page indices not in the cache (zero-filled in `data`). The manifest counts only if the
    central directory and the manifest's local entry lie on cached pages and its CRC-32 matches.
    """
    if len(data) < size:
        return {}, f"the jar is {size} bytes, {len(data)} read (larger than the read cap)"
    missing = set(absent)

    def cached(start: int, end: int) -> bool:
        return not any(p in missing for p in range(start // PAGE, (max(end, start + 1) - 1) // PAGE + 1))

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as jar:
            start_dir = int(getattr(jar, "start_dir", 0))
            if not cached(start_dir, len(data)):
                return {}, "the jar's central directory is not (wholly) in the page cache"
            try:
                info = jar.getinfo("META-INF/MANIFEST.MF")
            except KeyError:
                return {}, "the jar has no META-INF/MANIFEST.MF"
            if info.file_size > MAX_MANIFEST or info.compress_size > MAX_MANIFEST:
                return {}, f"the manifest claims {info.file_size} bytes"
            local = info.header_offset
            head = data[local:local + 30]
            if len(head) < 30:
                return {}, "the manifest's local header lies outside the jar"
            name_len = int.from_bytes(head[26:28], "little")
            extra_len = int.from_bytes(head[28:30], "little")
            if not cached(local, local + 30 + name_len + extra_len + info.compress_size):
                return {}, "the manifest's pages are not in the page cache"
            raw = jar.read(info)  # checks the CRC-32
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, ValueError, EOFError, OSError) as exc:
        return {}, f"the jar does not parse as a zip ({exc})"
    return parse_manifest(raw.decode("utf-8", "replace")), ""


# read_file(file_gva) -> (data, absent page indices, size, problem) of the file's page-cache copy
ReadFile = Callable[[int], tuple[bytes, Sequence[int], int, str]]


def inspect_jvm(argv: Sequence[str], vmas: Sequence[object], open_files: Sequence[object],
                threads: Sequence[tuple[int, str]], read_file: ReadFile | None) -> JvmState:
    """Return the JVM state from its command line, mappings (walkers.Vma), open files (walkers.OpenFile), threads.

    `read_file(file_gva)` returns a file's page-cache copy (kernel gva of its struct file); None skips the
    manifests (they are then unverifiable). Never raises for guest data.
    """
    launch = parse_launch(argv)
    state = JvmState(launch=launch, threads=sorted(threads)[:1 << 14])
    if launch.problem:
        state.fail(launch.problem)
    jars: dict[str, dict[str, object]] = {}
    for f in open_files:
        path = str(getattr(f, "path", ""))
        if path.endswith(".jar"):
            jars.setdefault(path, {"file": getattr(f, "file_gva", 0)})["fd"] = True
    for v in vmas:
        path = str(getattr(v, "path", ""))
        if path.endswith(".jar"):
            jars.setdefault(path, {"file": getattr(v, "file_gva", 0)})["mapped"] = True
    cp = set(launch.class_path)
    for entry in launch.class_path:
        if entry.endswith(".jar"):
            jars.setdefault(entry, {})
    for path, how in sorted(jars.items())[:MAX_JARS]:
        manifest: dict[str, str] = {}
        problem = ""
        file_gva = int(how.get("file", 0) or 0)  # type: ignore[call-overload]
        if not file_gva:
            problem = "on the class path but not open or mapped: no file to read"
        elif read_file is None:
            problem = "the page cache was not read"
        else:
            try:
                data, absent, size, why = read_file(file_gva)
                manifest, problem = read_manifest(data, absent, size) if not why else ({}, why)
            except _BAD as exc:
                problem = f"the jar's page cache is unreadable ({exc})"
        version = next((manifest[k] for k in VERSION_KEYS if manifest.get(k)), "")
        state.jars.append(JarInfo(
            path, bool(how.get("fd")), bool(how.get("mapped")), path in cp or _on_class_path(path, cp),
            title=manifest.get("Implementation-Title", "") or manifest.get("Bundle-Name", ""), version=version,
            vendor=manifest.get("Implementation-Vendor", "") or manifest.get("Bundle-Vendor", ""),
            main_class=manifest.get("Main-Class", ""), verified=bool(manifest) and not problem, problem=problem))
    state.main_class = launch.main_class
    if launch.jar and not state.main_class:
        entry = next((j for j in state.jars if j.path == launch.jar or _same(j.path, launch.jar)), None)
        state.main_class = entry.main_class if entry else ""
    return state


def _same(path: str, entry: str) -> bool:
    """Return whether an open file's path is the class path `entry` (a relative entry: same tail)."""
    return path == entry or (not entry.startswith("/") and path.endswith("/" + entry.lstrip("./")))


def _on_class_path(path: str, cp: set[str]) -> bool:
    return any(_same(path, e) for e in cp)


MAX_JAR_BYTES = 32 << 20


def threads_of(k: LinuxKernel, task: Task) -> tuple[list[tuple[int, str]], str]:
    """Return ((tid, comm) of every thread of process `task`, problem) from its signal->thread_head list."""
    from nephoscope.os.linux import walkers

    try:
        signal = k.u64(task.gva + k.off["task_struct.signal"])
        group = walkers.walk_list(k, signal + k.off["signal_struct.thread_head"], k.off["task_struct.thread_node"],
                                  k.limits.max_threads, f"threads of pid {task.pid}")
    except _BAD as exc:
        return [], f"the thread list of pid {task.pid} is unreadable ({exc})"
    out, problem = [], group.problem
    for gva in group:
        try:
            t = walkers.read_task(k, gva, details=False)
        except _BAD as exc:
            problem = problem or f"thread 0x{gva:x} unreadable ({exc})"
            continue
        if t.tgid != task.pid:
            problem = problem or f"thread 0x{gva:x} belongs to tgid {t.tgid}, not {task.pid}"
            continue
        out.append((t.pid, t.comm))
    return out, problem


def read_process(k: LinuxKernel, task: Task, threads: Sequence[Task] | None = None,
                 vmas: Sequence[object] | None = None) -> JvmState | None:
    """Return the JVM state of `task` (a process), None if it is no JVM.

    `threads`: the guest's threads (default: the process's own thread list). Reads kernel structures and
    the page cache of the jars (kernel gvas); does not pause the VM.
    """
    if not is_java(task.exe or ""):
        return None
    from nephoscope.os.linux import pagecache

    def read_file(file_gva: int) -> tuple[bytes, Sequence[int], int, str]:
        c = pagecache.read_cached_file(k, file_gva, max_bytes=MAX_JAR_BYTES)
        return c.data, c.absent, c.size, c.problem

    problems = []
    if vmas is None:
        listing = k.vmas(task)
        vmas = listing.items
        if not listing.complete:
            problems.append(f"the mappings walk stopped early: {listing.problem}")
    opened = k.files(task)
    if not opened.complete:
        problems.append(f"the open files walk stopped early: {opened.problem}")
    if threads is None:
        own, why = threads_of(k, task)
        if why:
            problems.append(why)
    else:
        own = [(t.pid, t.comm) for t in threads if t.tgid == task.pid]
    state = inspect_jvm(task.cmdline or [], vmas, opened.items, own, read_file)
    if task.cmdline is None:
        state.fail("the command line is unreadable: " + "; ".join(task.notes))
    for problem in problems:
        state.fail(problem)
    if not own:
        state.fail("no thread of the process on the thread list")
    return state


def read_java(ctx: ProcessContext) -> InterpResult | None:
    """Return what the JVM of `ctx` runs as an interpreter result (the registry's reader; no pause)."""
    from nephoscope.core.records import Verdict
    from nephoscope.introspect.interp import InterpResult, InterpThread

    task = ctx.task
    state = read_process(ctx.kernel, task, vmas=ctx.vmas)
    if state is None:
        return None
    exe = task.exe or ""
    jdk = exe.split("/jvm/", 1)[-1].split("/", 1)[0] if "/jvm/" in exe else "unknown"
    if state.complete:
        verdict = Verdict.REPORTED
        reason = ("main class and class path from the command line, thread names from the kernel's task comm "
                  "(both settable by the process); jars from its file table, manifests from the page cache")
    else:
        verdict, reason = Verdict.UNVERIFIABLE, state.problem
    jars = [j.path for j in state.jars if j.open_fd or j.mapped]
    return InterpResult(task.pid, task.comm, "java", f"Java ({jdk})", verdict, reason,
                        entry=state.launch.jar or state.main_class or state.launch.module or state.launch.source,
                        threads=[InterpThread(0, tid, (), name) for tid, name in state.threads],
                        scripts=jars,
                        details={"binary": exe, "main_class": state.main_class,
                                 "class_path": list(state.launch.class_path),
                                 "jars": [asdict(j) for j in state.jars]})
