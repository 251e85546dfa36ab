"""Command-line face: typer commands that call into nephoscope's core and render with rich."""
