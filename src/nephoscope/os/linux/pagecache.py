"""Read a file's bytes from the guest's page cache: inode->i_mapping->i_pages (an xarray of pages/folios).

Given a `struct file`, `inode` or `address_space` (kernel gvas, e.g. a VMA's vm_file or an fd's file), the
reader walks the mapping's xarray, checks every node (shift, offset, parent, count) and every page it
names (page->mapping points back at this address_space, page->index is the index it is stored at,
PG_uptodate is set), and copies the cached pages out of guest-physical memory: pfn = (page gva -
vmemmap_base) / sizeof(struct page). Pages that are not cached (never read, evicted: a NULL slot or a
workingset shadow entry) are reported as `absent` and zero-filled in `data`: a hash over them is
unverifiable, never guessed. Everything is bounded (bytes, nodes, revisits) and every member comes from
BTF. Kernel drift: 6.1 stores struct page pointers; 5.16+ page cache holds folios, and large folios
(multi-index entries, sibling slots) are used by 6.12 file systems (tmpfs, and others); a folio is a
struct page (its head) and its pages are physically contiguous, so both are read the same way here.

Nothing here pauses the VM; on a running guest, read under `LinuxKernel.paused()` for a consistent copy.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nephoscope.core.errors import GuestDataError, MemoryAccessError

if TYPE_CHECKING:
    from nephoscope.os.linux.model import LinuxKernel, Offsets

PAGE = 4096
PAGE_SHIFT = 12
DEFAULT_MAX_BYTES = 64 << 20
DEFAULT_MAX_NODES = 1 << 14
# include/linux/xarray.h: an internal entry is (v << 2) | 2; sibling entries are internal entries below
# XA_CHUNK_SIZE; node pointers are internal entries above 4096 (xa_is_node); value entries (shadow entries of
# evicted pages, swap entries) have bit 0 set
XA_RETRY_ENTRY, XA_ZERO_ENTRY = 0x402, 0x406
WANTED = {
    "file": ["f_inode", "f_mapping"],
    "inode": ["i_mapping", "i_size", "i_ino", "i_mode"],
    "address_space": ["host", "i_pages", "nrpages?"],
    "xarray": ["xa_head"],
    "xa_node": ["shift", "offset", "count", "parent", "slots"],
    "page": ["flags", "mapping", "index"],
    # path lookup in the dentry cache: children on d_subdirs/d_child (6.1) or d_children/d_sib (6.8+)
    "dentry": ["d_name", "d_inode", "d_parent", "d_subdirs?", "d_child?", "d_children?", "d_sib?"],
    "qstr": ["len", "name"],
}
MAX_CHILDREN = 1 << 16
_BAD = (MemoryAccessError, GuestDataError)


@dataclass(frozen=True, slots=True)
class CachedFile:
    """A file's bytes as the page cache holds them; absent pages are zero-filled and listed."""

    mapping_gva: int
    inode_gva: int
    size: int  # i_size in bytes
    data: bytes  # min(size, max_bytes) bytes
    absent: tuple[int, ...]  # page indices (of data) not in the page cache or not up to date
    truncated: bool  # the file is larger than max_bytes: data is its beginning only
    problem: str = ""  # why the walk stopped (the mapping is garbage or changed under us); "" if it did not

    @property
    def complete(self) -> bool:
        """Return whether `data` is the whole file, every page read from the cache."""
        return not self.absent and not self.truncated and not self.problem

    @property
    def why_incomplete(self) -> str:
        """Return why the bytes are not the whole file ("" when complete)."""
        if self.problem:
            return self.problem
        parts = []
        if self.absent:
            parts.append(f"{len(self.absent)} of {-(-len(self.data) // PAGE)} pages not in the page cache")
        if self.truncated:
            parts.append(f"file of {self.size} bytes is larger than the {len(self.data)}-byte read cap")
        return "; ".join(parts)


class _Layout:
    """The page-cache members of one kernel, resolved from its type information once."""

    def __init__(self, k: LinuxKernel) -> None:
        from nephoscope.os.linux.model import Offsets

        self.off: Offsets = Offsets(k.types, WANTED, k.info.release or "unknown kernel")
        self.page_size = self.off.size["page"]
        self.chunk = self.off.count.get("xa_node.slots", 0)
        if self.chunk not in (16, 64) or not 32 <= self.page_size <= 256:
            raise GuestDataError(f"kernel {k.info.release}: impossible page-cache layout (xa_node.slots "
                                 f"{self.chunk}, struct page {self.page_size} bytes)")
        flags = k.types.enum_values("pageflags") or {}
        self.uptodate_bit = flags.get("PG_uptodate")
        self.vmemmap = k.info.vmemmap_base


