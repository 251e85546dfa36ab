"""`nephoscope server`: the fleet's central API, store and dashboard."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from nephoscope.fleet.db import FleetStore


def server(db: str = typer.Option("", "--db", help="Database URL (postgresql://... or sqlite:///FILE); "
                                  "default: NEPHOSCOPE_FLEET_DB, else an SQLite file in the cache"),
           listen: str = typer.Option("127.0.0.1", "--listen", help="Address to listen on"),
           port: int = typer.Option(8470, "--port", help="TCP port"),
           token_file: Path = typer.Option(Path("operator.token"), "--token-file",
                                           help="Where the first operator token goes (mode 600) when none exists"),
           kb: str = typer.Option("", "--kb", help="Code-page DB served to sensors (default: the local KB)"),
           vulns: str = typer.Option("", "--vulns", help="Vulnerability DB served to sensors "
                                     "(default: the local one, NEPHOSCOPE_VULNS or the cache's vulns.sqlite)"),
           migrate_only: bool = typer.Option(False, "--migrate-only", help="Apply migrations and exit"),
           new_token: str = typer.Option("", "--new-token", help="Issue a token of this scope (operator, tenant, "
                                         "sensor), print its secret and exit"),
           tenant: str = typer.Option("", "--tenant", help="With --new-token tenant: the tenant's name "
                                      "(created if new)"),
           host: str = typer.Option("", "--host", help="With --new-token sensor: the host it pushes for"),
           label: str = typer.Option("", "--label", help="With --new-token: a label kept with the token"),
           expires: str = typer.Option("", "--expires", help="With --new-token: refuse the token after this long "
                                       "(e.g. 3600, 90m, 12h, 30d, 2w); default: never")) -> None:
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
    if new_token:
        typer.echo(_issue(store, new_token, tenant, host, label, expires))
        return
    if migrate_only:
        return
    from nephoscope.fleet.server import create_app
    from nephoscope.knowledge import vulns as vulndb

    app = create_app(store, Path(kb) if kb else default_path(), Path(vulns) if vulns else vulndb.default_path())
    uvicorn.run(app, host=listen, port=port, log_level="warning")


def _issue(store: FleetStore, scope: str, tenant: str, host: str, label: str, expires: str) -> str:
    """Issue one token on `store` from the CLI options and return its secret."""
    import time

    from nephoscope.fleet.db import FleetError, parse_duration

    try:
        until = time.time() + parse_duration(expires) if expires else None
        if scope == "tenant" and not tenant:
            raise FleetError("a tenant token needs --tenant NAME")
        if scope == "sensor" and not host:
            raise FleetError("a sensor token needs --host NAME")
        return store.issue_token(scope, tenant_id=store.add_tenant(tenant) if scope == "tenant" else None,
                                 host_id=store.add_host(host) if scope == "sensor" else None, label=label,
                                 expires=until)
    except FleetError as exc:
        raise typer.BadParameter(str(exc)) from exc
