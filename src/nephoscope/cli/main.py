"""The `nephoscope` command."""

from __future__ import annotations

import typer

from nephoscope import __version__
from nephoscope.cli import arch, demo, evaluate, inspect, kb, lab, report, scan, vms, vulns, watch

app = typer.Typer(
    help="nephoscope: see what runs inside virtual machines from the outside.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(lab.app, name="lab")
app.add_typer(kb.app, name="kb")
app.add_typer(vulns.app, name="vulns")
app.command("report")(report.report)
app.command("demo")(demo.demo)
app.command("scan")(scan.scan)
app.command("evaluate")(evaluate.evaluate)
app.command("history")(scan.history)
app.command("diff")(scan.diff)
app.command("arch")(arch.arch)
for _name in ("ps", "maps", "files", "modules", "kernel", "isf"):
    app.command(_name)(getattr(inspect, _name))
app.command("watch")(watch.watch)
app.command("vms")(vms.vms)


@app.command()
def version() -> None:
    """Print the nephoscope version."""
    print(__version__)


if __name__ == "__main__":
    app()
