"""The envelope codec: signed batches of readings (hub -> gateway) and signed receipts back.

An envelope is a COSE_Sign1 message (RFC 9052, CBOR tag 18) signed with ES256. Receipts are
signed a batch at a time: one ES256 signature over the root of an RFC 9162 Merkle tree of the
batch's receipts, and each receipt travels with its inclusion proof as a COSE Receipt
(RFC 9942). docs/protocol.md is the normative description and this module is its one
implementation. Everything here is pure: bytes and keys in, frozen dataclasses or bytes out,
no I/O and no clock (receipt salts and ECDSA nonces come from the operating system).

Decoding is defensive in layers. The size is checked before a single byte is parsed. Then a
small well-formedness scan walks the CBOR heads of the input without building anything and
admits only the profile this protocol uses (definite lengths, integer or text map keys without
duplicates, no tags but the outer 18, no simple values but false/true/null, shallow nesting,
no trailing bytes); only then does cbor2 build Python values. The scan exists because cbor2
on its own accepts inputs we must not: it ignores trailing bytes, builds cyclic lists from
shared-reference tags, and its bigfloat tag raises ``decimal.Overflow`` rather than a CBOR
error. Every failure of :func:`open_envelope` is an :class:`EnvelopeError` with a
:class:`~ingest.model.Reason`.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from ingest import merkle
from ingest.errors import IngestError
from ingest.model import PROTOCOL_VERSION, Gap, Payload, Reading, Reason, Receipt, SensorReport

# 256 KiB: an envelope of MAX_ITEMS_PER_ENVELOPE readings with every string at its maximum
# length is about 250 000 bytes, so a full batch always fits; a typical reading is ~40 bytes,
# so ordinary batches use a few percent of it. It also bounds the gateway's work per message.
MAX_ENVELOPE_BYTES: Final = 256 * 1024

# 1000 readings (plus gaps) per envelope: at 1 Hz per metric that is minutes of data from a
# few wearables per signature, and 1000 maximal items (about 249 bytes each) stay under
# MAX_ENVELOPE_BYTES.
MAX_ITEMS_PER_ENVELOPE: Final = 1000

# A receipt message is about 520 bytes with the inclusion proof of a full tree (9 hashes of
# 32 bytes); 1 KiB leaves room for a long device id and reason code and nothing more.
MAX_RECEIPT_BYTES: Final = 1024
# Receipts signed under one tree head: at most 512, so an inclusion path has at most 9 hashes.
MAX_RECEIPT_TREE: Final = 512
# Random bytes in every receipt, so that a hub cannot recover another hub's receipt (who sent
# what, and when) from the sibling hashes of its own inclusion path.
RECEIPT_SALT_BYTES: Final = 16

# String bounds, in UTF-8 bytes. Device ids are MQTT topic segments, so they are also limited
# to a character set that cannot contain topic separators or wildcards.
MAX_DEVICE_ID_BYTES: Final = 64
MAX_METRIC_BYTES: Final = 64
MAX_UNIT_BYTES: Final = 32
MAX_SENSOR_BYTES: Final = 128
MAX_GAP_REASON_BYTES: Final = 64
MAX_REASON_BYTES: Final = 64

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1

COSE_SIGN1_TAG: Final = 18
HEADER_ALG: Final = 1
HEADER_KID: Final = 4
ALG_ES256: Final = -7
# COSE Receipts (RFC 9942): the verifiable data structure (protected) and its proofs
# (unprotected); RFC9162_SHA256 is structure 1, and its inclusion proofs are proof type -1.
HEADER_VDS: Final = 395
HEADER_VDP: Final = 396
VDS_RFC9162_SHA256: Final = 1
VDP_INCLUSION: Final = -1
GATEWAY_KID: Final = "gateway"

RECEIPT_ACCEPTED: Final = "accepted"
RECEIPT_REJECTED: Final = "rejected"

# The protected header bstr content: the CBOR map {1: -7} (alg: ES256).
_PROTECTED_ES256: Final = b"\xa1\x01\x26"
# A receipt tree head's: {1: -7, 395: 1} (alg: ES256, vds: RFC9162_SHA256).
_PROTECTED_RECEIPT: Final = cbor2.dumps({HEADER_ALG: ALG_ES256, HEADER_VDS: VDS_RFC9162_SHA256})
# In a COSE Receipt's unprotected map, after the kid: 396: {-1: [ (one inclusion proof).
_RECEIPT_PROOFS_HEAD: Final = (
    cbor2.dumps(HEADER_VDP) + b"\xa1" + cbor2.dumps(VDP_INCLUSION) + b"\x81"
)
_SIG_CONTEXT: Final = "Signature1"
# A four-element array, then the context string.
_SIG_STRUCTURE_HEAD: Final = b"\x84" + cbor2.dumps(_SIG_CONTEXT)
_SIGNATURE_BYTES: Final = 64
_COORD_BYTES: Final = 32
_ECDSA_SHA256: Final = ec.ECDSA(hashes.SHA256())

# Valid documents nest at most 3 containers deep (payload map > r list > reading list).
_MAX_DEPTH: Final = 4

_DEVICE_ID_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}", re.ASCII)
# Control characters (C0, DEL, C1): never part of a name, unit or reason, and NUL is what
# PostgreSQL's text type cannot hold at all. Every text field refuses them.
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# C1 controls in UTF-8 (U+0080..U+009F): the canonical pattern excludes C0 and DEL byte by
# byte; a payload with this byte pair anywhere takes the slow path, which checks each text.
_C1_UTF8_RE: Final = re.compile(rb"\xc2[\x80-\x9f]")
_PAYLOAD_KEYS: Final = frozenset({"v", "dev", "seq", "sent", "r", "gaps"})
# "s" (sensor reports) is optional: sent when a wearable (re)connects or its battery changes.
_PAYLOAD_KEYS_WITH_SENSORS: Final = _PAYLOAD_KEYS | {"s"}
MAX_SENSORS_PER_ENVELOPE: Final = 16
MAX_SENSOR_FIELD_BYTES: Final = 64
_RECEIPT_KEYS: Final = frozenset(
    {"v", "dev", "seq", "status", "stored", "refused", "at", "reason", "salt"}
)
# What the decoders accept: bytes, or a bytes-like buffer (copied once after the size check).
Buffer = bytes | bytearray | memoryview
_RECEIPT_STATUSES: Final = frozenset({RECEIPT_ACCEPTED, RECEIPT_REJECTED})


class EnvelopeError(IngestError):
    """An envelope or receipt that cannot be sealed, opened or verified, and why."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}"


