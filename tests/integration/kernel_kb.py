"""A temporary KB holding the kernel package a lab guest booted (kernelpkg.ingest_kernel_tree), for the kernel
code tests; the default KB is left alone."""

from __future__ import annotations

from pathlib import Path

from nephoscope.knowledge.binaries import CodePageDB, PackageMeta
from nephoscope.knowledge.kernelpkg import ingest_kernel_tree


def kernel_kb(manifest: dict, path: Path) -> Path:
    """Create a KB at `path` holding the kernel package a lab manifest names; return its path."""
    db = CodePageDB.open(path)
    kernel = manifest["kernel"]
    root = Path(kernel["source"]).parent.parent  # .../unpacked/<deb>/root/boot/vmlinuz-*
    package_id = db.package_id(PackageMeta(kernel["package"], kernel["version"], "amd64"))
    _added, errors = ingest_kernel_tree(db.kernel_store(), package_id, root)
    assert not errors, errors[:3]
    db.commit()
    db.close()
    return path
