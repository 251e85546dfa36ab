"""`nephoscope server`: the fleet's central API, store and dashboard."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
                                       "(e.g. 3600, 90m, 12h, 30d, 2w); default: never"),
           list_tokens: bool = typer.Option(False, "--list-tokens", help="List every token (id, scope, binding, "
                                            "label, times, state; never a secret) and exit"),
           revoke_token: int = typer.Option(0, "--revoke-token", metavar="ID", help="Revoke the token with this id "
                                            "(401 from now on; audited) and exit"),
           force: bool = typer.Option(False, "--force", help="With --revoke-token: revoke even the last active "
                                      "operator token"),
           as_json: bool = typer.Option(False, "--json", help="With --list-tokens or --revoke-token: JSON")) -> None:
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
    if list_tokens:
        rows = store.list_tokens()
        typer.echo(json.dumps(rows, indent=2) if as_json else _token_table(rows))
        return
    if revoke_token:
        typer.echo(_revoke(store, revoke_token, force, as_json))
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


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(t)) + "Z" if t is not None else "-"


def _token_table(rows: list[dict[str, Any]]) -> str:
    """Return the tokens as an aligned table (times in UTC)."""
    head = ("ID", "SCOPE", "BOUND TO", "LABEL", "STATE", "CREATED", "EXPIRES", "LAST USED", "REVOKED BY")
    body = [(str(r["id"]), r["scope"], f"tenant {r['tenant']}" if r["tenant"] else f"host {r['host']}" if r["host"]
             else "-", r["label"] or "-", r["state"], _when(r["created"]), _when(r["expires"]), _when(r["last_used"]),
             f"{r['revoked_by']} at {_when(r['revoked_at'])}" + (" (forced)" if r["forced"] else "")
             if r["revoked_at"] is not None else "-") for r in rows]
    widths = [max(len(row[i]) for row in (head, *body)) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in (head, *body))


def _revoke(store: FleetStore, token_id: int, force: bool, as_json: bool) -> str:
    """Revoke one token on `store` from the CLI (audited as `cli USER@HOST`) and return what to print."""
    from nephoscope.fleet.db import LastOperatorError

    try:
        row = store.revoke_token(token_id, force=force)
    except LastOperatorError as exc:
        raise typer.BadParameter(f"{exc} (--force)", param_hint="--revoke-token") from exc
    if row is None:
        raise typer.BadParameter(f"there is no token {token_id} (--list-tokens lists them)",
                                 param_hint="--revoke-token")
    if as_json:
        return json.dumps(row, indent=2)
    return f"token {row['id']} ({row['scope']}) revoked at {_when(row['revoked_at'])} by {row['revoked_by']}"
