"""`nephoscope notices`: tell a VM's owner what its latest scan shows (e-mail, signed webhook); list deliveries."""

from __future__ import annotations

import datetime
from pathlib import Path

import typer

from nephoscope.cli.render import emit_json, err_console, fail, table
from nephoscope.core.errors import NephoscopeError

app = typer.Typer(help="Notices to a VM's owner: e-mail and signed webhook, once per state, delivery recorded.",
                  no_args_is_help=True)
TENANTS_OPTION = typer.Option(None, "--tenants", help="tenants file (default: $NEPHOSCOPE_TENANTS or "
                              "~/.config/nephoscope/tenants.toml)")


def _when(ts: float | None) -> str:
    return datetime.datetime.fromtimestamp(ts).isoformat(timespec="seconds") if ts else "-"


@app.command("send")
def send(vm: str = typer.Argument(..., help="VM name as stored by `nephoscope scan`"),
         tenants_file: Path = TENANTS_OPTION,
         force: bool = typer.Option(False, "--force", help="send the current state even if it was notified already"),
         json_out: bool = typer.Option(False, "--json")) -> None:
    """Notify the VM's tenant from its latest stored scan unless it was told this state already."""
    from nephoscope.response.tenants import load_tenants
    from nephoscope.service.notices import notify_vm

    try:
        outcome = notify_vm(vm, tenants=load_tenants(tenants_file), force=force)
    except NephoscopeError as exc:
        fail(exc)
    if json_out:
        emit_json(outcome.to_dict())
    elif outcome.deliveries:
        table(f"notices for {vm} (tenant {outcome.tenant})", ["id", "event", "channel", "status", "attempts", "error"],
              [[d.id, d.event, d.channel, d.status, d.attempts, d.last_error] for d in outcome.deliveries])
    else:
        err_console.print(f"{vm}: no notice sent: {outcome.reason}", markup=False, highlight=False)
    if any(d.status != "sent" for d in outcome.deliveries):
        raise SystemExit(1)


@app.command("list")
def list_(vm: str = typer.Argument(None, help="only this VM"),
          tenant: str = typer.Option(None, "--tenant", help="only this tenant"),
          limit: int = typer.Option(50, "--limit"), json_out: bool = typer.Option(False, "--json")) -> None:
    """List recorded notices with their delivery status (attempts, last error), newest first."""
    from nephoscope.service.notices import list_notices

    try:
        rows = list_notices(vm, tenant, limit)
    except NephoscopeError as exc:
        fail(exc)
    if json_out:
        emit_json([r.to_dict() for r in rows])
        return
    table("notices", ["id", "when", "tenant", "vm", "event", "channel", "status", "attempts", "error"],
          [[r.id, _when(r.created), r.tenant, r.vm, r.event, r.channel, r.status, r.attempts, r.last_error]
           for r in rows])


@app.command("tenants")
def tenants(tenants_file: Path = TENANTS_OPTION, vm: str = typer.Option(None, "--vm", help="say which tenant owns it"),
            json_out: bool = typer.Option(False, "--json")) -> None:
    """Check the tenants file and show each tenant's VMs and channels (secrets are never printed)."""
    from nephoscope.response.tenants import load_tenants

    try:
        loaded = load_tenants(tenants_file)
        owner = loaded.find_tenant(vm) if vm else None
    except NephoscopeError as exc:
        fail(exc)
    rows = [t.describe() for t in loaded.tenants]
    if json_out:
        emit_json({"path": str(loaded.path), "tenants": rows, **({"vm": vm, "owner": owner.name if owner else None}
                                                                  if vm else {})})
        return
    table(f"tenants ({loaded.path})", ["tenant", "vms", "emails", "webhook", "secret", "smtp"],
          [[r["tenant"], ", ".join(r["vms"]), ", ".join(r["emails"]), r["webhook"], r["secret"], r["smtp"]]
           for r in rows])
    if vm:
        err_console.print(f"{vm}: " + (f"tenant {owner.name}" if owner else "no tenant"), markup=False,
                          highlight=False)
