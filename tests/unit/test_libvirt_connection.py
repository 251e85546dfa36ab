"""One libvirt connection per process and URI, shared by monitors and agent channels (libvirt's test driver)."""

from __future__ import annotations

import pytest

from nephoscope.core.errors import ConnectorError

lv = pytest.importorskip("nephoscope.hypervisor.libvirt")
pytest.importorskip("libvirt")

URI = "test:///default"  # libvirt's built-in test driver: one running domain named "test", no daemon needed


def test_monitors_share_one_connection_and_closing_a_monitor_keeps_it() -> None:
    first = lv.LibvirtMonitor("test", URI)
    first.close()
    second = lv.LibvirtMonitor("test", URI)
    assert second.conn is first.conn and second.conn.isAlive()
    assert second.dom.name() == "test"
    second.close()


def test_a_closed_connection_is_reopened() -> None:
    conn = lv.shared_connection(URI)
    conn.close()  # closed behind the cache's back
    again = lv.shared_connection(URI)
    assert again is not conn and again.isAlive()
    assert lv.LibvirtMonitor("test", URI).conn is again


def test_a_forked_child_opens_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    conn = lv.shared_connection(URI)
    monkeypatch.setattr(lv.os, "getpid", lambda: -1)
    child = lv.shared_connection(URI)
    assert child is not conn and conn.isAlive(), "the parent's connection is left alone"
    child.close()
    lv._SHARED.pop(URI)


def test_an_unknown_domain_is_still_an_error_naming_the_domains() -> None:
    with pytest.raises(ConnectorError, match=r"no libvirt domain 'nope'.*test"):
        lv.LibvirtMonitor("nope", URI)


def test_a_connection_to_a_restarted_daemon_is_reopened() -> None:
    """After a libvirtd restart the old connection still says isAlive() until an RPC fails: the probe notices."""
    import libvirt

    class Stale:
        closed = False

        def isAlive(self) -> int:
            return 1

        def getLibVersion(self) -> int:
            raise libvirt.libvirtError("Cannot write data: Broken pipe")

        def close(self) -> None:
            self.closed = True

    stale = Stale()
    lv._SHARED[URI] = (lv.os.getpid(), stale)
    fresh = lv.shared_connection(URI)
    assert fresh is not stale and stale.closed and fresh.isAlive()
    assert lv.LibvirtMonitor("test", URI).dom.name() == "test"
