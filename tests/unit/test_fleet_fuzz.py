"""The fleet API fuzzed with schemathesis from its own OpenAPI spec: no input makes it fail (5xx), for any token,
and every answer has the shape the spec declares for its status.

Each scope's token is used in turn; a tenant token must never read another tenant's VM or scan, whatever
ids and parameters the fuzzer picks.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance
from test_fleet_api import Fleet

FLEET = Fleet(Path(tempfile.mkdtemp(prefix="nephoscope-fuzz-")))
schema = schemathesis.openapi.from_asgi("/openapi.json", FLEET.client.app)
TOKENS = {"operator": FLEET.operator, "tenant": FLEET.tokens["acme"], "sensor": FLEET.sensor_a, "none": "nph_unknown"}


def _tenant_isolated(ctx: Any, response: Any, case: Any) -> bool | None:
    """A tenant's 200 never carries a VM (or a scan of a VM) that is not its own at that moment.

    The operator's fuzzing may reassign VMs (PATCH tenant_id), so ownership is read back from the store."""
    if case.headers.get("Authorization") != f"Bearer {TOKENS['tenant']}" or response.status_code != 200:
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    operator = FLEET.store.find_principal(FLEET.operator)
    assert operator is not None
    owner = {v["id"]: v["tenant"] for v in FLEET.store.list_vms(operator)}
    items = body if isinstance(body, list) else [body]
    for item in (i for i in items if isinstance(i, dict)):
        vm_id = item.get("vm_id") if "vm_id" in item else item.get("id") if "host" in item else None
        if vm_id is not None and owner.get(vm_id) != "acme":
            raise AssertionError(f"tenant read VM {vm_id} (tenant {owner.get(vm_id)!r}) via {case.path}")
    return None


@pytest.mark.parametrize("scope", list(TOKENS))
@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_fuzz(case: Any, scope: str) -> None:
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {TOKENS[scope]}"}
    try:
        case.call_and_validate(checks=[not_a_server_error, response_schema_conformance],
                               additional_checks=[_tenant_isolated])
    finally:
        FLEET.unrevoke()  # an operator case may revoke a token the next cases fuzz with
