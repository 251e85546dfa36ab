"""A filter change reaches the VM's tenant as a notice (a real webhook receiver and SMTP server).

`service.filters.notify` is what apply, remove, gc and the scan's expiry call: with a tenants file the
tenant is told once per change; without one, or for a VM no tenant owns, nothing is sent and the change
itself is unaffected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nephoscope.response.engine import FilterChange
from nephoscope.service.filters import notify
from nephoscope.store.notices import NoticeLog
from nephoscope.store.sqlite import Store
from receivers import smtp_server, tenants_toml, webhook_receiver

SECRET = "tenant-acme-secret-0123456789"


def _change(vm: str, action: str) -> FilterChange:
    return FilterChange(vm=vm, action=action, mitigation="nginx-h2-rapid-reset", cve="CVE-2023-44487",
                        package="nginx", version="1.22.1-9", kind="haproxy", ports=(8080,),
                        rules_summary=("tcp dport 8080 redirected to haproxy <b>h2 limits</b>",),
                        reason="nginx 1.22.1-9 is executing (arch)", who="test", at=1.0)


def test_filter_changes_notify_the_owning_tenant_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "s.sqlite")
    with smtp_server() as box, webhook_receiver() as hook:
        tenants = tmp_path / "tenants.toml"
        tenants.write_text(tenants_toml(box, hook, "vm-a", SECRET))
        monkeypatch.setenv("NEPHOSCOPE_TENANTS", str(tenants))
        applied = [_change("vm-a", "applied"), _change("vm-nobody", "applied")]
        assert notify(applied, store) == applied  # the changes are returned unchanged
        assert len(hook.requests) == 1 and len(box.messages) == 1  # vm-nobody has no tenant
        doc = json.loads(hook.requests[0][1])
        assert doc["vm"] == "vm-a" and doc["filter"]["action"] == "applied"
        assert doc["filter"]["cve"] == "CVE-2023-44487"
        notify([_change("vm-a", "applied")], store)
        assert len(hook.requests) == 1  # the same change is not notified twice
        notify([_change("vm-a", "expired")], store)  # an expired filter is a removed one for the tenant
        assert len(hook.requests) == 2 and json.loads(hook.requests[1][1])["filter"]["action"] == "removed"
        assert [n.event for n in NoticeLog(store).notices("vm-a")].count("filter") >= 2


def test_no_tenants_file_sends_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEPHOSCOPE_TENANTS", str(tmp_path / "absent.toml"))
    store = Store(tmp_path / "s.sqlite")
    changes = [_change("vm-a", "applied")]
    assert notify(changes, store) == changes
    assert NoticeLog(store).notices("vm-a") == []
