"""Receipts: the gateway's signed answers to envelopes (docs/protocol.md section 5).

The gateway signs the receipts of a batch together: one ES256 signature over the root of an
RFC 9162 Merkle tree of the batch's receipts, and each receipt travels with its inclusion
proof as a COSE Receipt (RFC 9942). Pure: receipts and keys in, bytes out, and back.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Final

import cbor2
from cryptography.hazmat.primitives.asymmetric import ec

from ingest import merkle
from ingest.cose import (
    ALG_ES256,
    COSE_SIGN1_TAG,
    HEADER_ALG,
    HEADER_KID,
    SIGNATURE_BYTES,
    bstr,
    check_signing_key,
    es256_signature,
    sig_structure,
    uint,
    verify_sign1,
)
from ingest.model import Reason, Receipt
from ingest.wire import (
    Buffer,
    EnvelopeError,
    check_device_id,
    check_keys,
    int_field,
    is_int,
    loads,
    text,
    within,
)

# Receipts keep their own schema version: envelopes' payload versions do not change them.
RECEIPT_VERSION: Final = 1
# A receipt message is about 520 bytes with the inclusion proof of a full tree (9 hashes of
# 32 bytes); 1 KiB leaves room for a long device id and reason code and nothing more.
MAX_RECEIPT_BYTES: Final = 1024
# Receipts signed under one tree head: at most 512, so an inclusion path has at most 9 hashes.
MAX_RECEIPT_TREE: Final = 512
# Random bytes in every receipt, so that a hub cannot recover another hub's receipt (who sent
# what, and when) from the sibling hashes of its own inclusion path.
RECEIPT_SALT_BYTES: Final = 16
MAX_REASON_BYTES: Final = 64
# COSE Receipts (RFC 9942): the verifiable data structure (protected) and its proofs
# (unprotected); RFC9162_SHA256 is structure 1, and its inclusion proofs are proof type -1.
HEADER_VDS: Final = 395
HEADER_VDP: Final = 396
VDS_RFC9162_SHA256: Final = 1
VDP_INCLUSION: Final = -1
GATEWAY_KID: Final = "gateway"

RECEIPT_ACCEPTED: Final = "accepted"
RECEIPT_REJECTED: Final = "rejected"

# A receipt tree head's: {1: -7, 395: 1} (alg: ES256, vds: RFC9162_SHA256).
_PROTECTED_RECEIPT: Final = cbor2.dumps({HEADER_ALG: ALG_ES256, HEADER_VDS: VDS_RFC9162_SHA256})
# In a COSE Receipt's unprotected map, after the kid: 396: {-1: [ (one inclusion proof).
_RECEIPT_PROOFS_HEAD: Final = (
    cbor2.dumps(HEADER_VDP) + b"\xa1" + cbor2.dumps(VDP_INCLUSION) + b"\x81"
)
_RECEIPT_KEYS: Final = frozenset(
    {"v", "dev", "seq", "status", "stored", "refused", "at", "reason", "salt"}
)
_RECEIPT_STATUSES: Final = frozenset({RECEIPT_ACCEPTED, RECEIPT_REJECTED})


def seal_receipts(
    receipts: Sequence[Receipt], key: ec.EllipticCurvePrivateKey, *, kid: str = GATEWAY_KID
) -> list[bytes]:
    """Sign ``receipts`` with the gateway's key, one signature per ``MAX_RECEIPT_TREE`` of
    them: the receipt messages, in order, each opening with :func:`open_receipt` alone."""
    check_signing_key(key)
    kid_bytes = check_device_id(kid).encode("ascii")
    out: list[bytes] = []
    for start in range(0, len(receipts), MAX_RECEIPT_TREE):
        chunk = receipts[start : start + MAX_RECEIPT_TREE]
        salt, n = os.urandom(RECEIPT_SALT_BYTES * len(chunk)), RECEIPT_SALT_BYTES
        entries = [
            cbor2.dumps(_receipt_to_obj(r, salt[i * n : (i + 1) * n])) for i, r in enumerate(chunk)
        ]
        root, paths = merkle.tree(entries)
        signature = es256_signature(key, sig_structure(_PROTECTED_RECEIPT, root))
        # The COSE Receipt, encoded by hand around the one part that differs per receipt
        # (its proof): the same bytes cbor2 writes for
        # 18([protected, {4: kid, 396: {-1: [proof]}}, nil, signature]).
        head = (
            b"\xd2\x84"
            + bstr(_PROTECTED_RECEIPT)
            + b"\xa2\x04"
            + bstr(kid_bytes)
            + _RECEIPT_PROOFS_HEAD
        )
        tail = b"\xf6" + bstr(signature)
        size = uint(len(chunk))
        for i, (entry, path) in enumerate(zip(entries, paths, strict=True)):
            # [size, index, path]: a path has at most 9 hashes, so its array head is one byte.
            hashes = b"".join(b"\x58\x20" + h for h in path)
            proof = b"\x83" + size + uint(i) + bytes([0x80 | len(path)]) + hashes
            out.append(b"\x82" + bstr(entry) + bstr(head + bstr(proof) + tail))
    return out


def seal_receipt(
    receipt: Receipt, key: ec.EllipticCurvePrivateKey, *, kid: str = GATEWAY_KID
) -> bytes:
    """Sign one receipt with the gateway's key (a tree of one)."""
    return seal_receipts([receipt], key, kid=kid)[0]


