"""Core types shared by every layer; imports nothing else from nephoscope."""
