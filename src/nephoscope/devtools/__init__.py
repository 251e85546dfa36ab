"""Checks the project runs on itself (layering, imports); not part of the product's runtime."""
