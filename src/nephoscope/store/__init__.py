"""nephoscope store layer."""
