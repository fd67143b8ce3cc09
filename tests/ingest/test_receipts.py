"""Receipts: RFC 9162 Merkle trees, COSE Receipts signed once per batch, tampering, hostile input.

The trees are checked against a second, literal transcription of RFC 9162's definitions
(recursive MTH and PATH), and the COSE Receipt's signature against pycose, so neither half
of the scheme is tested only against itself.
"""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Sequence
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given
from hypothesis import strategies as st
from pycose.messages.sign1message import Sign1Message

from ingest import merkle
from ingest import receipts as rc
from ingest.model import Reason, Receipt
from ingest.receipts import (
    MAX_RECEIPT_BYTES,
    MAX_RECEIPT_TREE,
    open_receipt,
    seal_receipt,
    seal_receipts,
)
from ingest.wire import EnvelopeError
from tests.ingest.test_envelope import DEV, FUZZ, cose_key

PROTECTED = b"\xa2\x01\x26\x19\x01\x8b\x01"  # {1: -7, 395: 1}


# --- RFC 9162, transcribed literally ----------------------------------------------------------


def mth(d: Sequence[bytes]) -> bytes:
    """MTH(D[n]) of RFC 9162 2.1.1."""
    if len(d) == 1:
        return hashlib.sha256(b"\x00" + d[0]).digest()
    k = 1
    while k * 2 < len(d):
        k *= 2
    return hashlib.sha256(b"\x01" + mth(d[:k]) + mth(d[k:])).digest()


def path(m: int, d: Sequence[bytes]) -> list[bytes]:
    """PATH(m, D[n]) of RFC 9162 2.1.3.1."""
    if len(d) == 1:
        return []
    k = 1
    while k * 2 < len(d):
        k *= 2
    if m < k:
        return [*path(m, d[:k]), mth(d[k:])]
    return [*path(m - k, d[k:]), mth(d[:k])]


def proves(root: bytes, index: int, size: int, leaf: bytes, proof: list[bytes]) -> bool:
    try:
        return merkle.root_from_inclusion(index, size, leaf, proof) == root
    except merkle.InclusionError:
        return False


def receipts(n: int) -> list[Receipt]:
    return [
        Receipt(f"hub-{i:04d}", i + 1, "accepted", 10, i % 3, 1_700_000_000_000 + i)
        for i in range(n)
    ]


def split(message: bytes) -> tuple[bytes, cbor2.CBORTag, list[Any]]:
    """(receipt entry, COSE Receipt, [size, index, path]) of a receipt message."""
    entry, cose = cbor2.loads(message)
    tagged = cbor2.loads(cose)
    return entry, tagged, cbor2.loads(tagged.value[1][396][-1][0])


def join(entry: bytes, tagged: cbor2.CBORTag, proof: list[Any] | None = None) -> bytes:
    if proof is not None:
        tagged.value[1][396][-1][0] = cbor2.dumps(proof)
    return cbor2.dumps([entry, cbor2.dumps(tagged)])


def signed(entry_obj: Any, key: ec.EllipticCurvePrivateKey, **cose: Any) -> bytes:
    """A receipt message for ``entry_obj`` built by hand (a tree of one), with the COSE
    Receipt's parts overridable, to carry content the codec would never seal."""
    entry = cbor2.dumps(entry_obj)
    protected = cose.get("protected", PROTECTED)
    to_sign = cbor2.dumps(["Signature1", protected, b"", mth([entry])])
    r, s = decode_dss_signature(key.sign(to_sign, ec.ECDSA(hashes.SHA256())))
    parts = [
        protected,
        cose.get("unprotected", {4: b"gateway", 396: {-1: [cbor2.dumps([1, 0, []])]}}),
        cose.get("payload"),
        r.to_bytes(32, "big") + s.to_bytes(32, "big"),
    ]
    return cbor2.dumps([entry, cbor2.dumps(cbor2.CBORTag(18, parts))])


def reason_of(data: bytes, key: ec.EllipticCurvePrivateKey) -> Reason:
    with pytest.raises(EnvelopeError) as info:
        open_receipt(data, key.public_key())
    return info.value.reason


def receipt_obj(**changes: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "v": 1,
        "dev": DEV,
        "seq": 1,
        "status": "accepted",
        "stored": 1,
        "refused": 0,
        "at": 1,
        "reason": None,
        "salt": b"\x07" * 16,
    }
    obj.update(changes)
    return {k: v for k, v in obj.items() if v is not ...}


# --- Merkle trees -----------------------------------------------------------------------------


def test_root_of_one_empty_entry_is_the_known_value() -> None:
    # SHA-256(0x00): the RFC 9162 leaf hash of an empty entry.
    assert merkle.tree([b""])[0].hex() == (
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    )


