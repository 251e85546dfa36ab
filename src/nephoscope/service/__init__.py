"""nephoscope service layer."""
