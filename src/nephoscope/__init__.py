"""nephoscope: see what runs inside virtual machines from the outside."""

__version__ = "0.1.0"