@dataclass(frozen=True, slots=True)
class Opened:
    """A structurally valid envelope whose signature has not been checked yet.

    ``kid`` names the device whose key must verify it (see :func:`verify`); the raw
    ``protected``, ``payload_bytes`` and ``signature`` are what the signature covers.
    """

    kid: str
    payload: Payload
    protected: bytes
    payload_bytes: bytes
    signature: bytes


# --- public API -------------------------------------------------------------------------


def seal(payload: Payload, key: ec.EllipticCurvePrivateKey) -> bytes:
    """Sign ``payload`` with the hub's key; the result opens with :func:`open_envelope`.

    The payload is checked against the same rules the decoder applies, so a hub never signs
    an envelope the gateway must refuse as malformed.
    """
    payload_bytes = cbor2.dumps(_payload_to_obj(payload))
    data = _sign1(payload_bytes, payload.dev, key)
    if len(data) > MAX_ENVELOPE_BYTES:
        raise EnvelopeError(
            Reason.TOO_LARGE, f"sealed envelope is {len(data)} bytes > {MAX_ENVELOPE_BYTES}"
        )
    return data


def open_envelope(data: Buffer, *, max_size: int = MAX_ENVELOPE_BYTES) -> Opened:
    """Decode and check an envelope without verifying its signature.

    Raises :class:`EnvelopeError` (``too_large``, ``malformed`` or ``unsupported_version``)
    and nothing else, whatever the input bytes.
    """
    kid, protected, payload_bytes, signature = _open_sign1(data, max_size)
    obj = _loads_canonical_payload(payload_bytes)
    if obj is None:
        payload = _payload_from_obj(_loads(payload_bytes, "payload"))
    else:
        payload = _payload_from_obj(obj, canonical=True)
    if payload.dev != kid:
        raise EnvelopeError(Reason.MALFORMED, "kid and payload dev differ")
    return Opened(
        kid=kid,
        payload=payload,
        protected=protected,
        payload_bytes=payload_bytes,
        signature=signature,
    )


def verify(opened: Opened, public_key: ec.EllipticCurvePublicKey) -> None:
    """Check the ES256 signature of an opened envelope; raise ``bad_signature`` if it fails."""
    _verify_sign1(opened.protected, opened.payload_bytes, opened.signature, public_key)


def seal_receipts(
    receipts: Sequence[Receipt], key: ec.EllipticCurvePrivateKey, *, kid: str = GATEWAY_KID
) -> list[bytes]:
    """Sign ``receipts`` with the gateway's key, one signature per ``MAX_RECEIPT_TREE`` of
    them: the receipt messages, in order, each opening with :func:`open_receipt` alone."""
    _check_signing_key(key)
    kid_bytes = check_device_id(kid).encode("ascii")
    out: list[bytes] = []
    for start in range(0, len(receipts), MAX_RECEIPT_TREE):
        chunk = receipts[start : start + MAX_RECEIPT_TREE]
        salt, n = os.urandom(RECEIPT_SALT_BYTES * len(chunk)), RECEIPT_SALT_BYTES
        entries = [
            cbor2.dumps(_receipt_to_obj(r, salt[i * n : (i + 1) * n])) for i, r in enumerate(chunk)
        ]
        root, paths = merkle.tree(entries)
        signature = _signature(key, _sig_structure(_PROTECTED_RECEIPT, root))
        # The COSE Receipt, encoded by hand around the one part that differs per receipt
        # (its proof): the same bytes cbor2 writes for
        # 18([protected, {4: kid, 396: {-1: [proof]}}, nil, signature]).
        head = (
            b"\xd2\x84"
            + _bstr(_PROTECTED_RECEIPT)
            + b"\xa2\x04"
            + _bstr(kid_bytes)
            + _RECEIPT_PROOFS_HEAD
        )
        tail = b"\xf6" + _bstr(signature)
        size = _uint(len(chunk))
        for i, (entry, path) in enumerate(zip(entries, paths, strict=True)):
            # [size, index, path]: a path has at most 9 hashes, so its array head is one byte.
            hashes = b"".join(b"\x58\x20" + h for h in path)
            proof = b"\x83" + size + _uint(i) + bytes([0x80 | len(path)]) + hashes
            out.append(b"\x82" + _bstr(entry) + _bstr(head + _bstr(proof) + tail))
    return out


