"""The fleet: a sensor on every hypervisor host pushing scans to a central server (API, store, dashboard)."""