@FUZZ
@given(st.lists(st.binary(max_size=8), min_size=1, max_size=70))
def test_tree_matches_the_rfc_and_every_path_leads_to_the_root(entries: list[bytes]) -> None:
    root, paths = merkle.tree(entries)
    assert root == mth(entries)
    for i, entry in enumerate(entries):
        assert paths[i] == path(i, entries)
        leaf = merkle.leaf_hash(entry)
        assert merkle.root_from_inclusion(i, len(entries), leaf, paths[i]) == root


@FUZZ
@given(st.integers(2, 40), st.data())
def test_a_path_proves_only_its_own_leaf_and_place(n: int, data: st.DataObject) -> None:
    entries = [b"e%d" % i for i in range(n)]
    root, paths = merkle.tree(entries)
    i = data.draw(st.integers(0, n - 1))
    j = data.draw(st.integers(0, n - 1).filter(lambda j: j != i))
    leaf = merkle.leaf_hash(entries[i])
    assert not proves(root, j, n, leaf, paths[i])  # another place
    assert not proves(root, i, n, leaf, paths[j])  # another leaf's path
    assert not proves(root, i, n, merkle.leaf_hash(entries[j]), paths[i])  # another leaf
    assert proves(root, i, n, leaf, paths[i])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13])
def test_only_entries_of_the_tree_lead_to_its_root(n: int) -> None:
    """The tree size is not under the signature (as in RFC 9942): a path may also fit a
    larger tree with the same root. What it can never do is lead an entry that is not a
    leaf of the tree to the root, whatever size and place it claims."""
    entries = [b"e%d" % i for i in range(n)]
    root, paths = merkle.tree(entries)
    stranger = merkle.leaf_hash(b"not in the tree")
    for i, proof in enumerate(paths):
        for size in range(i + 1, 2 * n + 2):
            for index in range(size):
                assert not proves(root, index, size, stranger, proof)


def test_misshapen_paths_are_refused() -> None:
    entries = [b"a", b"b", b"c", b"d", b"e"]
    _, paths = merkle.tree(entries)
    leaf = merkle.leaf_hash(b"a")
    for index, size, proof in (
        (0, 5, paths[0][:-1]),
        (0, 5, [*paths[0], b"\x00" * 32]),
        (5, 5, paths[0]),
        (-1, 5, paths[0]),
        (0, 0, []),
        (0, 5, [p[:31] for p in paths[0]]),
    ):
        with pytest.raises(merkle.InclusionError):
            merkle.root_from_inclusion(index, size, leaf, proof)
    with pytest.raises(ValueError, match="at least one"):
        merkle.tree([])