def _uint(n: int) -> bytes:
    """``n`` (0 <= n < 65536) as a CBOR unsigned integer with the shortest head (cbor2.dumps
    costs microseconds a call, most of it set-up)."""
    if n < 24:
        return bytes([n])
    if n < 0x100:
        return bytes([0x18, n])
    return b"\x19" + n.to_bytes(2, "big")


def _bstr(data: bytes) -> bytes:
    """``data`` (under 4 GiB) as a CBOR byte string with the shortest head."""
    n = len(data)
    if n < 24:
        return bytes([0x40 | n]) + data
    if n < 0x100:
        return bytes([0x58, n]) + data
    if n < 0x10000:
        return b"\x59" + n.to_bytes(2, "big") + data
    return b"\x5a" + n.to_bytes(4, "big") + data


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
    raw = _within(data, max_size)
    message = _loads(raw, "receipt message")
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
    _verify_sign1(_PROTECTED_RECEIPT, root, signature, public_key)
    return _receipt_from_obj(_loads(entry, "receipt"))


def is_device_id(device_id: object) -> bool:
    """Whether ``device_id`` is a valid device id (see ``check_device_id``)."""
    return isinstance(device_id, str) and _DEVICE_ID_RE.fullmatch(device_id) is not None


def check_device_id(device_id: object) -> str:
    """Return ``device_id`` if it is a valid device id (1-64 of ``A-Z a-z 0-9 . _ -``)."""
    if not isinstance(device_id, str) or _DEVICE_ID_RE.fullmatch(device_id) is None:
        raise EnvelopeError(
            Reason.MALFORMED, "device id must be 1-64 characters of A-Z a-z 0-9 . _ -"
        )
    return device_id


def check_reading(reading: Reading) -> None:
    """Raise ``malformed`` if ``reading`` could not be carried in an envelope."""
    _reading_to_obj(reading, 0)


def check_gap(gap: Gap) -> None:
    """Raise ``malformed`` if ``gap`` could not be carried in an envelope."""
    _gap_to_obj(gap, 0)


# --- COSE_Sign1 -----------------------------------------------------------------------------


def _sig_structure(protected: bytes, payload_bytes: bytes) -> bytes:
    """``["Signature1", protected, h'', payload]`` (RFC 9052 4.4), written directly: the
    bytes every signature is made and checked over. cbor2.dumps spent most of its time
    setting up an encoder (3% of a worker's samples at one reading per envelope)."""
    return _SIG_STRUCTURE_HEAD + _bstr(protected) + b"\x40" + _bstr(payload_bytes)


def _check_signing_key(key: object) -> None:
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise TypeError("ES256 needs a P-256 private key")


def _signature(key: ec.EllipticCurvePrivateKey, to_be_signed: bytes) -> bytes:
    """An ES256 signature in COSE's form: r || s, 32 bytes each."""
    r, s = decode_dss_signature(key.sign(to_be_signed, _ECDSA_SHA256))
    return r.to_bytes(_COORD_BYTES, "big") + s.to_bytes(_COORD_BYTES, "big")


def _sign1(payload_bytes: bytes, kid: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    _check_signing_key(key)
    kid_bytes = check_device_id(kid).encode("ascii")
    signature = _signature(key, _sig_structure(_PROTECTED_ES256, payload_bytes))
    message = [_PROTECTED_ES256, {HEADER_KID: kid_bytes}, payload_bytes, signature]
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, message))


def _verify_sign1(
    protected: bytes,
    payload_bytes: bytes,
    signature: bytes,
    public_key: ec.EllipticCurvePublicKey,
) -> None:
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise EnvelopeError(Reason.BAD_SIGNATURE, "verification key is not a P-256 key")
    if len(signature) != _SIGNATURE_BYTES:
        raise EnvelopeError(Reason.BAD_SIGNATURE, "ES256 signature must be 64 bytes")
    r = int.from_bytes(signature[:_COORD_BYTES], "big")
    s = int.from_bytes(signature[_COORD_BYTES:], "big")
    try:
        public_key.verify(
            encode_dss_signature(r, s), _sig_structure(protected, payload_bytes), _ECDSA_SHA256
        )
    except InvalidSignature:
        raise EnvelopeError(Reason.BAD_SIGNATURE, "signature does not verify") from None


