"""The published SBOM/VEX schemas vendored in tests/data/schemas (see its README for where each came from)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource

SCHEMAS = Path(__file__).resolve().parent / "data" / "schemas"


def _schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / name).read_text())  # type: ignore[no-any-return]


def validate_cyclonedx(doc: dict[str, Any]) -> None:
    """Validate against bom-1.5 with its referenced SPDX and JSF schemas (the names it refers to them by)."""
    registry = Registry().with_resources([
        (f"http://cyclonedx.org/schema/{name}", Resource.from_contents(_schema(name)))
        for name in ("spdx.SNAPSHOT.schema.json", "jsf-0.82.SNAPSHOT.schema.json")])
    schema = _schema("bom-1.5.SNAPSHOT.schema.json")
    jsonschema.Draft7Validator(schema, registry=registry, format_checker=jsonschema.FormatChecker()).validate(doc)


def validate_openvex(doc: dict[str, Any]) -> None:
    """Validate against the OpenVEX 0.2.0 JSON schema."""
    jsonschema.Draft202012Validator(_schema("openvex-0.2.0.schema.json"),
                                    format_checker=jsonschema.FormatChecker()).validate(doc)
