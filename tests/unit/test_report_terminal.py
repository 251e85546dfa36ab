"""The customer report for people on a terminal, and clean files: versions verbatim, guest strings inert."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from nephoscope.cli import report as report_cli
from nephoscope.cli.main import app
from nephoscope.cli.views import render_report
from nephoscope.service.report import CodeItem, Report, VulnItem
from nephoscope.service.report_render import render_html, render_json, render_markdown

VERSION = "1.22.1-9+deb12u9"
HOSTILE = "evil\x1b[31mRED\x1b]0;title\x07\nfake | row **bold** <b>x</b> [link](http://e) `code` _em_ # 1. - +"


def _report() -> Report:
    rep = Report("vm-a", 3, 1.0e9, ["agent", "arch", "checkpoint"])
    rep.vulnerable = [VulnItem("nginx", [VERSION], True, "1.22.1-9+deb12u10",
                               [{"cve": "CVE-2026-1111", "urgency": "high"}], [{"pid": 10, "comm": HOSTILE}],
                               "arch, checkpoint (verified)")]
    rep.code = [CodeItem("masquerading", "medium", f"pid 10 calls itself {HOSTILE!r} but executes /usr/bin/x",
                         [{"pid": 10, "comm": HOSTILE}], ["arch", "checkpoint"])]
    rep.unverified = [{"what": HOSTILE, "method": "agent", "reason": "- starts like a list"}]
    rep.summary = {"running_vulnerable": 1, "installed_vulnerable": 0, "cves": 1, "suspicious_code": 1,
                   "unverified": 1}
    return rep


def _terminal(color_system: str | None) -> str:
    buf = io.StringIO()
    render_report(_report(), Console(file=buf, force_terminal=True, color_system=color_system, width=240))
    return buf.getvalue()


def test_terminal_shows_versions_verbatim_and_no_guest_escapes() -> None:
    plain = _terminal(None)  # no styles at all: any escape character would be the guest's
    assert VERSION in plain and "1.22.1-9+deb12u10" in plain and "1\\.22" not in plain
    assert "\x1b" not in plain and "\x07" not in plain
    assert "\\x1b[31mRED" in plain and "\\x0a" in plain  # shown escaped, on one line
    assert "**bold** <b>x</b> [link](http://e)" in plain  # markup shown as the text it is
    styled = _terminal("truecolor")
    assert "\x1b[31m" not in styled and "\x1b]0;" not in styled and "\x07" not in styled
    rec = Console(record=True, force_terminal=True, width=240, file=io.StringIO())
    render_report(_report(), rec)
    assert VERSION in rec.export_text() and "\x1b" not in rec.export_text()


def test_files_are_clean_and_escaped_for_their_format() -> None:
    rep = _report()
    md = render_markdown(rep)
    assert f"| {VERSION} |" in md and "1.22.1-9+deb12u10" in md  # nothing escaped that needs no escape
    assert "\x1b" not in md and "\x07" not in md and "<b>" not in md and "](http" not in md
    assert "\\*\\*bold\\*\\*" in md and "\\|" in md and "\\`code\\`" in md and "\\_em\\_" in md
    assert "- \\- starts like a list" not in md and "\\- starts like a list" not in md  # reason is mid-line
    page = render_html(rep)
    assert VERSION in page and "<b>x" not in page and "&lt;b&gt;x" in page and "\x1b" not in page
    assert json.loads(render_json(rep))["vulnerable"][0]["versions"] == [VERSION]
    assert json.loads(render_json(rep))["code"][0]["details"][0]["comm"] == HOSTILE  # JSON keeps the data


@pytest.fixture()
def stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    from test_report import _obs

    from nephoscope.analysis.merge import merge
    from nephoscope.store.sqlite import Store

    monkeypatch.setenv("NEPHOSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NEPHOSCOPE_DB", str(tmp_path / "s.sqlite"))
    obs = _obs("vm-term", "nginx")
    view = merge(obs, ["agent", "arch"], "vm-term")
    Store(tmp_path / "s.sqlite").save_scan("vm-term", ["agent", "arch"], obs, view.findings, view.summary(), 1.0)
    return "vm-term"


def test_report_command_renders_for_a_terminal(stored: str, monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.StringIO()
    monkeypatch.setattr(report_cli, "console", Console(file=buf, force_terminal=True, color_system=None, width=200))
    result = CliRunner().invoke(app, ["report", stored])
    assert result.exit_code == 0, result.output
    shown = buf.getvalue()
    assert "Security report for vm-term" in shown and "# Security" not in shown and "\\." not in shown


def test_report_command_writes_markdown_when_piped_or_asked(stored: str, tmp_path: Path) -> None:
    piped = CliRunner().invoke(app, ["report", stored])  # CliRunner's stdout is no terminal
    assert piped.exit_code == 0 and piped.output.startswith("# Security report for vm-term")
    out = tmp_path / "r.html"
    assert CliRunner().invoke(app, ["report", stored, "-f", "html", "-o", str(out)]).exit_code == 0
    assert out.read_text().startswith("<!DOCTYPE html>")