def _within(data: Buffer, max_size: int) -> bytes:
    """``data`` as bytes, if it is bytes-like and at most ``max_size`` long."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EnvelopeError(Reason.MALFORMED, "input is not bytes")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > max_size:
        raise EnvelopeError(Reason.TOO_LARGE, f"{size} bytes > {max_size}")
    return bytes(data)


def _open_sign1(data: Buffer, max_size: int) -> tuple[str, bytes, bytes, bytes]:
    """Size, CBOR, tag and header checks of an envelope's frame."""
    raw = _within(data, max_size)
    return _split_canonical_sign1(raw) or _split_sign1(raw)


def _open_cose_receipt(data: bytes) -> tuple[bytes, int, int, list[bytes]]:
    """A COSE Receipt's signature and inclusion proof (tree size, leaf index, path)."""
    message = _loads(data, "COSE receipt", tag=COSE_SIGN1_TAG)
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
    if not isinstance(signature, bytes) or len(signature) != _SIGNATURE_BYTES:
        raise EnvelopeError(Reason.MALFORMED, "signature must be a 64-byte bstr (r||s)")
    proof = _loads(inclusion[0], "inclusion proof")
    if not isinstance(proof, list) or len(proof) != 3:
        raise EnvelopeError(Reason.MALFORMED, "inclusion proof must be [size, index, path]")
    size, index, path = proof
    if not _is_int(size) or not 1 <= size <= MAX_RECEIPT_TREE or not _is_int(index):
        raise EnvelopeError(Reason.MALFORMED, f"inclusion proof size must be 1-{MAX_RECEIPT_TREE}")
    if not isinstance(path, list) or not all(type(h) is bytes for h in path):
        raise EnvelopeError(Reason.MALFORMED, "inclusion path must be an array of bstr")
    return signature, size, index, path


def _split_sign1(raw: bytes) -> tuple[str, bytes, bytes, bytes]:
    """Any COSE_Sign1 frame in the protocol's profile: (kid, protected, payload, signature)."""
    message = _loads(raw, "COSE_Sign1", tag=COSE_SIGN1_TAG)
    if not isinstance(message, cbor2.CBORTag) or message.tag != COSE_SIGN1_TAG:
        raise EnvelopeError(Reason.MALFORMED, "not a tagged COSE_Sign1 (tag 18)")
    parts = message.value
    if not isinstance(parts, list) or len(parts) != 4:
        raise EnvelopeError(Reason.MALFORMED, "COSE_Sign1 must be an array of 4")
    protected, unprotected, payload_bytes, signature = parts
    if not isinstance(protected, bytes):
        raise EnvelopeError(Reason.MALFORMED, "protected header must be a bstr")
    if not isinstance(unprotected, dict):
        raise EnvelopeError(Reason.MALFORMED, "unprotected header must be a map")
    if not isinstance(payload_bytes, bytes):
        raise EnvelopeError(Reason.MALFORMED, "payload must be an attached bstr")
    if not isinstance(signature, bytes) or len(signature) != _SIGNATURE_BYTES:
        raise EnvelopeError(Reason.MALFORMED, "signature must be a 64-byte bstr (r||s)")
    headers = _loads(protected, "protected header") if protected else {}
    if not isinstance(headers, dict) or set(headers) != {HEADER_ALG}:
        raise EnvelopeError(Reason.MALFORMED, "protected header must be exactly {1: alg}")
    alg = headers[HEADER_ALG]
    if not _is_int(alg) or alg != ALG_ES256:
        raise EnvelopeError(Reason.MALFORMED, f"alg must be {ALG_ES256} (ES256)")
    if set(unprotected) != {HEADER_KID}:
        raise EnvelopeError(Reason.MALFORMED, "unprotected header must be exactly {4: kid}")
    kid = unprotected[HEADER_KID]
    if not isinstance(kid, bytes):
        raise EnvelopeError(Reason.MALFORMED, "kid must be a bstr")
    try:
        kid_text = kid.decode("ascii")
    except UnicodeDecodeError:
        raise EnvelopeError(Reason.MALFORMED, "kid is not a device id") from None
    return check_device_id(kid_text), protected, payload_bytes, signature


# --- the fast path for the encoding this codec produces ------------------------------------
#
# Nearly every envelope arrives exactly as ``seal`` encodes it. For those, the checks of the
# item-by-item scan are made by two cheaper means: the COSE_Sign1 frame is matched byte by
# byte, and the payload by one regular expression (run in C) of the payload's canonical
# layout. Each accepts a subset of what the scan accepts, and the payload is then decoded
# and checked by the same code as on the slow path; anything else takes the slow path, which
# also writes the error messages. tests/ingest/test_envelope_fast_path.py holds the two
# paths to the same answers.

# Tag 18, array of 4, protected bstr {1: -7}, unprotected map {4: ...}.
_CANONICAL_SIGN1_PREFIX: Final = b"\xd2\x84\x43\xa1\x01\x26\xa1\x04"
_CANONICAL_SIGNATURE_HEAD: Final = b"\x58\x40"


