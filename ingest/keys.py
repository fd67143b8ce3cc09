"""P-256 keys of hubs and the gateway: generate, store, load, convert and fingerprint.

One P-256 key per hub signs its envelopes (ES256) and backs its mTLS client certificate; the
gateway has its own key for receipts. Private keys are PEM (PKCS#8) files created with mode
0600 from the start; the database stores public keys as DER SubjectPublicKeyInfo. Unlike the
rest of ``ingest`` this module does file I/O, because keys live in files.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ingest.errors import IngestError

PRIVATE_KEY_MODE: Final = 0o600


class KeyMaterialError(IngestError):
    """A key file or encoding that cannot be used: missing, unprotected, not P-256, corrupt."""


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 (secp256r1) private key."""
    return ec.generate_private_key(ec.SECP256R1())


def save_private_key(
    key: ec.EllipticCurvePrivateKey, path: Path, *, password: bytes | None = None
) -> None:
    """Write ``key`` as PKCS#8 PEM to a new file that is 0600 from its creation.

    Refuses to overwrite an existing file. The file and its directory entry are fsynced
    before returning, so a hub that has enrolled with this key still has it after a crash.
    """
    encryption: serialization.KeySerializationEncryption = (
        serialization.NoEncryption()
        if password is None
        else serialization.BestAvailableEncryption(password)
    )
    pem = _require_p256_private(key).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, PRIVATE_KEY_MODE)
    except FileExistsError:
        raise KeyMaterialError(f"{path} exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise KeyMaterialError(f"cannot create {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise KeyMaterialError(f"cannot write {path}: {exc.strerror}") from exc
    _fsync_directory(path.parent)


def load_private_key(path: Path, *, password: bytes | None = None) -> ec.EllipticCurvePrivateKey:
    """Load a P-256 private key from PEM; refuse a file that group or others can access."""
    try:
        mode = path.stat().st_mode
        if stat.S_IMODE(mode) & 0o077:
            raise KeyMaterialError(
                f"{path} is accessible by group or others (mode {stat.S_IMODE(mode):o}); "
                "a private key file must be 0600"
            )
        data = path.read_bytes()
    except OSError as exc:
        raise KeyMaterialError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_private_key(data, password)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyMaterialError(f"{path} is not a usable PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyMaterialError(f"{path} is not an EC private key")
    return _require_p256_private(key)


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Load a P-256 public key from a PEM file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyMaterialError(f"cannot read {path}: {exc.strerror}") from exc
    return public_key_from_pem(data)


def public_key_to_pem(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """PEM SubjectPublicKeyInfo (``-----BEGIN PUBLIC KEY-----``)."""
    return _require_p256_public(public_key).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_key_from_pem(data: bytes) -> ec.EllipticCurvePublicKey:
    """Parse a PEM SubjectPublicKeyInfo; it must be a P-256 key."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyMaterialError(f"not a usable PEM public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise KeyMaterialError("not an EC public key")
    return _require_p256_public(key)


def public_key_to_der(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """DER SubjectPublicKeyInfo: the form the database stores."""
    return _require_p256_public(public_key).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_key_from_der(data: bytes) -> ec.EllipticCurvePublicKey:
    """Parse a DER SubjectPublicKeyInfo; it must be a P-256 key."""
    try:
        key = serialization.load_der_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyMaterialError(f"not a usable DER public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise KeyMaterialError("not an EC public key")
    return _require_p256_public(key)


def fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """Lower-case hex SHA-256 of the DER SubjectPublicKeyInfo.

    The same value as ``openssl pkey -pubin -outform DER | sha256sum`` prints, so an operator
    can check a key by hand.
    """
    return hashlib.sha256(public_key_to_der(public_key)).hexdigest()


def _require_p256_private(key: ec.EllipticCurvePrivateKey) -> ec.EllipticCurvePrivateKey:
    if not isinstance(key.curve, ec.SECP256R1):
        raise KeyMaterialError(f"key is on {key.curve.name}, not P-256")
    return key


def _require_p256_public(key: ec.EllipticCurvePublicKey) -> ec.EllipticCurvePublicKey:
    if not isinstance(key.curve, ec.SECP256R1):
        raise KeyMaterialError(f"key is on {key.curve.name}, not P-256")
    return key


def _fsync_directory(directory: Path) -> None:
    """Make a new directory entry durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
