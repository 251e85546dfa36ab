"""The `net` use case: collect every view of a VM's sockets and flows, then judge them by the network policy."""

from __future__ import annotations

from pathlib import Path

from nephoscope.analysis.network import NetworkFacts, Policy, analyze, load_policy
from nephoscope.hypervisor.target import VmTarget
from nephoscope.introspect.net import NetReport, collect_net


def network_report(vm: VmTarget, *, policy: Policy | None = None, identify: bool = True, agent: bool = True,
                   host: bool = True, kb: Path | None = None, symbols: Path | None = None,
                   cache: bool = True, guest_ip: str | None = None) -> NetReport:
    """Return `vm`'s sockets, flows and network findings (reads RAM without pausing; asks the agent and host)."""
    policy = policy or load_policy()
    report = collect_net(vm, identify=identify, agent=agent, host=host, kb=kb, symbols=symbols, cache=cache,
                         guest_ip=guest_ip)
    facts = NetworkFacts(report.sockets, report.identities, report.hidden, report.not_in_guest_view,
                         report.unexplained_flows)
    report.findings = analyze(facts, policy, vm.name)
    return report