def open_receipt(
    data: Buffer,
    public_key: ec.EllipticCurvePublicKey,
    *,
    max_size: int = MAX_RECEIPT_BYTES,
) -> Receipt:
    """Decode a receipt message and verify it against the gateway's key: its inclusion proof
    leads to a root, and the signature covers that root. Nothing of the receipt is trusted
    (or even decoded) before both hold."""
    raw = within(data, max_size)
    message = loads(raw, "receipt message")
    if (
        not isinstance(message, list)
        or len(message) != 2
        or not all(isinstance(part, bytes) for part in message)
    ):
        raise EnvelopeError(Reason.MALFORMED, "receipt message must be [bstr, bstr]")
    entry, cose = message
    signature, size, index, path = _open_cose_receipt(cose)
    try:
        root = merkle.root_from_inclusion(index, size, merkle.leaf_hash(entry), path)
    except merkle.InclusionError as exc:
        raise EnvelopeError(Reason.BAD_SIGNATURE, f"inclusion proof: {exc}") from None
    verify_sign1(_PROTECTED_RECEIPT, root, signature, public_key)
    return _receipt_from_obj(loads(entry, "receipt"))


def _open_cose_receipt(data: bytes) -> tuple[bytes, int, int, list[bytes]]:
    """A COSE Receipt's signature and inclusion proof (tree size, leaf index, path)."""
    message = loads(data, "COSE receipt", tag=COSE_SIGN1_TAG)
    parts = message.value if isinstance(message, cbor2.CBORTag) else None
    if not isinstance(parts, list) or len(parts) != 4:
        raise EnvelopeError(Reason.MALFORMED, "COSE receipt must be a tagged array of 4")
    protected, unprotected, payload, signature = parts
    if protected != _PROTECTED_RECEIPT:
        raise EnvelopeError(
            Reason.MALFORMED, "COSE receipt protected header must be {1: -7, 395: 1}"
        )
    if not isinstance(unprotected, dict) or set(unprotected) != {HEADER_KID, HEADER_VDP}:
        raise EnvelopeError(Reason.MALFORMED, "COSE receipt unprotected header: {4, 396}")
    if not isinstance(unprotected[HEADER_KID], bytes):
        raise EnvelopeError(Reason.MALFORMED, "kid must be a bstr")
    proofs = unprotected[HEADER_VDP]
    if not isinstance(proofs, dict) or set(proofs) != {VDP_INCLUSION}:
        raise EnvelopeError(Reason.MALFORMED, "COSE receipt proofs must be {-1: [proof]}")
    inclusion = proofs[VDP_INCLUSION]
    if not isinstance(inclusion, list) or len(inclusion) != 1 or type(inclusion[0]) is not bytes:
        raise EnvelopeError(Reason.MALFORMED, "COSE receipt must carry one inclusion proof")
    if payload is not None:
        raise EnvelopeError(Reason.MALFORMED, "COSE receipt payload must be detached (nil)")
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise EnvelopeError(Reason.MALFORMED, "signature must be a 64-byte bstr (r||s)")
    proof = loads(inclusion[0], "inclusion proof")
    if not isinstance(proof, list) or len(proof) != 3:
        raise EnvelopeError(Reason.MALFORMED, "inclusion proof must be [size, index, path]")
    size, index, path = proof
    if not is_int(size) or not 1 <= size <= MAX_RECEIPT_TREE or not is_int(index):
        raise EnvelopeError(Reason.MALFORMED, f"inclusion proof size must be 1-{MAX_RECEIPT_TREE}")
    if not isinstance(path, list) or not all(type(h) is bytes for h in path):
        raise EnvelopeError(Reason.MALFORMED, "inclusion path must be an array of bstr")
    return signature, size, index, path


def _receipt_to_obj(receipt: Receipt, salt: bytes) -> dict[str, Any]:
    status = receipt.status
    if status not in _RECEIPT_STATUSES:
        raise EnvelopeError(Reason.MALFORMED, "receipt status must be accepted or rejected")
    reason = receipt.reason
    if reason is None:
        if status == RECEIPT_REJECTED:
            raise EnvelopeError(Reason.MALFORMED, "a rejected receipt needs a reason")
    else:
        reason = text(reason, "reason", MAX_REASON_BYTES)
    return {
        "v": RECEIPT_VERSION,
        "dev": check_device_id(receipt.dev),
        "seq": int_field(receipt.seq, "seq", lo=0),
        "status": status,
        "stored": int_field(receipt.stored, "stored", lo=0),
        "refused": int_field(receipt.refused, "refused", lo=0),
        "at": int_field(receipt.at_ms, "at"),
        "reason": reason,
        "salt": salt,
    }


def _receipt_from_obj(obj: object) -> Receipt:
    if not isinstance(obj, dict):
        raise EnvelopeError(Reason.MALFORMED, "receipt must be a map")
    _check_version(obj)
    check_keys(obj, _RECEIPT_KEYS, "receipt")
    status, salt = obj["status"], obj["salt"]
    if not isinstance(status, str):
        raise EnvelopeError(Reason.MALFORMED, "receipt status must be a text string")
    if not isinstance(salt, bytes) or len(salt) != RECEIPT_SALT_BYTES:
        raise EnvelopeError(Reason.MALFORMED, f"receipt salt must be {RECEIPT_SALT_BYTES} bytes")
    receipt = Receipt(
        dev=obj["dev"],
        seq=obj["seq"],
        status=status,
        stored=obj["stored"],
        refused=obj["refused"],
        at_ms=obj["at"],
        reason=obj["reason"],
    )
    _receipt_to_obj(receipt, salt)
    return receipt


def _check_version(obj: dict[Any, Any]) -> None:
    if "v" not in obj:
        raise EnvelopeError(Reason.MALFORMED, "missing v")
    v = obj["v"]
    if not is_int(v):
        raise EnvelopeError(Reason.MALFORMED, "v must be an integer")
    if v != RECEIPT_VERSION:
        raise EnvelopeError(Reason.UNSUPPORTED_VERSION, f"v={v}: receipts are v{RECEIPT_VERSION}")
