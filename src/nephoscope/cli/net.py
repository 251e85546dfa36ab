"""`nephoscope net VM`: every socket of every process, from kernel memory, with code identity and findings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from nephoscope.cli.render import console, emit_json, fail, table
from nephoscope.core.errors import NephoscopeError
from nephoscope.core.text import escape_guest
from nephoscope.service.targets import resolve_target

VM_ARG = typer.Argument(..., help="lab guest name, QMP socket path, or RAM/dump file (raw, QEMU ELF, LiME)")


def _endpoint(addr: str, port: int, family: str) -> str:
    if family == "inet6":
        return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
    if family == "inet":
        return f"{addr}:{port}"
    if family == "netlink":
        return f"portid {port}"
    if family == "packet":
        return f"{addr} proto 0x{port:04x}"
    return addr or "*"


def _owner_cells(row: dict[str, Any], ids: dict[int, dict[str, Any]]) -> tuple[str, str, str]:
    if not row["owners"]:
        return "-", "", ""
    first = row["owners"][0]
    more = f" +{len(row['owners']) - 1}" if len(row["owners"]) > 1 else ""
    ident = ids.get(first["pid"], {})
    binary = ident.get("path") or first.get("exe") or ""
    pkg = f" ({ident['package']})" if ident.get("package") else ""
    return f"{first['pid']}/{first['comm']}{more}", binary + pkg, str(ident.get("status", "unverifiable"))


def net(vm: str = VM_ARG, json_out: bool = typer.Option(False, "--json", help="print JSON"),
        no_identify: bool = typer.Option(False, "--no-identify", help="do not hash the owners' code pages"),
        no_agent: bool = typer.Option(False, "--no-agent", help="do not read the guest's /proc/net via its agent"),
        no_host: bool = typer.Option(False, "--no-host", help="do not read the QEMU process's host sockets"),
        policy: Path | None = typer.Option(None, "--policy", metavar="FILE",
                                           help="network policy TOML (default: the shipped network.toml)"),
        blocklist: Path | None = typer.Option(None, "--blocklist", metavar="FILE",
                                              help="provider blocklist: one address or CIDR per line"),
        kb: Path | None = typer.Option(None, "--kb", metavar="FILE", help="code-page DB (default: the shared one)"),
        symbols: Path | None = typer.Option(None, "--symbols", metavar="FILE",
                                            help="this kernel's types/symbols when RAM lacks them (ISF, vmlinux)"),
        guest_ip: str | None = typer.Option(None, "--guest-ip", metavar="ADDR",
                                            help="the guest's address on a tap device (from libvirt or ARP, not "
                                                 "the guest): read its flows from the host's conntrack table"),
        no_cache: bool = typer.Option(False, "--no-cache", help="recover the kernel model from RAM afresh")) -> None:
    """List every socket of every process (like netstat -tuanpx) from kernel memory, with code identity and findings."""
    from nephoscope.analysis.network import load_policy
    from nephoscope.service.net import network_report

    try:
        rules = load_policy(policy, blocklist)
        report = network_report(resolve_target(vm), identify=not no_identify, agent=not no_agent, host=not no_host,
                             kb=kb, policy=rules, symbols=symbols, cache=not no_cache,
                                guest_ip=guest_ip)
    except NephoscopeError as exc:
        fail(exc)
    if json_out:
        emit_json(report.to_dict())
        return
    from rich.text import Text  # people only: --json needs no rich

    order = {"tcp": 0, "tcp6": 1, "udp": 2, "udp6": 3}
    rows = sorted(report.sockets, key=lambda r: (order.get(r["proto"], 9), r["proto"], r["local_port"]))
    cells = []
    for r in rows:
        who, binary, status = _owner_cells(r, report.identities)
        cells.append([r["proto"], _endpoint(r["local"], r["local_port"], r["family"]),
                      _endpoint(r["remote"], r["remote_port"], r["family"]) if r["family"].startswith("inet") else "",
                      r["state"], r["rx_queue"], r["tx_queue"], r["inode"], who, binary, status,
                      ",".join(v.replace("tcp-", "") for v in r["views"])])
    table(f"{vm}: sockets ({len(rows)})", ["proto", "local", "remote", "state", "recv-q", "send-q", "inode",
                                            "pid/comm", "binary", "identity", "views"], cells)
    if report.flows:
        table(f"{vm}: flows the host sees ({len(report.flows)})", ["source", "proto", "host side", "remote",
                                                                   "state", "direction", "guest pid/comm"],
              [[f["source"], f["proto"], f"{f['local']}:{f['local_port']}", f"{f['remote']}:{f['remote_port']}",
                f["state"], "in" if f["inbound"] else "out",
                ", ".join(f"{o['pid']}/{o['comm']}" for o in f["attributed"]) or ("-" if f["inbound"] else "NONE")]
               for f in report.flows])
    for name, v in report.views.items():
        if name == "budget":
            continue
        problem = v.get("problem", "")
        if name == "cross_view":
            line = f"hidden-socket check: {v['verdict']}" + (f" ({problem})" if problem else
                                                             f", {v['hidden']} hidden")
        else:
            line = f"{name}: {v.get('count', '')} entries, " + ("complete" if not problem else f"INCOMPLETE: {problem}")
        console.print(Text(escape_guest(line), style="yellow" if problem else ""))
    for f in report.findings:  # titles carry guest text: never markup
        console.print(Text(escape_guest(f"[{f.severity}] {f.kind}: {f.title}"),
                           style="red" if f.severity in ("critical", "high") else "yellow"))
    if not report.findings:
        console.print("no network finding")
