"""The `nephoscope` command.

Start-up is kept short: a command's module (and the libraries it needs: numpy, yara, pyelftools, QMP,
python-debian, matplotlib, ...) is imported only when that command runs. `nephoscope --help` lists every
command from the static table below, so it imports none of them; a test checks the table against the
real commands' help.

Typer (0.29) validates every parameter of every invocation through a pydantic TypeAdapter: importing
pydantic and building the adapters costs ~45 ms, a quarter of a cached `nephoscope ps`. A command whose
parameters are all plain (str, int, bool, Path, or None of those; no callbacks, envvars, prompts or
checks) is therefore parsed by click's own parser from typer's declarations and called directly; a
test checks it gets exactly the arguments typer would pass. Anything else — `--help`, a usage error,
shell completion, a parameter of another kind — goes through typer unchanged.
"""

from __future__ import annotations

import errno
import importlib
import inspect
import os
import re
import sys
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import typer
import typer.core
import typer.main
import typer.models

from nephoscope import __version__

HELP = "nephoscope: see what runs inside virtual machines from the outside."

# name -> (module, attribute: a typer.Typer sub-app or a command function, one-line help), in help order
COMMANDS: dict[str, tuple[str, str, str]] = {
    "lab": ("nephoscope.cli.lab", "app", "Build and run lab guests: real QEMU VMs from real Debian packages."),
    "kb": ("nephoscope.cli.kb", "app", "The code-page knowledge base: executable pages of known binaries."),
    "vulns": ("nephoscope.cli.vulns", "app", "Vulnerability knowledge: which package versions fix which CVEs."),
    "report": ("nephoscope.cli.report", "report",
               "Write the report for a VM's owner from its latest scan: vulnerable, malicious, unverifiable."),
    "notices": ("nephoscope.cli.notices", "app",
                "Notices to a VM's owner: e-mail and signed webhook, once per state, delivery recorded."),
    "demo": ("nephoscope.cli.demo", "demo", "Build and boot a lab guest if needed, prepare the knowledge base, "
             "run every method, print the report."),
    "scan": ("nephoscope.cli.scan", "scan",
             "Run introspection methods on a VM, merge per process and binary, report findings and verdicts."),
    "evaluate": ("nephoscope.cli.evaluate", "evaluate",
                 "Run every method on the clean and tampered lab guests; write Markdown and a PNG chart."),
    "history": ("nephoscope.cli.scan", "history", "List stored scans, newest first."),
    "diff": ("nephoscope.cli.scan", "diff",
             "Show what changed between two scans of a VM (default: the last two that obtained anything)."),
    "arch": ("nephoscope.cli.arch", "arch",
             "Find every page-table root, hash every executable page and identify it (no OS knowledge)."),
    "ps": ("nephoscope.cli.inspect", "ps", "List processes from the kernel's task list, cross-checked against the "
           "PID table (each view's completeness)."),
    "maps": ("nephoscope.cli.inspect", "maps",
             "List a process's memory mappings (like /proc/PID/maps), from the kernel's VMA tree."),
    "files": ("nephoscope.cli.inspect", "files", "List a process's open file descriptors."),
    "net": ("nephoscope.cli.net", "net", "List every socket of every process (like netstat -tuanpx) from kernel "
            "memory, with code identity and findings."),
    "scripts": ("nephoscope.cli.scripts", "scripts", "List what every interpreter process runs: entry script, "
                "stacks and script files, identified by hash."),
    "modules": ("nephoscope.cli.inspect", "modules", "List loaded kernel modules from the kernel's module list."),
    "kernel": ("nephoscope.cli.inspect", "kernel",
               "Show what was detected about the guest kernel, and how (stage by stage, with timings)."),
    "isf": ("nephoscope.cli.inspect", "isf",
            "Write a Volatility 3 symbol table (ISF) from the guest's own BTF and kallsyms."),
    "watch": ("nephoscope.cli.watch", "watch", "Trap exec/exit/module-load in the guest kernel and stream each "
              "event (pauses the VM per event)."),
    "filters": ("nephoscope.cli.filters", "app",
                "Vulnerability-specific filters on a VM's network path: nftables on its tap, haproxy for L7."),
    "vms": ("nephoscope.cli.vms", "vms",
            "List libvirt domains, other QEMU processes and lab guests with the methods each supports."),
    "server": ("nephoscope.cli.server", "server",
               "Run the fleet server: migrate the DB, create an operator token if none, serve API and dashboard."),
    "sensor": ("nephoscope.cli.sensor", "sensor",
               "Sweep this host's VMs by policy, push each scan (idempotent), buffer while the server is away."),
}


