"""nephoscope introspect layer."""
