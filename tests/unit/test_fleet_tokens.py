"""Token lifecycle: operators list and revoke tokens (API and CLI), a revoked token is refused at once on every
endpoint, revocation is audited and idempotent, the last operator token is kept unless forced, and migration
0004 upgrades a 0003 database whose tokens keep working."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet_docs import push
from sqlalchemy import inspect, text
from starlette.routing import Route
from test_fleet_api import Fleet

from nephoscope.fleet.db import FleetStore, LastOperatorError, migrate, open_engine, sqlite_url, token_digest

TOKEN_FIELDS = {"id", "scope", "tenant_id", "tenant", "host_id", "host", "label", "created", "expires", "state",
                "revoked_at", "revoked_by", "forced", "issued_by", "last_used"}


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    yield f
    f.client.close()
    f.store.engine.dispose()


def _id(fleet: Fleet, secret: str) -> int:
    who = fleet.store.find_principal(secret)
    assert who is not None and who.token_id is not None
    return who.token_id


def _every_request(fleet: Fleet) -> Iterator[tuple[str, str]]:
    """Yield (method, concrete path) for every endpoint of the app that takes a token (all but /healthz)."""
    for route in fleet.client.app.routes:
        if not isinstance(route, Route) or not route.path.startswith("/api/"):
            continue
        path = route.path
        for p in route.param_convertors:
            path = path.replace("{" + p + "}", "1")
        for method in sorted(route.methods or ()):
            if method != "HEAD":
                yield method.lower(), path


def test_operators_list_tokens_without_their_secrets(fleet: Fleet) -> None:
    got = fleet.call("get", "/api/v1/tokens", fleet.operator)
    assert got.status_code == 200
    rows = got.json()
    assert all(set(r) == TOKEN_FIELDS for r in rows)
    for secret in (fleet.operator, fleet.sensor_a, fleet.sensor_b, *fleet.tokens.values()):
        assert secret not in got.text and token_digest(secret) not in got.text
    by_id = {r["id"]: r for r in rows}
    acme = by_id[_id(fleet, fleet.tokens["acme"])]
    assert (acme["scope"], acme["tenant"], acme["tenant_id"], acme["host"], acme["state"]) == (
        "tenant", "acme", fleet.tenants["acme"], None, "active")
    sensor = by_id[_id(fleet, fleet.sensor_b)]
    assert (sensor["scope"], sensor["host"], sensor["tenant"]) == ("sensor", "hv-b", None)
    op_id = _id(fleet, fleet.operator)
    assert acme["issued_by"] == f"token {op_id}" and by_id[op_id]["issued_by"].startswith("cli ")
    assert by_id[op_id]["last_used"] is not None  # it was just used (to the minute)
    for token in (fleet.tokens["acme"], fleet.sensor_a):
        for path in ("/api/v1/tokens", "/api/v1/tokens/audit"):
            assert fleet.call("get", path, token).status_code == 403
        assert fleet.call("post", f"/api/v1/tokens/{acme['id']}/revoke", token).status_code == 403
    issued = fleet.call("post", "/api/v1/tokens", fleet.operator, json={"scope": "operator", "label": "on-call",
                                                                         "expires_in_s": 3600}).json()
    row = next(r for r in fleet.call("get", "/api/v1/tokens", fleet.operator).json() if r["id"] == issued["id"])
    assert (row["label"], row["expires"], row["last_used"]) == ("on-call", issued["expires"], None)


def test_a_revoked_token_is_refused_at_once_everywhere(fleet: Fleet) -> None:
    acme = fleet.tokens["acme"]
    vm = fleet.vms["acme"]
    assert fleet.call("get", f"/api/v1/vms/{vm}", acme).status_code == 200
    token_id = _id(fleet, acme)
    before = time.time()
    got = fleet.call("post", f"/api/v1/tokens/{token_id}/revoke", fleet.operator)
    assert got.status_code == 200, got.text
    row = got.json()
    op_id = _id(fleet, fleet.operator)
    assert row["state"] == "revoked" and row["revoked_at"] >= before and row["revoked_by"] == f"token {op_id}"
    for method, path in _every_request(fleet):
        assert fleet.call(method, path, acme, json={}).status_code == 401, (method, path)
    assert fleet.store.find_principal(acme) is None
    sensor_id = _id(fleet, fleet.sensor_a)
    assert fleet.call("post", f"/api/v1/tokens/{sensor_id}/revoke", fleet.operator).status_code == 200
    assert fleet.call("post", "/api/v1/scans", fleet.sensor_a, json=push("hv-a", "acme-vm")).status_code == 401
    assert fleet.call("post", "/api/v1/scans", fleet.sensor_b, json=push("hv-b", "globex-vm")).status_code == 201
    assert fleet.call("get", f"/api/v1/vms/{fleet.vms['globex']}", fleet.tokens["globex"]).status_code == 200


def test_revoking_twice_changes_nothing_and_is_audited_once(fleet: Fleet) -> None:
    token_id = _id(fleet, fleet.tokens["globex"])
    first = fleet.call("post", f"/api/v1/tokens/{token_id}/revoke", fleet.operator).json()
    other = fleet.call("post", "/api/v1/tokens", fleet.operator, json={"scope": "operator", "label": "second"}).json()
    again = fleet.call("post", f"/api/v1/tokens/{token_id}/revoke", other["token"])
    assert again.status_code == 200 and again.json() == first  # the first revocation (time, who) stays
    audit = fleet.call("get", "/api/v1/tokens/audit", fleet.operator).json()
    revokes = [e for e in audit if e["action"] == "revoked"]
    op_id = _id(fleet, fleet.operator)
    assert [(e["token_id"], e["actor_token_id"], e["actor"], e["forced"]) for e in revokes] == [
        (token_id, op_id, f"token {op_id}", False)]
    assert revokes[0]["at"] == first["revoked_at"]
    issued = [e for e in audit if e["action"] == "issued" and e["token_id"] == other["id"]]
    assert [(e["actor_token_id"], e["actor"]) for e in issued] == [(op_id, f"token {op_id}")]
    assert audit == sorted(audit, key=lambda e: -e["id"])
    assert fleet.call("post", "/api/v1/tokens/2147483647/revoke", fleet.operator).status_code == 404


def test_the_last_operator_token_is_kept_unless_forced(fleet: Fleet) -> None:
    op_id = _id(fleet, fleet.operator)
    fleet.store.issue_token("operator", expires=time.time() - 1)  # an expired operator token does not count
    refused = fleet.call("post", f"/api/v1/tokens/{op_id}/revoke", fleet.operator)
    assert refused.status_code == 409 and "last active operator token" in refused.json()["detail"]
    assert fleet.call("get", "/api/v1/vms", fleet.operator).status_code == 200  # still works
    second = fleet.call("post", "/api/v1/tokens", fleet.operator, json={"scope": "operator"}).json()
    assert fleet.call("post", f"/api/v1/tokens/{op_id}/revoke", second["token"]).status_code == 200
    assert fleet.call("get", "/api/v1/vms", fleet.operator).status_code == 401
    assert fleet.call("post", f"/api/v1/tokens/{second['id']}/revoke", second["token"]).status_code == 409
    forced = fleet.call("post", f"/api/v1/tokens/{second['id']}/revoke?force=true", second["token"])
    assert forced.status_code == 200 and forced.json()["forced"] is True
    assert fleet.call("get", "/api/v1/vms", second["token"]).status_code == 401
    new = fleet.store.issue_token("operator")  # the only active one now: the store refuses it too (the CLI's path)
    with pytest.raises(LastOperatorError):
        fleet.store.revoke_token(_id(fleet, new))


def _cli(*args: str) -> Any:
    from typer.testing import CliRunner

    from nephoscope.cli.main import app

    return CliRunner().invoke(app, ["server", *args])


def test_server_cli_lists_and_revokes_tokens(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "cli.sqlite")
    base = ["--db", url, "--token-file", str(tmp_path / "op.token")]
    made = _cli(*base, "--new-token", "tenant", "--tenant", "acme", "--label", "acme portal")
    assert made.exit_code == 0, made.output
    secret = made.output.strip().splitlines()[-1]
    operator = (tmp_path / "op.token").read_text().strip()
    listed = _cli(*base, "--list-tokens", "--json")
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.output)
    assert [(r["scope"], r["label"], r["tenant"]) for r in rows] == [("operator", "first operator", None),
                                                                     ("tenant", "acme portal", "acme")]
    assert secret not in listed.output and operator not in listed.output
    table = _cli(*base, "--list-tokens")
    assert table.exit_code == 0 and "tenant acme" in table.output and "acme portal" in table.output
    revoked = _cli(*base, "--revoke-token", str(rows[1]["id"]))
    assert revoked.exit_code == 0 and "revoked" in revoked.output and "by cli " in revoked.output
    store = FleetStore(open_engine(url))
    try:
        assert store.find_principal(secret) is None and store.find_principal(operator) is not None
        last = _cli(*base, "--revoke-token", str(rows[0]["id"]))
        assert last.exit_code != 0 and "last active operator token" in last.output
        assert store.find_principal(operator) is not None
        assert _cli(*base, "--revoke-token", "999").exit_code != 0
        forced = _cli(*base, "--revoke-token", str(rows[0]["id"]), "--force", "--json")
        assert forced.exit_code == 0 and json.loads(forced.output)["forced"] is True
        assert store.find_principal(operator) is None
        audit = store.token_audit()
        assert [(e["action"], e["token_id"], e["forced"]) for e in audit if e["action"] == "revoked"] == [
            ("revoked", rows[0]["id"], True), ("revoked", rows[1]["id"], False)]
        assert all(e["actor"].startswith("cli ") and e["actor_token_id"] is None for e in audit)
    finally:
        store.engine.dispose()


def _make_0003(url: str) -> tuple[str, str]:
    """Migrate `url` to 0003 and write a tenant and two tokens as 0003 stored them; return their secrets."""
    engine = open_engine(url)
    try:
        migrate(engine, "0003")
        with engine.begin() as conn:
            tid = conn.execute(text("INSERT INTO tenants (name) VALUES ('acme') RETURNING id")).scalar()
            for secret, scope, tenant in (("nph_old-operator", "operator", None), ("nph_old-tenant", "tenant", tid)):
                conn.execute(text("INSERT INTO tokens (digest, scope, tenant_id, label, created) "
                                  "VALUES (:d, :s, :t, 'from 0003', 1700000000.0)"),
                             {"d": token_digest(secret), "s": scope, "t": tenant})
    finally:
        engine.dispose()
    return "nph_old-operator", "nph_old-tenant"


def check_migration_0004(url: str) -> None:
    """Upgrade a 0003 database at `url` to head: its tokens keep working, can be listed and revoked; a
    downgrade to 0003 drops revoked tokens (0003 could not refuse them) and keeps the others."""
    operator, tenant = _make_0003(url)
    engine = open_engine(url)
    try:
        columns = {c["name"] for c in inspect(engine).get_columns("tokens")}
        assert "revoked_at" not in columns and "token_audit" not in inspect(engine).get_table_names()
        migrate(engine)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0004"
        assert {"revoked_at", "last_used"} <= {c["name"] for c in inspect(engine).get_columns("tokens")}
        store = FleetStore(engine)
        who = store.find_principal(tenant)
        assert who is not None and who.scope == "tenant"
        rows = {r["label"] + r["scope"]: r for r in store.list_tokens()}
        old = rows["from 0003tenant"]
        assert (old["state"], old["issued_by"], old["revoked_at"], old["tenant"]) == ("active", None, None, "acme")
        assert old["last_used"] is not None
        with pytest.raises(LastOperatorError):
            store.revoke_token(rows["from 0003operator"]["id"])
        assert store.revoke_token(old["id"])["state"] == "revoked"  # type: ignore[index]
        assert store.find_principal(tenant) is None and store.find_principal(operator) is not None
    finally:
        engine.dispose()


def _downgrade(url: str, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    from nephoscope.fleet.db import MIGRATIONS

    engine = open_engine(url)
    try:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.downgrade(config, revision)
    finally:
        engine.dispose()


def check_downgrade_0004(url: str) -> None:
    """Downgrade the database `check_migration_0004` left to 0003: the revoked token is gone, the operator stays."""
    _downgrade(url, "0003")
    engine = open_engine(url)
    try:
        with engine.connect() as conn:
            digests = set(conn.execute(text("SELECT digest FROM tokens")).scalars())
        assert digests == {token_digest("nph_old-operator")}
        assert "token_audit" not in inspect(engine).get_table_names()
        migrate(engine)  # and up again
        assert FleetStore(engine).find_principal("nph_old-operator") is not None
    finally:
        engine.dispose()


def test_migration_0004_upgrades_a_0003_database_on_sqlite(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "old.sqlite")
    check_migration_0004(url)
    check_downgrade_0004(url)
