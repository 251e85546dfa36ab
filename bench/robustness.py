"""Benchmark hostile input: inputs per second through each parser and the worst-case time per input.

For each parser the baseline is the same parser on its valid seed, measured in the same run; the
figures are mutated inputs per second, the ratio of the mean mutated-input time to the seed's time,
and the worst single input (as a ratio too: a parser whose worst case is 1000x its seed has a
slow path an attacker can aim for). Parsers: the BTF reader (the real vmlinux BTF of a dump when
given, else a synthetic blob), ELF page hashing (host binaries), ELF-core and LiME headers, page-table
walks over garbage, and — with --dump — the whole kernel model (detection + process walk) on corrupted
copies of a real guest dump.

Usage: .venv/bin/python bench/robustness.py [--dump DUMP.elf] [--inputs 300] [--dumps 6] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from nephoscope.core.errors import NephoscopeError
from nephoscope.knowledge.elfpages import exec_pages
from nephoscope.memory.paging import AddressSpace, Budget
from nephoscope.memory.physical import BufferMemory, open_memory
from nephoscope.os.btf.reader import Btf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))


def mutate(rng: random.Random, seed: bytes, header: int) -> bytes:
    """Return `seed` with byte flips, extreme header fields and maybe a truncation."""
    data = bytearray(seed)
    for _ in range(rng.randint(0, 8)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    for _ in range(rng.randint(0, 3)):
        width = rng.choice((2, 4, 8))
        pos = rng.randrange(max(1, min(header, len(data)) - width))
        data[pos:pos + width] = rng.choice((0, 1, (1 << (8 * width)) - 1, 1 << (8 * width - 1))).to_bytes(width,
                                                                                                        "little")
    if rng.random() < 0.3:
        data = data[: rng.randrange(len(data) + 1)]
    return bytes(data)


def timed(fn: Callable[[], object]) -> tuple[float, str]:
    """Return (seconds, outcome) of one input: ok, the NephoscopeError class, or CRASH and the exception."""
    t = time.perf_counter()
    try:
        fn()
        outcome = "ok"
    except NephoscopeError as exc:
        outcome = type(exc).__name__
    except Exception as exc:  # the bench reports crashes instead of stopping at the first
        outcome = f"CRASH {type(exc).__name__}: {exc}"
    return time.perf_counter() - t, outcome


def run_parser(name: str, seed: bytes, header: int, use: Callable[[bytes], object], n: int,
               rng: random.Random) -> dict[str, object]:
    """Measure `use` on the seed (baseline) and on `n` mutations; return the figures."""
    base = min(timed(lambda: use(seed))[0] for _ in range(3))
    times, outcomes = [], {}
    crashes = []
    for _ in range(n):
        blob = mutate(rng, seed, header)
        seconds, outcome = timed(lambda b=blob: use(b))
        times.append(seconds)
        key = outcome.split(":")[0]
        outcomes[key] = outcomes.get(key, 0) + 1
        if outcome.startswith("CRASH"):
            crashes.append(outcome)
    total = sum(times)
    row = {"parser": name, "inputs": n, "inputs_per_s": n / total if total else float("inf"),
           "seed_ms": 1000 * base, "mean_ratio": (total / n) / base if base else 0.0,
           "worst_ms": 1000 * max(times), "worst_ratio": max(times) / base if base else 0.0,
           "outcomes": outcomes, "crashes": crashes[:3]}
    return row


def _elf_core(segments: int = 3) -> bytes:
    phoff, phnum = 64, segments
    data_off = phoff + 56 * phnum
    head = bytearray(b"\x7fELF\x02\x01\x01" + bytes(9))
    head += struct.pack("<HHIQQQIHHHHHH", 4, 62, 1, 0, phoff, 0, 0, 64, 56, phnum, 0, 0, 0)
    for i in range(segments):
        head += struct.pack("<IIQQQQQQ", 1, 7, data_off + i * 4096, 0, i * 0x100000, 4096, 4096, 0)
    return bytes(head) + bytes(4096 * segments)


def _lime() -> bytes:
    return b"".join(struct.pack("<IIQQQ", 0x4C694D45, 1, s, s + 4095, 0) + bytes(4096) for s in (0, 0x100000))


def _open_image(tmp: Path, suffix: str) -> Callable[[bytes], object]:
    def use(blob: bytes) -> None:
        path = tmp / f"img{suffix}"
        path.write_bytes(blob)
        mem = open_memory(path)
        try:
            for start, end in mem.ranges[:64]:
                mem.read(start, min(64, end - start))
        finally:
            mem.close()
    return use


def _walk(blob: bytes) -> None:
    ram = BufferMemory(blob)
    space = AddressSpace(ram, 0, 4)
    for _ in space.iter_mappings(budget=Budget(4096, 1 << 16)):
        pass


def _page_tables(rng: random.Random) -> bytes:
    ram = bytearray(64 * 4096)
    for table in range(8):
        for slot in rng.sample(range(512), 24):
            struct.pack_into("<Q", ram, table * 4096 + slot * 8, (rng.randrange(64) << 12) | 0x67)
    return bytes(ram)


def _kernel_model(path: Path) -> None:
    from nephoscope.os.linux.model import LinuxKernel

    phys = open_memory(path)
    try:
        k = LinuxKernel.open(phys)
        k.processes()
        k.hidden_processes()
    finally:
        phys.close()


def _dump_rows(dump: Path, count: int, rng: random.Random) -> dict[str, object]:
    """Corrupt copies of a real dump in kernel data pages (random pages zeroed or filled with noise)."""
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as tmp:
        copy = Path(tmp) / "dump.elf"
        shutil.copyfile(dump, copy)
        base = min(timed(lambda: _kernel_model(copy))[0] for _ in range(2))
        pristine = dump.read_bytes()
        size = len(pristine)
        times, outcomes = [], {}
        for _ in range(count):
            with copy.open("r+b") as fh:
                for _ in range(64):
                    pos = rng.randrange(4096, size - 4096) & ~0xFFF
                    fh.seek(pos)
                    fh.write(bytes(4096) if rng.random() < 0.5 else rng.randbytes(4096))
            seconds, outcome = timed(lambda: _kernel_model(copy))
            times.append(seconds)
            outcomes[outcome.split(":")[0]] = outcomes.get(outcome.split(":")[0], 0) + 1
            copy.write_bytes(pristine)
    total = sum(times)
    return {"parser": "kernel model (64 corrupted pages)", "inputs": count, "inputs_per_s": count / total,
            "seed_ms": 1000 * base, "mean_ratio": (total / count) / base, "worst_ms": 1000 * max(times),
            "worst_ratio": max(times) / base, "outcomes": outcomes, "crashes": []}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dump", type=Path, help="a real guest dump (ELF core or raw) for the BTF seed and the model")
    ap.add_argument("--inputs", type=int, default=300)
    ap.add_argument("--dumps", type=int, default=6, help="corrupted dump copies through the kernel model")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    from test_fuzz_parsers import BTF_SEED  # the synthetic seed the fuzz suite uses

    btf_seed = BTF_SEED
    if args.dump:
        from nephoscope.os.btf.locate import get_vmlinux_btf

        phys = open_memory(args.dump)
        located = get_vmlinux_btf(phys)
        btf_seed = phys.read(located.gpa, located.size)
        phys.close()
    bash = Path("/usr/bin/bash")
    elf_seed = (bash if bash.exists() else Path(sys.executable)).read_bytes()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)

        def btf_use(blob: bytes) -> None:
            btf = Btf.parse(blob)
            btf.find_struct("task_struct")

        rows.append(run_parser("BTF reader" + (" (vmlinux)" if args.dump else ""), btf_seed, 24, btf_use,
                               args.inputs if not args.dump else max(20, args.inputs // 10), rng))
        rows.append(run_parser("ELF page hashing", elf_seed, 64 + 56 * 13, exec_pages, args.inputs, rng))
        rows.append(run_parser("ELF core headers", _elf_core(), 64 + 56 * 3, _open_image(t, ".elf"), args.inputs, rng))
        rows.append(run_parser("LiME headers", _lime(), 32, _open_image(t, ".lime"), args.inputs, rng))
        rows.append(run_parser("page-table walk", _page_tables(rng), 4096 * 8, _walk, args.inputs, rng))
    if args.dump:
        rows.append(_dump_rows(args.dump, args.dumps, rng))
    print(f"{'parser':36} {'inputs':>6} {'inputs/s':>10} {'seed ms':>9} {'mean x':>8} {'worst ms':>9} "
          f"{'worst x':>8}  outcomes")
    for r in rows:
        print(f"{r['parser']:36} {r['inputs']:>6} {r['inputs_per_s']:>10.0f} {r['seed_ms']:>9.2f} "
              f"{r['mean_ratio']:>8.2f} {r['worst_ms']:>9.2f} {r['worst_ratio']:>8.1f}  {r['outcomes']}")
        for c in r["crashes"]:
            print(f"    {c}")
    if any(r["crashes"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
