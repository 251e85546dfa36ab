"""`nephoscope sensor`: scan this host's VMs by policy and push to the fleet server."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import typer


def sensor(server: str = typer.Option("", "--server", help="Fleet server URL (http://HOST:PORT); "
                                      "none: only buffer to the outbox"),
           token_file: Path = typer.Option(Path("sensor.token"), "--token-file",
                                           help="File holding this host's sensor token"),
           policy: Path | None = typer.Option(None, "--policy", help="Policy TOML (default: docs/fleet.md's)"),
           state_dir: Path = typer.Option(Path("/var/lib/nephoscope/sensor"), "--state-dir",
                                          help="Outbox, locks and schedule"),
           host: str = typer.Option("", "--host", help="Host name sent with each scan (default: hostname)"),
           kb_from_server: bool = typer.Option(False, "--kb-from-server",
                                               help="Fetch the central code-page and vulnerability DBs and "
                                               "scan and report against the cached copies"),
           once: bool = typer.Option(False, "--once", help="One sweep, then exit"),
           print_policy: bool = typer.Option(False, "--print-policy", help="Print the default policy and exit")
           ) -> None:
    """Sweep this host's VMs by policy, push each scan (idempotent), buffer while the server is away."""
    from nephoscope.fleet.sensor import (
        DEFAULT_POLICY,
        Client,
        Sensor,
        SensorError,
        apply_budget,
        fetch_knowledge,
        load_policy,
    )

    if print_policy:
        typer.echo(DEFAULT_POLICY, nl=False)
        return
    rules = load_policy(policy)
    client = None
    if server:
        try:
            client = Client(server, token_file.read_text().strip())
        except OSError as exc:
            raise typer.BadParameter(f"cannot read the sensor token {token_file}: {exc}") from exc
    state_dir.mkdir(parents=True, exist_ok=True)
    if client is not None and kb_from_server:
        fetch_knowledge(client, state_dir)
    apply_budget(rules)
    agent = Sensor(client, rules, state_dir, host=host or None)
    while True:
        if client is not None:  # a renewed token (the last one expired) is taken without a restart
            with contextlib.suppress(OSError):
                client.token = token_file.read_text().strip() or client.token
        report = agent.sweep()
        typer.echo(json.dumps(report.to_dict()))
        if once:
            return
        time.sleep(rules.interval_s)
        if client is not None and kb_from_server:  # a newer vulnerability DB (ETag: usually a 304); the KB
            with contextlib.suppress(SensorError, OSError):  # (WAL, open across a sweep) is taken at start only
                client.fetch_vulns(state_dir / "vulns.sqlite")
