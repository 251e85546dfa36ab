"""Hypervisor connectors: QMP control, guest agent, shared RAM, dump files."""
