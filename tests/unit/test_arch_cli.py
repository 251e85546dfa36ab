"""`nephoscope arch` on a synthetic RAM file: JSON observations, exit codes, documentation."""

from __future__ import annotations

import json
from pathlib import Path

from test_arch import _guest
from typer.testing import CliRunner

from nephoscope.cli.main import app

runner = CliRunner()
DOCS = Path(__file__).resolve().parents[2] / "docs" / "arch.md"


def test_arch_json_on_a_ram_file(tmp_path: Path) -> None:
    g, _, roots = _guest()
    ram = tmp_path / "guest.ram"
    ram.write_bytes(bytes(g.s.mem))
    result = runner.invoke(app, ["arch", str(ram), "--json", "--kb", str(tmp_path / "kb.sqlite"),
                                 "--cr3", hex(roots["clean"])])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    kinds = [o["kind"] for o in out["observations"]]
    assert kinds.count("address-space") == len(roots)
    assert "unknown-code" in kinds and "kernel-code" in kinds  # an empty KB knows no page
    assert out["missing_vcpu_roots"] == [] and out["problem"] == ""


def test_arch_table_and_failures(tmp_path: Path) -> None:
    g, _, _ = _guest()
    ram = tmp_path / "guest.ram"
    ram.write_bytes(bytes(g.s.mem))
    result = runner.invoke(app, ["arch", str(ram), "--kb", str(tmp_path / "kb.sqlite")])
    assert result.exit_code == 0 and "address spaces" in result.stdout
    junk = tmp_path / "junk"
    junk.write_bytes(b"not memory" * 1000)
    result = runner.invoke(app, ["arch", str(junk), "--kb", str(tmp_path / "kb.sqlite")])
    assert result.exit_code == 1 and "no x86-64 page-table root" in result.output
    result = runner.invoke(app, ["arch", str(ram), "--cr3", "zz", "--kb", str(tmp_path / "kb.sqlite")])
    assert result.exit_code == 1 and "--cr3" in result.output
    result = runner.invoke(app, ["arch", "no-such-guest-xyz", "--kb", str(tmp_path / "kb.sqlite")])
    assert result.exit_code == 1 and "no running lab guest" in result.output


def test_arch_is_documented() -> None:
    text = DOCS.read_text()
    for needle in ("nephoscope arch", "--json", "--kb", "--pause", "--cr3", "unverifiable", "PTI"):
        assert needle in text, needle