def _split_canonical_sign1(data: bytes) -> tuple[str, bytes, bytes, bytes] | None:
    """``_open_sign1``'s result for a frame in the canonical layout, else None."""
    if not data.startswith(_CANONICAL_SIGN1_PREFIX):
        return None
    kid, pos = _definite_bstr(data, len(_CANONICAL_SIGN1_PREFIX))
    if kid is None:
        return None
    payload_bytes, pos = _definite_bstr(data, pos)
    if (
        payload_bytes is None
        or len(data) != pos + 2 + _SIGNATURE_BYTES
        or data[pos : pos + 2] != _CANONICAL_SIGNATURE_HEAD
        or not kid.isascii()
        or not _DEVICE_ID_RE.fullmatch(kid_text := kid.decode("ascii"))
    ):
        return None
    return kid_text, _PROTECTED_ES256, payload_bytes, data[pos + 2 :]


def _definite_bstr(data: bytes, pos: int) -> tuple[bytes | None, int]:
    """The byte string whose head is at ``pos`` and the position after it (None if not one)."""
    if pos >= len(data) or data[pos] >> 5 != 2:
        return None, pos
    info = data[pos] & 0x1F
    if info < 24:
        size, start = info, pos + 1
    elif info <= 26:
        width = 1 << (info - 24)
        size, start = int.from_bytes(data[pos + 1 : pos + 1 + width], "big"), pos + 1 + width
    else:
        return None, pos
    end = start + size
    if end > len(data):
        return None, pos
    return data[start:end], end


def _text_pattern(max_bytes: int) -> bytes:
    """A definite text string of 1..max_bytes bytes in its shortest head, with no C0 control
    or DEL byte (in UTF-8 no other character contains one), as a regex."""
    char = rb"[^\x00-\x1f\x7f]"
    short = [re.escape(bytes([0x60 + n])) + char + b"{%d}" % n for n in range(1, 24)]
    longer = [
        b"\\x78" + re.escape(bytes([n])) + char + b"{%d}" % n for n in range(24, max_bytes + 1)
    ]
    return b"(?:" + b"|".join(short + longer) + b")"


_RE_UINT = (
    rb"(?:[\x00-\x17]|\x18[\x00-\xff]|\x19[\x00-\xff]{2}|\x1a[\x00-\xff]{4}|\x1b[\x00-\xff]{8})"
)
_RE_INT = (
    rb"(?:[\x00-\x17\x20-\x37]|[\x18\x38][\x00-\xff]|[\x19\x39][\x00-\xff]{2}"
    rb"|[\x1a\x3a][\x00-\xff]{4}|[\x1b\x3b][\x00-\xff]{8})"
)
# An int64: as _RE_INT, but an 8-byte argument below 2**63 (so -2**63 .. 2**63 - 1).
_RE_INT64 = (
    rb"(?:[\x00-\x17\x20-\x37]|[\x18\x38][\x00-\xff]|[\x19\x39][\x00-\xff]{2}"
    rb"|[\x1a\x3a][\x00-\xff]{4}|[\x1b\x3b][\x00-\x7f][\x00-\xff]{7})"
)
_RE_FLOAT = rb"(?:\xf9[\x00-\xff]{2}|\xfa[\x00-\xff]{4}|\xfb[\x00-\xff]{8})"
_RE_ARRAY_HEAD = rb"(?:[\x80-\x97]|\x98[\x00-\xff]|\x99[\x00-\xff]{2})"
# A reading whose every field already meets the decoder's checks: an int64 time, text within
# its byte limit, a float value. (Integer values, which the decoder turns into floats, take
# the slow path.) The decoder builds such readings without looking at them again.
_RE_READING = (
    rb"\x85"
    + _RE_INT64
    + _text_pattern(MAX_METRIC_BYTES)
    + _RE_FLOAT
    + _text_pattern(MAX_UNIT_BYTES)
    + _text_pattern(MAX_SENSOR_BYTES)
)
# {"v": uint, "dev": text, "seq": uint, "sent": int, "r": [reading...], "gaps": []}, in the
# order ``seal`` writes them. Envelopes with gaps or sensor reports take the slow path.
_CANONICAL_PAYLOAD: Final = re.compile(
    rb"\xa6\x61v"
    + _RE_UINT
    + rb"\x63dev"
    + _text_pattern(MAX_DEVICE_ID_BYTES)
    + rb"\x63seq"
    + _RE_UINT
    + rb"\x64sent"
    + _RE_INT
    + rb"\x61r"
    + _RE_ARRAY_HEAD
    + rb"(?:"
    + _RE_READING
    + rb")*\x64gaps\x80",
    re.DOTALL,
)


def _loads_canonical_payload(data: bytes) -> Any:
    """The decoded payload if it is in the canonical layout, else None.

    The regular expression checks every item's type and head, but not that each array
    holds as many items as its head says: the decoder must then end exactly at the end of
    the input, and ``_payload_from_obj`` finds the payload's keys, which any disagreement
    between head and items would displace.
    """
    if _CANONICAL_PAYLOAD.fullmatch(data) is None or _C1_UTF8_RE.search(data) is not None:
        return None
    stream = io.BytesIO(data)
    try:
        obj = cbor2.CBORDecoder(stream).decode()
    except (cbor2.CBORDecodeError, ValueError, OverflowError, RecursionError):
        return None
    return obj if stream.tell() == len(data) else None


