"""Requests a hub signs with its own key: certificate renewal and asking for its standing.

After enrollment a hub proves who it is with the key it enrolled (the one that signs its
envelopes and whose public half the gateway keeps), not with a password or a bearer token.
Each request carries the time it was signed (the hub's wall clock, milliseconds) and an
ECDSA P-256 / SHA-256 signature over::

    b"trialstream-hub-request/1\\n" + purpose + b"\\n" + device_id + b"\\n"
        + signed_at_ms (decimal) + b"\\n" + SHA-256(body)

so a signature made for one purpose, device, time or body verifies for no other. The gateway
accepts a signed time within ``MAX_SKEW_MS`` of its own clock; a hub whose clock is further
off is answered with the gateway's time and signs again with it (``stale_request``).
Shared by both sides: the hub signs, the gateway verifies.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

PURPOSE_RENEW: Final = "renew-certificate"
PURPOSE_STANDING: Final = "standing"
PURPOSES: Final = frozenset({PURPOSE_RENEW, PURPOSE_STANDING})
# A replayed request can only repeat what the hub asked for (another certificate for the same
# key, or its standing again); the window bounds even that.
MAX_SKEW_MS: Final = 10 * 60 * 1000
# A DER ECDSA P-256 signature is at most 72 bytes: 96 base64 characters.
MAX_SIGNATURE_CHARS: Final = 128
_DOMAIN: Final = b"trialstream-hub-request/1\n"


def signed_bytes(purpose: str, device_id: str, signed_at_ms: int, body: bytes) -> bytes:
    """What a hub request's signature covers."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown hub request purpose {purpose!r}")
    return b"\n".join(
        [
            _DOMAIN + purpose.encode(),
            device_id.encode(),
            str(signed_at_ms).encode(),
            hashlib.sha256(body).digest(),
        ]
    )


def sign(
    key: ec.EllipticCurvePrivateKey, purpose: str, device_id: str, signed_at_ms: int, body: bytes
) -> str:
    """The request's signature, base64 (standard alphabet, padded)."""
    der = key.sign(signed_bytes(purpose, device_id, signed_at_ms, body), ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(der).decode()


def verifies(
    public_key: ec.EllipticCurvePublicKey,
    purpose: str,
    device_id: str,
    signed_at_ms: int,
    body: bytes,
    signature: str,
) -> bool:
    """Whether ``signature`` is the device key's signature of this request."""
    if len(signature) > MAX_SIGNATURE_CHARS:
        return False
    try:
        der = base64.b64decode(signature.encode("ascii"), validate=True)
        public_key.verify(
            der, signed_bytes(purpose, device_id, signed_at_ms, body), ec.ECDSA(hashes.SHA256())
        )
    except (InvalidSignature, binascii.Error, UnicodeEncodeError, ValueError):
        return False
    return True
