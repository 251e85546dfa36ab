"""The committed PHP 8.2 layout equals what an offsetof() program compiled against Debian's php8.2-dev prints."""

from __future__ import annotations

import shutil

import pytest

from nephoscope.core.errors import KnowledgeError
from nephoscope.core.paths import cache_root
from nephoscope.introspect.interp import php_layout

DEV_VERSION = "8.2.36-1~deb12u1"  # the headers the table was derived from (any 8.2 patch release keeps the ABI)


@pytest.fixture(scope="module")
def php82_headers():  # type: ignore[no-untyped-def]
    if shutil.which("gcc") is None:
        pytest.skip("no C compiler on this host")
    from nephoscope.knowledge.debian import archive

    try:
        deb = archive.download("php8.2-dev", DEV_VERSION, cache_root() / "debs")
        root = archive.unpack(deb, cache_root() / "unpacked") / "root"
    except KnowledgeError as exc:
        pytest.skip(f"php8.2-dev {DEV_VERSION} cannot be fetched: {exc}")
    return root / "usr/include/php/20220829"


def test_the_committed_table_is_what_the_headers_say(php82_headers) -> None:  # type: ignore[no-untyped-def]
    derived = php_layout.derive_layout(php82_headers)
    assert derived == php_layout.PHP82_NTS
    assert php_layout.LAYOUTS[(derived["const.ZEND_EXTENSION_API_NO"], "NTS")] is php_layout.PHP82_NTS


def test_a_missing_compiler_is_a_knowledge_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(KnowledgeError):
        php_layout.derive_layout(tmp_path, cc=str(tmp_path / "no-such-cc"))
