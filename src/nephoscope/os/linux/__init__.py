"""nephoscope os/linux layer."""