def layout(k: LinuxKernel) -> _Layout:
    """Return (and cache on the model) the page-cache layout of kernel `k`."""
    cached = getattr(k, "_pagecache_layout", None)
    if cached is None:
        cached = _Layout(k)
        k._pagecache_layout = cached  # type: ignore[attr-defined]
    return cached


def mapping_of(k: LinuxKernel, gva: int, kind: str = "file") -> tuple[int, int]:
    """Return (address_space gva, inode gva) of a struct file, inode or address_space at kernel gva.

    Raise GuestDataError when the structures do not point back at each other (mapping->host is the inode,
    inode->i_mapping the mapping).
    """
    off = layout(k).off
    if kind == "file":
        inode = k.u64(gva + off["file.f_inode"])
        mapping = k.u64(gva + off["file.f_mapping"])
    elif kind == "inode":
        inode, mapping = gva, k.u64(gva + off["inode.i_mapping"])
    elif kind == "mapping":
        mapping, inode = gva, k.u64(gva + off["address_space.host"])
    else:
        raise ValueError(f"kind must be file, inode or mapping, not {kind!r}")
    if not mapping or not inode:
        raise GuestDataError(f"{kind} 0x{gva:x} has no inode or mapping")
    host = k.u64(mapping + off["address_space.host"])
    if host != inode or k.u64(inode + off["inode.i_mapping"]) != mapping:
        # a block device's file maps the bdev inode: f_mapping is not f_inode's own i_mapping, but the
        # mapping's host still owns it
        if kind == "file" and host and k.u64(host + off["inode.i_mapping"]) == mapping:
            return mapping, host
        raise GuestDataError(f"address_space 0x{mapping:x} and inode 0x{inode:x} do not point at each other")
    return mapping, inode