def load_command(name: str) -> Any:
    """Import command `name`'s module and return its click command (a group for sub-apps)."""
    module, attr, _help = COMMANDS[name]
    obj = getattr(importlib.import_module(module), attr)
    if isinstance(obj, typer.Typer):
        command = typer.main.get_group(obj)
    else:
        single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
        single.command(name)(obj)
        command = typer.main.get_command(single)
    command.name = name
    return command


_PLAIN = (str, int, bool, Path)
_INT = re.compile(r"[+-]?[0-9]+")
_FREE_ATTRS = {"default", "param_decls", "help", "metavar", "show_default", "rich_help_panel", "hidden"}


def _plain_type(annotation: Any) -> type | None:
    """Return str/int/bool/Path for `X` or `X | None`, else None."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if annotation in _PLAIN:
        return annotation  # type: ignore[no-any-return]
    if len(args) == 1 and args[0] in _PLAIN and type(None) in typing.get_args(annotation):
        return args[0]  # type: ignore[no-any-return]
    return None


def _coerce(raw: Any, kind: type) -> tuple[bool, Any]:
    """Return (ok, value): a raw click value as typer would pass it, or (False, None) when unsure."""
    if kind is bool:
        return isinstance(raw, bool), raw
    if not isinstance(raw, str) or not raw or (raw.startswith("-") and kind is not int):
        return False, None
    if kind is int:
        return (True, int(raw)) if _INT.fullmatch(raw) else (False, None)
    return True, Path(raw) if kind is Path else raw


def fast_args(name: str, argv: list[str]) -> tuple[Callable[..., Any], dict[str, Any]] | None:
    """Return (function, keyword arguments) of command `name` for `argv` (click's parser, no pydantic), or None."""
    if name not in COMMANDS or any(k.endswith("_COMPLETE") for k in os.environ):
        return None
    module, attr, _help = COMMANDS[name]
    fn = getattr(importlib.import_module(module), attr)
    if isinstance(fn, typer.Typer):
        return None
    command = load_command(name)
    try:
        hints = typing.get_type_hints(fn)
        signature = inspect.signature(fn).parameters
        opts, extra, _order = command.make_parser(typer.core._click.Context(command, info_name=name)).parse_args(
            list(argv))
    except (typer.core._click.ClickException, NameError, TypeError):
        return None
    if extra or opts.get("help"):
        return None
    kwargs: dict[str, Any] = {}
    for param in command.params:
        if param.name == "help" and param.name not in signature:
            continue
        declared = signature.get(param.name or "")
        info = declared.default if declared is not None else None
        kind = _plain_type(hints.get(param.name or ""))
        if not isinstance(info, typer.models.ParameterInfo) or kind is None or param.nargs != 1 \
                or getattr(param, "multiple", False) or getattr(param, "count", False):
            return None
        fresh = vars(type(info)())
        if any(v != fresh.get(k) for k, v in vars(info).items() if k not in _FREE_ATTRS):
            return None  # a callback, envvar, prompt, range or path check: typer's job
        raw = opts.get(param.name)
        if raw is None:
            if info.default is ... or not (info.default is None or isinstance(info.default, kind)):
                return None
            kwargs[param.name] = info.default  # type: ignore[index]
            continue
        ok, value = _coerce(raw, kind)
        if not ok:
            return None
        kwargs[param.name] = value  # type: ignore[index]
    return fn, kwargs


def _run(fn: Callable[..., Any], kwargs: dict[str, Any], context: Callable[[], Any] | None = None) -> None:
    """Call a command and exit as typer's standalone mode does (interrupts, closed pipes, click exits).

    `context()` gives the click context a usage error raised by the command is reported in.
    """
    import typer.exceptions

    click = typer.core._click
    try:
        fn(**kwargs)
    except KeyboardInterrupt:
        sys.exit(130)
    except EOFError:
        print(file=sys.stderr)
        print("Aborted!", file=sys.stderr)
        sys.exit(1)
    except typer.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.exceptions.Abort:
        print("Aborted!", file=sys.stderr)
        sys.exit(1)
    except click.ClickException as exc:
        if context is not None and getattr(exc, "ctx", False) is None:
            exc.ctx = context()  # type: ignore[attr-defined]  # as click's invoke adds it: the usage line
        from typer import rich_utils  # typer's own error panel

        rich_utils.rich_format_error(exc)
        sys.exit(exc.exit_code)
    except OSError as exc:
        if exc.errno != errno.EPIPE:
            raise
        sys.stdout = click.utils.PacifyFlushWrapper(sys.stdout)  # type: ignore[assignment]
        sys.stderr = click.utils.PacifyFlushWrapper(sys.stderr)  # type: ignore[assignment]
        sys.exit(1)
    sys.exit(0)


class _LazyCommands(Mapping[str, Any]):
    """The group's command mapping: names are known up front, a command is built on first lookup."""

    def __init__(self, eager: Mapping[str, Any]) -> None:
        self._loaded: dict[str, Any] = dict(eager)
        self._names = list(COMMANDS) + [n for n in eager if n not in COMMANDS]

    def __getitem__(self, name: str) -> Any:
        if name not in self._loaded:
            if name not in COMMANDS:
                raise KeyError(name)
            self._loaded[name] = load_command(name)
        return self._loaded[name]

    def __setitem__(self, name: str, command: Any) -> None:  # click's add_command
        self._loaded[name] = command
        if name not in self._names:
            self._names.append(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class LazyGroup(typer.core.TyperGroup):
    """The top-level group: imports a command's module only when the command is looked up to run."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        self.commands = _LazyCommands(self.commands)  # type: ignore[assignment]

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        """Run the command line; plain commands skip typer's pydantic validation (see the module docstring)."""
        argv = list(sys.argv[1:] if args is None else args)
        if standalone_mode and argv:
            fast = fast_args(argv[0], argv[1:])
            if fast is not None:
                name = argv[0]
                prog = prog_name or os.path.basename(sys.argv[0]) or "nephoscope"

                def context() -> Any:
                    parent = typer.core._click.Context(self, info_name=prog)
                    return typer.core._click.Context(self.commands[name], info_name=name, parent=parent)

                _run(*fast, context)
        return super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                            standalone_mode=standalone_mode, **extra)

    def list_commands(self, ctx: Any) -> list[str]:
        """Return every command name, in help order, without importing any command."""
        return list(self.commands)

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        """Print the help (to stdout, as rich would) before typer's no-arguments error, which prints nothing."""
        if not args and self.no_args_is_help and not ctx.resilient_parsing:
            typer.echo(ctx.get_help())
        return super().parse_args(ctx, args)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        """Write the top-level help in click's plain layout (rich's help renderer costs ~0.1 s to import)."""
        typer.core._click.Command.format_help(self, ctx, formatter)

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        """Write the command list from the static table (no command module is imported)."""
        rows = [(name, COMMANDS[name][2] if name in COMMANDS else self.commands[name].get_short_help_str(80))
                for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


app = typer.Typer(help=HELP, no_args_is_help=True, pretty_exceptions_enable=False, cls=LazyGroup)


@app.callback()
def _main() -> None:
    """nephoscope: see what runs inside virtual machines from the outside."""


@app.command()
def version() -> None:
    """Print the nephoscope version."""
    print(__version__)


if __name__ == "__main__":
    app()
