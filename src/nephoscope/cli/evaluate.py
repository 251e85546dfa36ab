"""`nephoscope evaluate`: the comparison table of the introspection methods, with measured numbers."""

from __future__ import annotations

from pathlib import Path

import typer

from nephoscope.cli.render import console, emit_json, fail, progress
from nephoscope.core.errors import NephoscopeError
from nephoscope.service.evaluate import evaluate as run_evaluation
from nephoscope.service.evaluate_render import chart, markdown
from nephoscope.service.methods import default_methods


def evaluate(
    methods: str = typer.Option("", "--methods", "-m", help="comma-separated methods (default: all but trap, "
                                "plus driver and arch-events: the TCG plugin's event stream)"),
    profiles: str = typer.Option("clean,tampered", "--profiles", help="lab profiles to boot and score"),
    out: Path = typer.Option(Path("evaluation"), "--out", "-o", help="directory for evaluation.md and .png"),
    slowdown: bool = typer.Option(True, "--slowdown/--no-slowdown", help="measure guest slowdown (slow)"),
    keep: bool = typer.Option(False, "--keep", help="leave the eval-* guests running"),
    sync_kb: bool | None = typer.Option(None, "--sync-kb/--no-sync-kb", help="fill the KB from each guest "
                                        "(`kb sync`) before scoring it (default: for disk profiles only)"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Run every method on the clean and tampered lab guests; write Markdown and a PNG chart."""
    chosen = [m.strip() for m in methods.split(",") if m.strip()] or [*default_methods(), "driver", "arch-events"]
    try:
        with progress("evaluate", quiet=json_out) as log:
            scores = run_evaluation(chosen, tuple(p.strip() for p in profiles.split(",") if p.strip()),
                                    slowdown=slowdown, keep=keep, sync_kb=sync_kb,
                                    progress=log)
    except NephoscopeError as exc:
        fail(exc)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(scores)
    (out / "evaluation.md").write_text(text)
    chart(scores, out / "evaluation.png")
    if json_out:
        emit_json([s.to_dict() for s in scores])
    else:
        console.print(text)
        console.print(f"written: {out / 'evaluation.md'}, {out / 'evaluation.png'}")
