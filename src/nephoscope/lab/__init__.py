"""The lab: real QEMU guests built from Debian packages, with ground truth for tests and evaluations."""
