"""Key files: created 0600, never overwritten, P-256 only, DER round trip, fingerprint."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ingest import keys
from ingest.keys import KeyMaterialError


def test_private_key_file_is_0600_and_loads(tmp_path: Path) -> None:
    key = keys.generate_private_key()
    path = tmp_path / "hub.key"
    old = os.umask(0)  # even a permissive umask must not widen the mode
    try:
        keys.save_private_key(key, path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = keys.load_private_key(path)
    assert loaded.private_numbers() == key.private_numbers()


def test_existing_file_is_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "hub.key"
    path.write_bytes(b"keep me")
    with pytest.raises(KeyMaterialError):
        keys.save_private_key(keys.generate_private_key(), path)
    assert path.read_bytes() == b"keep me"


def test_encrypted_private_key(tmp_path: Path) -> None:
    key = keys.generate_private_key()
    path = tmp_path / "hub.key"
    keys.save_private_key(key, path, password=b"secret")
    assert b"ENCRYPTED" in path.read_bytes()
    with pytest.raises(KeyMaterialError):
        keys.load_private_key(path)
    with pytest.raises(KeyMaterialError):
        keys.load_private_key(path, password=b"wrong")
    assert keys.load_private_key(path, password=b"secret").private_numbers() == (
        key.private_numbers()
    )


def test_group_readable_private_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "hub.key"
    keys.save_private_key(keys.generate_private_key(), path)
    path.chmod(0o640)
    with pytest.raises(KeyMaterialError, match="0600"):
        keys.load_private_key(path)


def test_missing_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(KeyMaterialError):
        keys.load_private_key(tmp_path / "absent.key")
    garbage = tmp_path / "garbage.key"
    fd = os.open(garbage, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    os.close(fd)
    with pytest.raises(KeyMaterialError):
        keys.load_private_key(garbage)
    with pytest.raises(KeyMaterialError):
        keys.public_key_from_der(b"\x30\x00")
    with pytest.raises(KeyMaterialError):
        keys.public_key_from_pem(b"garbage")


def test_other_curves_are_refused(tmp_path: Path) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(KeyMaterialError):
        keys.save_private_key(p384, tmp_path / "p384.key")
    der = p384.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(KeyMaterialError):
        keys.public_key_from_der(der)


def test_public_key_der_pem_round_trip_and_fingerprint(tmp_path: Path) -> None:
    public = keys.generate_private_key().public_key()
    der = keys.public_key_to_der(public)
    assert keys.public_key_from_der(der) == public
    path = tmp_path / "hub.pub"
    path.write_bytes(keys.public_key_to_pem(public))
    assert keys.load_public_key(path) == public
    assert keys.fingerprint(public) == hashlib.sha256(der).hexdigest()
    assert len(keys.fingerprint(public)) == 64
