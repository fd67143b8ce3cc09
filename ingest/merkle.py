"""Merkle trees of RFC 9162 (Certificate Transparency v2, section 2.1) with SHA-256.

The gateway signs one tree head per batch instead of one receipt per envelope; each receipt
carries the inclusion path of its own leaf (docs/protocol.md, section 5). Leaves and inner
nodes are hashed with distinct prefixes (0x00, 0x01), so no inner node can pass for a leaf.
Pure: bytes in, bytes out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Final

HASH_BYTES: Final = 32


class InclusionError(ValueError):
    """An inclusion proof that does not lead from its leaf to any root (wrong shape)."""


def leaf_hash(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def tree(entries: Sequence[bytes]) -> tuple[bytes, list[list[bytes]]]:
    """The root of the tree over ``entries`` and the inclusion path of each entry, leaf first
    (RFC 9162 2.1.1 and 2.1.3.1)."""
    if not entries:
        raise ValueError("a Merkle tree needs at least one entry")
    leaves = [leaf_hash(e) for e in entries]
    paths: list[list[bytes]] = [[] for _ in entries]
    return _subtree(leaves, paths, 0, len(entries)), paths


def _subtree(leaves: Sequence[bytes], paths: list[list[bytes]], lo: int, hi: int) -> bytes:
    """The hash of the subtree over ``leaves[lo:hi]``, appending each leaf's siblings to its
    path. A function of its own, not a closure: a closure that calls itself is a reference
    cycle, which would hold a batch's hashes until the garbage collector ran."""
    if hi - lo == 1:
        return leaves[lo]
    mid = lo + _split(hi - lo)
    left, right = _subtree(leaves, paths, lo, mid), _subtree(leaves, paths, mid, hi)
    for i in range(lo, mid):
        paths[i].append(right)
    for i in range(mid, hi):
        paths[i].append(left)
    return _node(left, right)


def root_from_inclusion(index: int, size: int, leaf: bytes, path: Sequence[bytes]) -> bytes:
    """The root that ``path`` proves ``leaf`` (a leaf hash) to be at ``index`` of a tree of
    ``size`` leaves under (RFC 9162 2.1.3.2); the caller compares it with a signed root.
    Raises :class:`InclusionError` when the path cannot belong to such a tree."""
    if not 0 <= index < size:
        raise InclusionError(f"leaf index {index} outside a tree of {size}")
    if any(len(p) != HASH_BYTES for p in path):
        raise InclusionError(f"inclusion path hashes must be {HASH_BYTES} bytes")
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            raise InclusionError("inclusion path longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = _node(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = _node(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise InclusionError("inclusion path shorter than the tree is deep")
    return r