# --- receipts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 100, MAX_RECEIPT_TREE, MAX_RECEIPT_TREE + 3])
def test_every_receipt_of_a_batch_opens_alone(key: ec.EllipticCurvePrivateKey, n: int) -> None:
    batch = receipts(n)
    sealed = seal_receipts(batch, key)
    assert [open_receipt(m, key.public_key()) for m in sealed] == batch
    assert max(len(m) for m in sealed) <= MAX_RECEIPT_BYTES
    # One signature per tree of at most MAX_RECEIPT_TREE receipts.
    signatures = {split(m)[1].value[3] for m in sealed}
    assert len(signatures) == -(-n // MAX_RECEIPT_TREE)
    assert {split(m)[2][0] for m in sealed[:MAX_RECEIPT_TREE]} == {min(n, MAX_RECEIPT_TREE)}


def test_sealing_a_batch_of_receipts_leaves_no_garbage_cycles(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    """Whatever a batch allocates is freed by reference counting as soon as it is dropped: a
    self-recursive closure in the Merkle tree kept each batch's hashes for the collector."""
    batch = receipts(100)
    seal_receipts(batch, key)  # warm: first-call caches are not garbage
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        seal_receipts(batch, key)
        merkle.tree([bytes([i]) for i in range(50)])
        assert gc.collect() == 0
    finally:
        if was_enabled:
            gc.enable()


def test_receipt_round_trip_of_each_status(key: ec.EllipticCurvePrivateKey) -> None:
    batch = [
        Receipt(dev=DEV, seq=7, status="accepted", stored=3, refused=0, at_ms=1_700_000_200_000),
        Receipt(DEV, 8, "rejected", 0, 3, 1_700_000_200_001, reason=Reason.NO_CONSENT.value),
        Receipt(DEV, 9, "accepted", 2, 1, 1_700_000_200_002, reason=Reason.NO_CONSENT.value),
    ]
    for receipt, message in zip(batch, seal_receipts(batch, key), strict=True):
        assert open_receipt(message, key.public_key()) == receipt
        assert open_receipt(bytearray(message), key.public_key()) == receipt
        entry = cbor2.loads(split(message)[0])
        assert set(entry) == {"v", "dev", "seq", "status", "stored", "refused", "at", "reason"} | {
            "salt"
        }
    assert seal_receipts([], key) == []


def test_the_receipt_header_bytes_are_the_named_constants() -> None:
    assert PROTECTED == rc._PROTECTED_RECEIPT
    # In a one-entry map, the head and one proof make {396: {-1: [proof]}}.
    proofs = cbor2.loads(b"\xa1" + rc._RECEIPT_PROOFS_HEAD + cbor2.dumps(b"p"))
    assert proofs == {396: {-1: [b"p"]}}


def test_the_wire_form_is_a_cose_receipt(key: ec.EllipticCurvePrivateKey) -> None:
    sealed = seal_receipts(receipts(3), key, kid="gw-2")
    entries = [split(m)[0] for m in sealed]
    _, tagged, proof = split(sealed[1])
    protected, unprotected, payload, signature = tagged.value
    assert tagged.tag == 18
    assert cbor2.loads(protected) == {1: -7, 395: 1}
    assert set(unprotected) == {4, 396}
    assert unprotected[4] == b"gw-2"
    assert payload is None
    assert len(signature) == 64
    assert proof == [3, 1, path(1, entries)]


def test_pycose_verifies_the_tree_head_with_the_root_as_detached_payload(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    sealed = seal_receipts(receipts(5), key)
    entries = [split(m)[0] for m in sealed]
    for message in sealed:
        _, tagged, (size, index, proof) = split(message)
        root = merkle.root_from_inclusion(index, size, merkle.leaf_hash(entries[index]), proof)
        assert root == mth(entries)
        cose = Sign1Message.decode(cbor2.dumps(tagged))
        cose.key = cose_key(key, private=False)
        cose.payload = root
        assert cose.verify_signature()


def test_identical_receipts_are_unlinkable(key: ec.EllipticCurvePrivateKey) -> None:
    """Each entry has its own salt: a hub cannot recognise another hub's receipt by hashing
    guesses against the sibling hashes of its own path."""
    one = Receipt(DEV, 1, "accepted", 1, 0, 1)
    entries = [split(m)[0] for m in seal_receipts([one, one], key)]
    entries.append(split(seal_receipt(one, key))[0])
    assert len(set(entries)) == 3
    assert len({cbor2.loads(e)["salt"] for e in entries}) == 3


def test_forged_receipt_is_refused(
    key: ec.EllipticCurvePrivateKey, other_key: ec.EllipticCurvePrivateKey
) -> None:
    forged = seal_receipt(Receipt(DEV, 7, "accepted", 3, 0, 1), other_key)
    assert reason_of(forged, key) is Reason.BAD_SIGNATURE


def test_tampered_receipt_is_refused(key: ec.EllipticCurvePrivateKey) -> None:
    data = bytearray(seal_receipt(Receipt(DEV, 7, "rejected", 0, 3, 1, "no_consent"), key))
    at = data.index(b"rejected")
    data[at : at + 8] = b"accepted"
    assert reason_of(bytes(data), key) is Reason.BAD_SIGNATURE


def test_proofs_do_not_move_between_receipts(key: ec.EllipticCurvePrivateKey) -> None:
    batch = seal_receipts(receipts(6), key)
    entry_2, tagged_2, proof_2 = split(batch[2])
    _, tagged_3, proof_3 = split(batch[3])
    other_batch = split(seal_receipts(receipts(6), key)[2])[1]
    size, index, hashes = proof_2
    for forged in (
        join(entry_2, tagged_3),  # another receipt's proof and signature
        join(entry_2, other_batch),  # the same place in another batch
        join(entry_2, tagged_2, [size, 3, hashes]),  # claims another place
        join(entry_2, tagged_2, [size, index, proof_3[2]]),  # another leaf's path
        join(entry_2, tagged_2, [size, index, hashes[:-1]]),  # path too short
        join(entry_2, tagged_2, [size, index, [*hashes, b"\x00" * 32]]),  # path too long
        join(entry_2, tagged_2, [size, index, [hashes[0][:31], *hashes[1:]]]),  # short hash
        join(entry_2, tagged_2, [size, size, hashes]),  # index outside the tree
    ):
        assert reason_of(forged, key) is Reason.BAD_SIGNATURE
    assert open_receipt(join(entry_2, tagged_2, proof_2), key.public_key()).seq == 3


@pytest.mark.parametrize(
    ("obj", "cose"),
    [
        pytest.param(receipt_obj(status=...), {}, id="missing-keys"),
        pytest.param(receipt_obj(status="maybe"), {}, id="unknown-status"),
        pytest.param(receipt_obj(status="rejected", refused=1), {}, id="rejected-without-reason"),
        pytest.param(receipt_obj(stored=-1), {}, id="negative-count"),
        pytest.param(receipt_obj(salt=...), {}, id="no-salt"),
        pytest.param(receipt_obj(salt=b"\x01" * 15), {}, id="short-salt"),
        pytest.param(receipt_obj(salt="x" * 16), {}, id="text-salt"),
        pytest.param(receipt_obj(extra=1), {}, id="unknown-key"),
        pytest.param(receipt_obj(), {"protected": b"\xa1\x01\x26"}, id="no-vds"),
        pytest.param(receipt_obj(), {"payload": b"root"}, id="attached-payload"),
        pytest.param(receipt_obj(), {"unprotected": {4: b"gateway"}}, id="no-proofs"),
        pytest.param(
            receipt_obj(),
            {"unprotected": {4: b"gateway", 396: {-1: [cbor2.dumps([1, 0, []])]}, 5: b""}},
            id="extra-header",
        ),
        pytest.param(
            receipt_obj(),
            {"unprotected": {4: b"gateway", 396: {-1: [cbor2.dumps([1, 0, []])] * 2}}},
            id="two-proofs",
        ),
        pytest.param(
            receipt_obj(),
            {"unprotected": {4: b"gateway", 396: {-2: [cbor2.dumps([1, 0, []])]}}},
            id="consistency-proof",
        ),
        pytest.param(
            receipt_obj(),
            {"unprotected": {4: b"gateway", 396: {-1: [cbor2.dumps([0, 0, []])]}}},
            id="empty-tree",
        ),
        pytest.param(
            receipt_obj(),
            {"unprotected": {4: b"gateway", 396: {-1: [cbor2.dumps([1, "0", []])]}}},
            id="text-index",
        ),
        pytest.param(
            receipt_obj(),
            {"unprotected": {4: b"gateway", 396: {-1: [cbor2.dumps([1, 0, ["h"]])]}}},
            id="text-hash",
        ),
        pytest.param(
            receipt_obj(),
            {"unprotected": {4: "gateway", 396: {-1: [cbor2.dumps([1, 0, []])]}}},
            id="text-kid",
        ),
    ],
)
def test_malformed_receipt_is_refused(
    key: ec.EllipticCurvePrivateKey, obj: Any, cose: dict[str, Any]
) -> None:
    assert reason_of(signed(obj, key, **cose), key) is Reason.MALFORMED


def test_hand_built_receipt_opens(key: ec.EllipticCurvePrivateKey) -> None:
    """The builder of the malformed cases makes valid receipts when nothing is changed."""
    assert open_receipt(signed(receipt_obj(), key), key.public_key()) == Receipt(
        DEV, 1, "accepted", 1, 0, 1
    )


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x82\x41a", id="truncated"),
        pytest.param(cbor2.dumps([b"a"]), id="one-part"),
        pytest.param(cbor2.dumps([b"a", b"b", b"c"]), id="three-parts"),
        pytest.param(cbor2.dumps(["a", b"b"]), id="text-entry"),
        pytest.param(cbor2.dumps([b"a", b"b"]), id="cose-not-cbor"),
        pytest.param(cbor2.dumps([b"a", cbor2.dumps([1, 2, 3, 4])]), id="cose-untagged"),
        pytest.param(cbor2.dumps(cbor2.CBORTag(18, [b"", {}, b"", b""])), id="a-sign1"),
    ],
)
def test_garbage_is_malformed(key: ec.EllipticCurvePrivateKey, data: bytes) -> None:
    assert reason_of(data, key) is Reason.MALFORMED


def test_oversized_receipt_is_refused_before_parsing(key: ec.EllipticCurvePrivateKey) -> None:
    assert reason_of(b"\x00" * (MAX_RECEIPT_BYTES + 1), key) is Reason.TOO_LARGE
    with pytest.raises(EnvelopeError) as info:
        open_receipt("text", key.public_key())  # type: ignore[arg-type]
    assert info.value.reason is Reason.MALFORMED


def test_sealing_checks_what_it_signs(key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(EnvelopeError):
        seal_receipt(Receipt(DEV, 1, "rejected", 0, 1, 1), key)
    with pytest.raises(EnvelopeError):
        seal_receipts(
            [Receipt(DEV, 1, "accepted", 1, 0, 1), Receipt("bad/dev", 2, "x", 0, 0, 1)], key
        )
    with pytest.raises(TypeError):
        seal_receipt(Receipt(DEV, 1, "accepted", 1, 0, 1), ec.generate_private_key(ec.SECP384R1()))