# --- payload and receipt maps -------------------------------------------------------------


def _payload_to_obj(payload: Payload) -> dict[str, Any]:
    if payload.v != PROTOCOL_VERSION:
        raise EnvelopeError(Reason.UNSUPPORTED_VERSION, f"this codec seals v{PROTOCOL_VERSION}")
    count = len(payload.readings) + len(payload.gaps)
    if count > MAX_ITEMS_PER_ENVELOPE:
        raise EnvelopeError(
            Reason.TOO_LARGE, f"{count} readings and gaps > {MAX_ITEMS_PER_ENVELOPE}"
        )
    if len(payload.sensors) > MAX_SENSORS_PER_ENVELOPE:
        raise EnvelopeError(Reason.TOO_LARGE, f"more than {MAX_SENSORS_PER_ENVELOPE} sensors")
    obj: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "dev": check_device_id(payload.dev),
        "seq": _int(payload.seq, "seq", lo=0),
        "sent": _int(payload.sent_ms, "sent"),
        "r": [_reading_to_obj(r, i) for i, r in enumerate(payload.readings)],
        "gaps": [_gap_to_obj(g, i) for i, g in enumerate(payload.gaps)],
    }
    if payload.sensors:
        obj["s"] = [_sensor_to_obj(s, i) for i, s in enumerate(payload.sensors)]
    return obj


def _payload_from_obj(obj: object, *, canonical: bool = False) -> Payload:
    """The payload of a decoded map. ``canonical``: the map was matched by
    ``_CANONICAL_PAYLOAD``, whose grammar checks every reading's fields already."""
    if not isinstance(obj, dict):
        raise EnvelopeError(Reason.MALFORMED, "payload must be a map")
    _check_version(obj)
    _check_keys(obj, _PAYLOAD_KEYS_WITH_SENSORS if "s" in obj else _PAYLOAD_KEYS, "payload")
    readings, gaps = obj["r"], obj["gaps"]
    sensors = obj.get("s", [])
    if "s" in obj and (
        not isinstance(sensors, list) or not 1 <= len(sensors) <= MAX_SENSORS_PER_ENVELOPE
    ):
        raise EnvelopeError(Reason.MALFORMED, f"s must be an array of 1-{MAX_SENSORS_PER_ENVELOPE}")
    if not isinstance(readings, list) or not isinstance(gaps, list):
        raise EnvelopeError(Reason.MALFORMED, "r and gaps must be arrays")
    count = len(readings) + len(gaps)
    if count > MAX_ITEMS_PER_ENVELOPE:
        raise EnvelopeError(
            Reason.TOO_LARGE, f"{count} readings and gaps > {MAX_ITEMS_PER_ENVELOPE}"
        )
    if canonical and all(type(r) is list and len(r) == 5 for r in readings):
        built = tuple(map(Reading._make, readings))
    else:
        built = tuple(_reading_from_obj(r, i) for i, r in enumerate(readings))
    return Payload(
        dev=check_device_id(obj["dev"]),
        seq=_int(obj["seq"], "seq", lo=0),
        sent_ms=_int(obj["sent"], "sent"),
        readings=built,
        gaps=tuple(_gap_from_obj(g, i) for i, g in enumerate(gaps)),
        sensors=tuple(_sensor_from_obj(s, i) for i, s in enumerate(sensors)),
    )


def _sensor_to_obj(report: SensorReport, i: int) -> list[Any]:
    where = f"s[{i}]"
    fields = (report.manufacturer, report.model, report.serial, report.firmware, report.hardware)
    battery = report.battery_level
    if battery is not None and (not _is_int(battery) or not 0 <= battery <= 100):
        raise EnvelopeError(Reason.MALFORMED, f"{where} battery must be 0-100")
    return [
        _text(report.sensor, f"{where} sensor", MAX_SENSOR_BYTES),
        *(
            None if f is None else _text(f, f"{where} field", MAX_SENSOR_FIELD_BYTES)
            for f in fields
        ),
        battery,
    ]


def _sensor_from_obj(obj: object, i: int) -> SensorReport:
    where = f"s[{i}]"
    if not isinstance(obj, list) or len(obj) != 7:
        raise EnvelopeError(Reason.MALFORMED, f"{where} must be a 7-element array")
    texts = [
        None if f is None else _text(f, f"{where} field", MAX_SENSOR_FIELD_BYTES) for f in obj[1:6]
    ]
    battery = obj[6]
    if battery is not None:
        battery = _int(battery, f"{where} battery", lo=0, hi=100)
    manufacturer, model, serial, firmware, hardware = texts
    return SensorReport(
        _text(obj[0], f"{where} sensor", MAX_SENSOR_BYTES),
        manufacturer,
        model,
        serial,
        firmware,
        hardware,
        battery,
    )


def _reading_to_obj(reading: Reading, i: int) -> list[Any]:
    where = f"r[{i}]"
    return [
        _int(reading.t_ms, f"{where}.t_ms"),
        _text(reading.metric, f"{where}.metric", MAX_METRIC_BYTES),
        _number(reading.value, f"{where}.value"),
        _text(reading.unit, f"{where}.unit", MAX_UNIT_BYTES),
        _text(reading.sensor, f"{where}.sensor", MAX_SENSOR_BYTES),
    ]