def read_cached_file(k: LinuxKernel, gva: int, kind: str = "file", *, max_bytes: int = DEFAULT_MAX_BYTES,
                     max_nodes: int = DEFAULT_MAX_NODES) -> CachedFile:
    """Return the page-cache copy of the file behind a struct file/inode/address_space at kernel gva.

    Raise GuestDataError (or MemoryAccessError) only when the file's own structures are unreadable or do
    not point at each other; a broken page tree gives a CachedFile with `problem` set. Does not pause.
    """
    lay = layout(k)
    off = lay.off
    mapping, inode = mapping_of(k, gva, kind)
    size = int.from_bytes(k.read(inode + off["inode.i_size"], 8), "little", signed=True)
    if size < 0:
        raise GuestDataError(f"inode 0x{inode:x} has a negative size {size}")
    want = min(size, max_bytes)
    npages = -(-want // PAGE)
    buf = bytearray(want)
    have: set[int] = set()
    problem = ""
    try:
        for index, page_gva in _iter_pages(k, lay, mapping, npages, max_nodes):
            if index in have:
                problem = f"page index {index} stored twice in the mapping's xarray"
                break
            data = _page_bytes(k, lay, mapping, page_gva, index)
            if data is None:
                continue
            start = index * PAGE
            buf[start:start + PAGE] = data[:max(0, want - start)]
            have.add(index)
    except _BAD as exc:
        problem = f"page cache of inode 0x{inode:x} unreadable ({exc})"
    absent = tuple(i for i in range(npages) if i not in have)
    return CachedFile(mapping, inode, size, bytes(buf), absent, size > max_bytes, problem)


def cached_page_index(k: LinuxKernel, gva: int, kind: str = "file", *, max_pages: int,
                      max_nodes: int = DEFAULT_MAX_NODES) -> tuple[int, dict[int, int]]:
    """Return (address_space gva, {page index: struct page gva}) of the cached pages below `max_pages`.

    For reading a few pages of a large file (a shmem segment) by index with `read_cached_page`; `gva` is a
    kernel gva of a struct file/inode/address_space. Raise GuestDataError (or MemoryAccessError) when the
    structures or the page tree do not validate. Does not pause.
    """
    lay = layout(k)
    mapping, _inode = mapping_of(k, gva, kind)
    index: dict[int, int] = {}
    for i, page_gva in _iter_pages(k, lay, mapping, max_pages, max_nodes):
        if i in index:
            raise GuestDataError(f"page index {i} stored twice in the mapping's xarray")
        index[i] = page_gva
    return mapping, index


def read_cached_page(k: LinuxKernel, mapping: int, page_gva: int, index: int) -> bytes | None:
    """Return the 4 KiB of page `index` (struct page at kernel gva `page_gva`) of `mapping`, None if not up to date.

    The page is checked like every page of `read_cached_file` (mapping, index). Does not pause.
    """
    return _page_bytes(k, layout(k), mapping, page_gva, index)


def _iter_pages(k: LinuxKernel, lay: _Layout, mapping: int, npages: int, max_nodes: int):  # type: ignore[no-untyped-def]
    """Yield (page index, struct page gva of that index) for cached pages below `npages`."""
    off = lay.off
    chunk = lay.chunk
    chunk_shift = chunk.bit_length() - 1
    head = k.u64(mapping + off["address_space.i_pages"] + off["xarray.xa_head"])
    if not head or npages == 0:
        return
    if not _is_node(head):  # a single entry at index 0 is stored in xa_head itself
        if _is_page(head):
            yield 0, head
        return
    node_size = off.size["xa_node"]
    # (node gva, first index it covers, parent node gva, parent shift, slot in parent)
    stack = [(head - 2, 0, 0, -1, 0)]
    seen: set[int] = set()
    while stack:
        node, first, parent, parent_shift, slot_in_parent = stack.pop()
        if node in seen:
            raise GuestDataError(f"xarray node 0x{node:x} revisited (a cycle)")
        if len(seen) >= max_nodes:
            raise GuestDataError(f"more than {max_nodes} xarray nodes")
        seen.add(node)
        k.budget.node()
        blob = k.read(node, node_size)
        shift = blob[off["xa_node.shift"]]
        if shift % chunk_shift or shift >= 64 or (parent_shift >= 0 and shift != parent_shift - chunk_shift):
            raise GuestDataError(f"xarray node 0x{node:x} has shift {shift} (parent shift {parent_shift})")
        if blob[off["xa_node.offset"]] != slot_in_parent and parent_shift >= 0:
            raise GuestDataError(f"xarray node 0x{node:x} claims slot {blob[off['xa_node.offset']]}, "
                                 f"is slot {slot_in_parent}")
        if _field(off, blob, "xa_node.parent") != parent:
            raise GuestDataError(f"xarray node 0x{node:x} names another parent")
        slots = struct.unpack_from(f"<{chunk}Q", blob, off["xa_node.slots"])
        used = sum(1 for e in slots if e)
        if blob[off["xa_node.count"]] < used - sum(1 for e in slots if _is_sibling(e, chunk)) or \
                blob[off["xa_node.count"]] > chunk:
            raise GuestDataError(f"xarray node 0x{node:x} counts {blob[off['xa_node.count']]} entries, holds {used}")
        span = 1 << shift
        children = []
        owner: tuple[int, int] | None = None  # (first index, page gva) of the entry sibling slots continue
        for i, entry in enumerate(slots):
            index = first + i * span
            if index >= npages:
                break
            if not entry or entry & 1:  # empty, or a shadow/value entry: not cached
                owner = None
                continue
            if _is_sibling(entry, chunk):
                if owner is None or entry >> 2 >= i:
                    raise GuestDataError(f"xarray node 0x{node:x} slot {i}: a sibling entry with no entry before it")
                base_index, page_gva = owner
                for j in range(span):
                    if index + j < npages:
                        yield index + j, page_gva + (index + j - base_index) * lay.page_size
                continue
            if _is_node(entry):
                if shift == 0:
                    raise GuestDataError(f"xarray node 0x{node:x} of shift 0 holds a node pointer")
                children.append((entry - 2, index, node, shift, i))
                owner = None
                continue
            if entry in (XA_RETRY_ENTRY, XA_ZERO_ENTRY) or entry & 3:
                owner = None
                continue  # a slot being changed: not cached for us
            owner = (index, entry)
            for j in range(span):  # a multi-index entry (a large folio) covers `span` indices
                if index + j < npages:
                    yield index + j, entry + j * lay.page_size
        stack.extend(reversed(children))


def _field(off: Offsets, blob: bytes, key: str) -> int:
    try:
        return int(struct.unpack_from("<Q", blob, off[key])[0])
    except struct.error:
        raise GuestDataError(f"{key} at {off[key]} does not fit a {len(blob)}-byte struct") from None


def _is_node(entry: int) -> bool:
    return entry & 3 == 2 and entry > 4096


def _is_sibling(entry: int, chunk: int) -> bool:
    return entry & 3 == 2 and (entry >> 2) < chunk


def _is_page(entry: int) -> bool:
    return entry & 3 == 0 and entry >> 63 == 1


def _page_bytes(k: LinuxKernel, lay: _Layout, mapping: int, page_gva: int, index: int) -> bytes | None:
    """Return the 4 KiB of cached page `page_gva` holding file page `index`, None if it is not up to date.

    The head page of a folio carries mapping and index; a tail page of a large folio is checked through
    its head (compound_head: bit 0 of page->compound_head, which shares the word with lru.next).
    """
    off = lay.off
    if not _is_page(page_gva) or (page_gva - lay.vmemmap) % lay.page_size or page_gva < lay.vmemmap:
        raise GuestDataError(f"xarray entry 0x{page_gva:x} is not a struct page in vmemmap")
    pfn = (page_gva - lay.vmemmap) // lay.page_size
    if pfn >= 1 << 40:
        raise GuestDataError(f"struct page 0x{page_gva:x} is beyond any physical memory")
    head = page_gva
    # struct page's second word is compound_head (bit 0 set on tail pages, the head's address | 1)
    second = k.u64(page_gva + 8)
    if second & 1:
        head = second - 1
    blob = k.read(head, lay.page_size)
    if _field(off, blob, "page.mapping") != mapping:
        raise GuestDataError(f"struct page 0x{head:x} at index {index} belongs to another mapping")
    head_index = _field(off, blob, "page.index")
    if head_index + (page_gva - head) // lay.page_size != index:
        raise GuestDataError(f"struct page 0x{page_gva:x} says index {head_index}, stored at index {index}")
    if lay.uptodate_bit is not None and not _field(off, blob, "page.flags") >> lay.uptodate_bit & 1:
        return None  # being read from disk: its bytes are not the file's yet
    k.budget.read(PAGE)
    return k.phys.read(pfn << PAGE_SHIFT, PAGE)


def lookup_dentry(k: LinuxKernel, root: int, path: str) -> int | None:
    """Return the dentry gva of absolute `path` below dentry `root` in the dentry cache, None if not cached.

    Only cached dentries are found (a file read recently is); mount points below `root` are not crossed.
    Raise GuestDataError for a child list that loops or is absurdly long.
    """
    off = layout(k).off
    dentry = root
    for name in [p for p in path.split("/") if p]:
        dentry = _child(k, off, dentry, name.encode())
        if dentry is None:
            return None
    return dentry


def _child(k: LinuxKernel, off: Offsets, parent: int, name: bytes) -> int | None:
    if "dentry.d_children" in off:  # 6.8+ (commit da549bdd15c2): hlist of children linked by d_sib
        node, link = k.u64(parent + off["dentry.d_children"]), off["dentry.d_sib"]
        head = 0
    else:
        head = parent + off["dentry.d_subdirs"]
        node, link = k.u64(head), off["dentry.d_child"]
    seen = 0
    while node and node != head:
        seen += 1
        if seen > MAX_CHILDREN:
            raise GuestDataError(f"dentry 0x{parent:x} has more than {MAX_CHILDREN} children (a loop?)")
        k.budget.node()
        child = node - link
        qstr = child + off["dentry.d_name"]
        length = k.u32(qstr + off["qstr.len"])
        if length == len(name) and k.u64(child + off["dentry.d_parent"]) == parent and \
                k.read(k.u64(qstr + off["qstr.name"]), length) == name:
            return child
        node = k.u64(node)
    return None


def inode_is_symlink(k: LinuxKernel, inode: int) -> bool:
    """Return whether an inode is a symbolic link (S_IFLNK in i_mode)."""
    mode = int.from_bytes(k.read(inode + layout(k).off["inode.i_mode"], 2), "little")
    return mode & 0o170000 == 0o120000


def dentry_inode(k: LinuxKernel, dentry: int) -> int:
    """Return the inode gva of a dentry (0 for a negative dentry)."""
    return k.u64(dentry + layout(k).off["dentry.d_inode"])


def file_inode_number(k: LinuxKernel, file_gva: int) -> int:
    """Return i_ino of the inode behind a struct file at kernel gva."""
    off = layout(k).off
    return k.u64(k.u64(file_gva + off["file.f_inode"]) + off["inode.i_ino"])


__all__ = ["CachedFile", "dentry_inode", "file_inode_number", "inode_is_symlink", "layout", "lookup_dentry",
           "mapping_of", "read_cached_file"]
