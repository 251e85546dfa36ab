"""Check the import rule: a layer imports only layers below it, and no module imports another's private names.

Run `python -m nephoscope.devtools.layers` (exit 1 and one line per violation when the rule is broken).
The ranks follow the data flow in docs/architecture.md: connector → memory → kernel model → knowledge →
methods → analysis → store → response → lab → service → fleet (server and sensor) → faces. Packages of
equal rank (the faces) may not import each other.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = "nephoscope"
RANKS: dict[str, int] = {
    "core": 0, "hypervisor": 1, "memory": 2, "os": 3, "knowledge": 4, "introspect": 5, "analysis": 6,
    "store": 7, "response": 8, "lab": 9, "service": 10, "fleet": 11, "api": 12, "web": 12, "cli": 12,
    "devtools": 13,
}
TOP_LEVEL = {"__init__", "__main__"}  # nephoscope/__init__.py: the version only


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken rule: where, what was imported, why it is not allowed."""

    path: Path
    line: int
    imported: str
    why: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: imports {self.imported}: {self.why}"


def _package_of(module: str) -> str | None:
    """Return the layer (first component below `nephoscope`) of a dotted module name, or None."""
    parts = module.split(".")
    if parts[0] != ROOT or len(parts) < 2:
        return None
    return parts[1]


def _module_name(src: Path, path: Path) -> str:
    rel = path.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """Return the absolute module an ImportFrom names (relative imports resolved against `module`)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _check_layer(module: str, imported: str) -> str | None:
    """Return why `module` may not import `imported`, or None when the layer rule allows it."""
    mine, theirs = _package_of(module), _package_of(imported)
    if mine is None or theirs is None or mine == theirs or theirs in TOP_LEVEL:
        return None
    if mine in TOP_LEVEL:
        return None
    if mine not in RANKS:
        return f"package {mine!r} has no rank in nephoscope.devtools.layers.RANKS (add it)"
    if theirs not in RANKS:
        return f"package {theirs!r} has no rank in nephoscope.devtools.layers.RANKS (add it)"
    if RANKS[theirs] > RANKS[mine]:
        return f"{mine} (rank {RANKS[mine]}) must not import the higher layer {theirs} (rank {RANKS[theirs]})"
    if RANKS[theirs] == RANKS[mine]:
        return f"{mine} and {theirs} are peers (rank {RANKS[mine]}) and must not import each other"
    return None


def iter_violations(src: Path) -> Iterator[Violation]:
    """Yield every violation of the import rule in the package under `src` (the `src/` directory)."""
    for path in sorted((src / ROOT).rglob("*.py")):
        module = _module_name(src, path)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        aliases: dict[str, str] = {}  # local name -> nephoscope module it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(ROOT + "."):
                        why = _check_layer(module, alias.name)
                        if why:
                            yield Violation(path, node.lineno, alias.name, why)
                        aliases[alias.asname or alias.name] = alias.name
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, node, path.name == "__init__.py")
                if not target.startswith(ROOT):
                    continue
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    why = _check_layer(module, target)
                    if why:
                        yield Violation(path, node.lineno, full, why)
                    if alias.name.startswith("_") and not alias.name.startswith("__") and target != module:
                        yield Violation(path, node.lineno, full,
                                        f"{alias.name} is private to {target}; make it public or keep it there")
                    aliases[alias.asname or alias.name] = full
        for node in ast.walk(tree):  # module._private attribute access on an imported nephoscope module
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_") \
                    and not node.attr.startswith("__"):
                target = aliases.get(node.value.id)
                if target is not None and target != module:
                    yield Violation(path, node.lineno, f"{target}.{node.attr}",
                                    f"{node.attr} is private to {target}; make it public or keep it there")


def main(argv: list[str] | None = None) -> int:
    """Print every violation under the source tree (default: this installation's) and return 1 if any."""
    args = argv if argv is not None else sys.argv[1:]
    src = Path(args[0]) if args else Path(__file__).resolve().parents[2]
    found = list(iter_violations(src))
    for v in found:
        print(v)
    if found:
        print(f"{len(found)} layering violation(s); see docs/architecture.md")
        return 1
    print(f"layers ok ({src / ROOT})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