def _reading_from_obj(obj: object, i: int) -> Reading:
    # Fast path for the common, well-formed reading: the same checks as the slow path
    # (printable ASCII text within its byte limit, an int64 time, a finite-range number), without
    # building messages. Anything else takes the slow path, which says what is wrong.
    if type(obj) is list and len(obj) == 5:
        t_ms, metric, value, unit, sensor = obj
        if (
            type(t_ms) is int
            and INT64_MIN <= t_ms <= INT64_MAX
            and type(metric) is str
            and 0 < len(metric) <= MAX_METRIC_BYTES
            and metric.isascii()
            and metric.isprintable()
            and type(unit) is str
            and 0 < len(unit) <= MAX_UNIT_BYTES
            and unit.isascii()
            and unit.isprintable()
            and type(sensor) is str
            and 0 < len(sensor) <= MAX_SENSOR_BYTES
            and sensor.isascii()
            and sensor.isprintable()
        ):
            if type(value) is float:
                return Reading(t_ms, metric, value, unit, sensor)
            if type(value) is int and -(2**53) <= value <= 2**53:
                return Reading(t_ms, metric, float(value), unit, sensor)
    if not isinstance(obj, list) or len(obj) != 5:
        raise EnvelopeError(Reason.MALFORMED, f"r[{i}] must be [t_ms, metric, value, unit, sensor]")
    t_ms, metric, value, unit, sensor = _reading_to_obj(Reading(*obj), i)
    return Reading(t_ms=t_ms, metric=metric, value=value, unit=unit, sensor=sensor)


def _gap_to_obj(gap: Gap, i: int) -> list[Any]:
    where = f"gaps[{i}]"
    return [
        _int(gap.from_ms, f"{where}.from_ms"),
        _int(gap.to_ms, f"{where}.to_ms"),
        _text(gap.reason, f"{where}.reason", MAX_GAP_REASON_BYTES),
    ]


def _gap_from_obj(obj: object, i: int) -> Gap:
    if not isinstance(obj, list) or len(obj) != 3:
        raise EnvelopeError(Reason.MALFORMED, f"gaps[{i}] must be [from_ms, to_ms, reason]")
    from_ms, to_ms, reason = _gap_to_obj(Gap(*obj), i)
    return Gap(from_ms=from_ms, to_ms=to_ms, reason=reason)


def _receipt_to_obj(receipt: Receipt, salt: bytes) -> dict[str, Any]:
    status = receipt.status
    if status not in _RECEIPT_STATUSES:
        raise EnvelopeError(Reason.MALFORMED, "receipt status must be accepted or rejected")
    reason = receipt.reason
    if reason is None:
        if status == RECEIPT_REJECTED:
            raise EnvelopeError(Reason.MALFORMED, "a rejected receipt needs a reason")
    else:
        reason = _text(reason, "reason", MAX_REASON_BYTES)
    return {
        "v": PROTOCOL_VERSION,
        "dev": check_device_id(receipt.dev),
        "seq": _int(receipt.seq, "seq", lo=0),
        "status": status,
        "stored": _int(receipt.stored, "stored", lo=0),
        "refused": _int(receipt.refused, "refused", lo=0),
        "at": _int(receipt.at_ms, "at"),
        "reason": reason,
        "salt": salt,
    }


def _receipt_from_obj(obj: object) -> Receipt:
    if not isinstance(obj, dict):
        raise EnvelopeError(Reason.MALFORMED, "receipt must be a map")
    _check_version(obj)
    _check_keys(obj, _RECEIPT_KEYS, "receipt")
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
    if not _is_int(v):
        raise EnvelopeError(Reason.MALFORMED, "v must be an integer")
    if v != PROTOCOL_VERSION:
        raise EnvelopeError(Reason.UNSUPPORTED_VERSION, f"v={v}, this gateway speaks v1")


def _check_keys(obj: dict[Any, Any], expected: frozenset[str], what: str) -> None:
    keys = set(obj)
    if keys != expected:
        missing = sorted(map(repr, expected - keys))
        unknown = sorted(map(repr, keys - expected))
        raise EnvelopeError(Reason.MALFORMED, f"{what} keys: missing {missing}, unknown {unknown}")


# --- field checks (used in both directions) -------------------------------------------------


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int(x: object, what: str, *, lo: int = INT64_MIN, hi: int = INT64_MAX) -> int:
    if not isinstance(x, int) or isinstance(x, bool):
        raise EnvelopeError(Reason.MALFORMED, f"{what} must be an integer")
    if not lo <= x <= hi:
        raise EnvelopeError(Reason.MALFORMED, f"{what} out of range [{lo}, {hi}]")
    return x


