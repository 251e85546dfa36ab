"""Response: host-side, vulnerability-specific filters on a VM's network path (nftables, haproxy).

Policy as data (`policy`), plans from the latest stored scan (`plan`), nftables rulesets (`nft`), the host-side
haproxy for L7 rules (`haproxy`), and apply/remove/expire/gc with an audit trail in the store (`engine`).
Nothing here touches guest memory; commands run on the host (or in the VM's network namespace).
"""
