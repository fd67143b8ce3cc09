"""COSE_Sign1 (RFC 9052 section 4.2) with ES256, as the protocol profiles it.

The frame of an envelope and of a receipt tree head: the ``Sig_structure`` every signature
is made and checked over, signatures in COSE's raw ``r || s`` form, and the decoding of an
envelope's frame (a byte-exact fast path for the layout :func:`sign1` writes, the CBOR
profile's item-by-item checks for anything else).
"""

from __future__ import annotations

from typing import Final

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from ingest.model import Reason
from ingest.wire import (
    DEVICE_ID_RE,
    Buffer,
    EnvelopeError,
    check_device_id,
    is_int,
    loads,
    within,
)

COSE_SIGN1_TAG: Final = 18
HEADER_ALG: Final = 1
HEADER_KID: Final = 4
ALG_ES256: Final = -7

# The protected header bstr content: the CBOR map {1: -7} (alg: ES256).
PROTECTED_ES256: Final = b"\xa1\x01\x26"
_SIG_CONTEXT: Final = "Signature1"
# A four-element array, then the context string.
_SIG_STRUCTURE_HEAD: Final = b"\x84" + cbor2.dumps(_SIG_CONTEXT)
SIGNATURE_BYTES: Final = 64
_COORD_BYTES: Final = 32
_ECDSA_SHA256: Final = ec.ECDSA(hashes.SHA256())


def uint(n: int) -> bytes:
    """``n`` (0 <= n < 65536) as a CBOR unsigned integer with the shortest head (cbor2.dumps
    costs microseconds a call, most of it set-up)."""
    if n < 24:
        return bytes([n])
    if n < 0x100:
        return bytes([0x18, n])
    return b"\x19" + n.to_bytes(2, "big")


def bstr(data: bytes) -> bytes:
    """``data`` (under 4 GiB) as a CBOR byte string with the shortest head."""
    n = len(data)
    if n < 24:
        return bytes([0x40 | n]) + data
    if n < 0x100:
        return bytes([0x58, n]) + data
    if n < 0x10000:
        return b"\x59" + n.to_bytes(2, "big") + data
    return b"\x5a" + n.to_bytes(4, "big") + data


def sig_structure(protected: bytes, payload_bytes: bytes) -> bytes:
    """``["Signature1", protected, h'', payload]`` (RFC 9052 4.4), written directly: the
    bytes every signature is made and checked over. cbor2.dumps spent most of its time
    setting up an encoder (3% of a worker's samples at one reading per envelope)."""
    return _SIG_STRUCTURE_HEAD + bstr(protected) + b"\x40" + bstr(payload_bytes)


def check_signing_key(key: object) -> None:
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise TypeError("ES256 needs a P-256 private key")


def es256_signature(key: ec.EllipticCurvePrivateKey, to_be_signed: bytes) -> bytes:
    """An ES256 signature in COSE's form: r || s, 32 bytes each."""
    r, s = decode_dss_signature(key.sign(to_be_signed, _ECDSA_SHA256))
    return r.to_bytes(_COORD_BYTES, "big") + s.to_bytes(_COORD_BYTES, "big")


def sign1(payload_bytes: bytes, kid: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    check_signing_key(key)
    kid_bytes = check_device_id(kid).encode("ascii")
    signature = es256_signature(key, sig_structure(PROTECTED_ES256, payload_bytes))
    message = [PROTECTED_ES256, {HEADER_KID: kid_bytes}, payload_bytes, signature]
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, message))


def verify_sign1(
    protected: bytes,
    payload_bytes: bytes,
    signature: bytes,
    public_key: ec.EllipticCurvePublicKey,
) -> None:
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise EnvelopeError(Reason.BAD_SIGNATURE, "verification key is not a P-256 key")
    if len(signature) != SIGNATURE_BYTES:
        raise EnvelopeError(Reason.BAD_SIGNATURE, "ES256 signature must be 64 bytes")
    r = int.from_bytes(signature[:_COORD_BYTES], "big")
    s = int.from_bytes(signature[_COORD_BYTES:], "big")
    try:
        public_key.verify(
            encode_dss_signature(r, s), sig_structure(protected, payload_bytes), _ECDSA_SHA256
        )
    except InvalidSignature:
        raise EnvelopeError(Reason.BAD_SIGNATURE, "signature does not verify") from None


def open_sign1(data: Buffer, max_size: int) -> tuple[str, bytes, bytes, bytes]:
    """Size, CBOR, tag and header checks of an envelope's frame."""
    raw = within(data, max_size)
    return _split_canonical_sign1(raw) or _split_sign1(raw)


def _split_sign1(raw: bytes) -> tuple[str, bytes, bytes, bytes]:
    """Any COSE_Sign1 frame in the protocol's profile: (kid, protected, payload, signature)."""
    message = loads(raw, "COSE_Sign1", tag=COSE_SIGN1_TAG)
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
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise EnvelopeError(Reason.MALFORMED, "signature must be a 64-byte bstr (r||s)")
    headers = loads(protected, "protected header") if protected else {}
    if not isinstance(headers, dict) or set(headers) != {HEADER_ALG}:
        raise EnvelopeError(Reason.MALFORMED, "protected header must be exactly {1: alg}")
    alg = headers[HEADER_ALG]
    if not is_int(alg) or alg != ALG_ES256:
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
        or len(data) != pos + 2 + SIGNATURE_BYTES
        or data[pos : pos + 2] != _CANONICAL_SIGNATURE_HEAD
        or not kid.isascii()
        or not DEVICE_ID_RE.fullmatch(kid_text := kid.decode("ascii"))
    ):
        return None
    return kid_text, PROTECTED_ES256, payload_bytes, data[pos + 2 :]


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
