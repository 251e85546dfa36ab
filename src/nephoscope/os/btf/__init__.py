"""nephoscope os/btf layer."""
