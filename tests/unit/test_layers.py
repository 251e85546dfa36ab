"""The import rule (docs/architecture.md) holds, and the checker catches what breaks it."""

from __future__ import annotations

from pathlib import Path

from nephoscope.devtools import layers

SRC = Path(__file__).resolve().parents[2] / "src"


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "nephoscope" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_checker_flags_an_upward_import_a_private_name_and_a_peer_face(tmp_path: Path) -> None:
    src = _tree(tmp_path, {
        "__init__.py": "__version__ = '0'\n",
        "memory/paging.py": "from nephoscope.os.linux import model\n",
        "os/linux/model.py": "from nephoscope.memory.roots import _twin\nfrom nephoscope import __version__\n",
        "memory/roots.py": "def _twin(): ...\n",
        "cli/main.py": "import nephoscope.api.app\n",
        "api/app.py": "from nephoscope.service import scan\nscan._hidden()\n",
        "service/scan.py": "from nephoscope.core import errors\nfrom . import _local\n",
    })
    found = {(v.path.relative_to(src / "nephoscope").as_posix(), v.imported) for v in layers.iter_violations(src)}
    assert found == {
        ("memory/paging.py", "nephoscope.os.linux.model"),  # memory below os
        ("os/linux/model.py", "nephoscope.memory.roots._twin"),  # private name of another module
        ("cli/main.py", "nephoscope.api.app"),  # faces are peers
        ("api/app.py", "nephoscope.service.scan._hidden"),  # private attribute through a module
        ("service/scan.py", "nephoscope.service._local"),  # relative import of a private name
    }


def test_the_project_itself_keeps_the_import_rule() -> None:
    found = [str(v) for v in layers.iter_violations(SRC)]
    assert not found, "\n".join(found)