def _number(x: object, what: str) -> float:
    """Any int or float; NaN and infinities pass (plausibility is a later stage)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise EnvelopeError(Reason.MALFORMED, f"{what} must be a number")
    try:
        return float(x)
    except OverflowError:
        raise EnvelopeError(Reason.MALFORMED, f"{what} is out of float range") from None


def _text(x: object, what: str, max_bytes: int) -> str:
    if not isinstance(x, str):
        raise EnvelopeError(Reason.MALFORMED, f"{what} must be a text string")
    try:
        size = len(x.encode("utf-8"))
    except UnicodeEncodeError:
        raise EnvelopeError(Reason.MALFORMED, f"{what} is not valid Unicode") from None
    if not 1 <= size <= max_bytes:
        raise EnvelopeError(Reason.MALFORMED, f"{what} must be 1-{max_bytes} UTF-8 bytes")
    if _CONTROL_RE.search(x) is not None:
        raise EnvelopeError(Reason.MALFORMED, f"{what} contains a control character")
    return x


# --- CBOR ---------------------------------------------------------------------------------


def _loads(data: bytes, what: str, *, tag: int | None = None) -> Any:
    """Scan ``data`` against the protocol's CBOR profile, then decode it with cbor2."""
    _scan(data, what, tag)
    try:
        return cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, OverflowError, RecursionError) as exc:
        raise EnvelopeError(Reason.MALFORMED, f"{what}: {exc}") from None


def _head(data: bytes, pos: int, what: str) -> tuple[int, int, int, int]:
    """Decode one CBOR head at ``pos``: (major type, additional info, argument, next pos)."""
    n = len(data)
    if pos >= n:
        raise EnvelopeError(Reason.MALFORMED, f"{what}: truncated CBOR")
    initial = data[pos]
    major, info = initial >> 5, initial & 0x1F
    pos += 1
    if info < 24:
        return major, info, info, pos
    if info > 27:
        kind = "indefinite length" if info == 31 else "reserved additional info"
        raise EnvelopeError(Reason.MALFORMED, f"{what}: {kind} at byte {pos - 1}")
    width = 1 << (info - 24)
    if pos + width > n:
        raise EnvelopeError(Reason.MALFORMED, f"{what}: truncated CBOR")
    return major, info, int.from_bytes(data[pos : pos + width], "big"), pos + width


def _scan(data: bytes, what: str, tag: int | None) -> None:
    """Walk every CBOR head once, iteratively; raise unless the input is in the profile.

    The head decoding of ``_head`` is inlined here: this loop runs for every item of every
    envelope, and a function call per item was most of the gateway's decoding time.
    """
    n = len(data)
    pos = 0
    if tag is not None:
        major, _, arg, pos = _head(data, pos, what)
        if major != 6 or arg != tag:
            raise EnvelopeError(Reason.MALFORMED, f"{what}: expected CBOR tag {tag}")
    from_bytes = int.from_bytes
    # Open containers: items still expected, and map key identities (None for arrays).
    counts = [1]
    keysets: list[set[tuple[int, int | bytes]] | None] = [None]
    while counts:
        start = pos
        if pos >= n:
            raise EnvelopeError(Reason.MALFORMED, f"{what}: truncated CBOR")
        initial = data[pos]
        major = initial >> 5
        info = initial & 0x1F
        pos += 1
        if info < 24:
            arg = info
        elif info <= 27:
            width = 1 << (info - 24)
            if pos + width > n:
                raise EnvelopeError(Reason.MALFORMED, f"{what}: truncated CBOR")
            arg = from_bytes(data[pos : pos + width], "big")
            pos += width
        else:
            kind = "indefinite length" if info == 31 else "reserved additional info"
            raise EnvelopeError(Reason.MALFORMED, f"{what}: {kind} at byte {start}")
        keys = keysets[-1]
        if keys is not None and counts[-1] % 2 == 0:
            key: tuple[int, int | bytes]
            if major == 0 or major == 1:
                key = (major, arg)
            elif major == 3:
                key = (major, data[pos : pos + arg])
            else:
                raise EnvelopeError(Reason.MALFORMED, f"{what}: map key at byte {start}")
            if key in keys:
                raise EnvelopeError(Reason.MALFORMED, f"{what}: duplicate map key at {start}")
            keys.add(key)
        counts[-1] -= 1
        if major == 2 or major == 3:
            if arg > n - pos:
                raise EnvelopeError(Reason.MALFORMED, f"{what}: string longer than input")
            pos += arg
        elif major == 4 or major == 5:
            items = arg * 2 if major == 5 else arg
            if items > n - pos:
                raise EnvelopeError(Reason.MALFORMED, f"{what}: container longer than input")
            if len(counts) > _MAX_DEPTH:
                raise EnvelopeError(Reason.MALFORMED, f"{what}: nested too deep")
            counts.append(items)
            keysets.append(set() if major == 5 else None)
        elif major == 6:
            raise EnvelopeError(Reason.MALFORMED, f"{what}: unexpected tag {arg}")
        elif major == 7 and info not in (20, 21, 22, 25, 26, 27):
            raise EnvelopeError(Reason.MALFORMED, f"{what}: unsupported simple value")
        while counts and counts[-1] == 0:
            counts.pop()
            keysets.pop()
    if pos != n:
        raise EnvelopeError(Reason.MALFORMED, f"{what}: {n - pos} trailing bytes")
