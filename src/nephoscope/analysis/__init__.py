"""nephoscope analysis layer."""
