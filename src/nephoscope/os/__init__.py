"""nephoscope os layer."""
