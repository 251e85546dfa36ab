"""The `nephoscope` command."""

from __future__ import annotations

import typer

from nephoscope import __version__
from nephoscope.cli import lab

app = typer.Typer(
    help="nephoscope: see what runs inside virtual machines from the outside.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(lab.app, name="lab")


@app.command()
def version() -> None:
    """Print the nephoscope version."""
    print(__version__)


if __name__ == "__main__":
    app()
