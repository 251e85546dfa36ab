"""`nephoscope server`: the fleet's central API, store and dashboard."""

from __future__ import annotations

import os
from pathlib import Path

import typer


def server(db: str = typer.Option("", "--db", help="Database URL (postgresql://... or sqlite:///FILE); "
                                  "default: NEPHOSCOPE_FLEET_DB, else an SQLite file in the cache"),
           listen: str = typer.Option("127.0.0.1", "--listen", help="Address to listen on"),
           port: int = typer.Option(8470, "--port", help="TCP port"),
           token_file: Path = typer.Option(Path("operator.token"), "--token-file",
                                           help="Where the first operator token goes (mode 600) when none exists"),
           kb: str = typer.Option("", "--kb", help="Code-page DB served to sensors (default: the local KB)"),
           vulns: str = typer.Option("", "--vulns", help="Vulnerability DB served to sensors "
                                     "(default: the local one, NEPHOSCOPE_VULNS or the cache's vulns.sqlite)"),
           migrate_only: bool = typer.Option(False, "--migrate-only", help="Apply migrations and exit")) -> None:
    """Run the fleet server: migrate the DB, create an operator token if none, serve API and dashboard."""
    import uvicorn

    from nephoscope.core.paths import cache_root
    from nephoscope.fleet.db import FleetStore, migrate, open_engine, sqlite_url
    from nephoscope.knowledge.binaries import default_path

    url = db or os.environ.get("NEPHOSCOPE_FLEET_DB") or sqlite_url(cache_root() / "fleet.sqlite")
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = open_engine(url)
    migrate(engine)
    store = FleetStore(engine)
    if not store.has_operator():
        secret = store.issue_token("operator", label="first operator")
        token_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        typer.echo(f"operator token written to {token_file}", err=True)
    if migrate_only:
        return
    from nephoscope.fleet.server import create_app
    from nephoscope.knowledge import vulns as vulndb

    app = create_app(store, Path(kb) if kb else default_path(), Path(vulns) if vulns else vulndb.default_path())
    uvicorn.run(app, host=listen, port=port, log_level="warning")
