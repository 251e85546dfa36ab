"""nephoscope memory layer."""
