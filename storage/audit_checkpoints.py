"""Signed checkpoints of the audit chain, kept outside the database.

The hash chain (:mod:`storage.audit`) shows that the table is self-consistent, not that it is
the table that was written: a database owner can rewrite a row and recompute every hash
after it. A checkpoint records the chain head (last ``audit_id``, its hash, the number of
rows, the time) signed with a P-256 key that lives in a file, not in the database, and is
appended as one JSON line to a file that is not in the database either. ``verify`` then
checks each checkpoint's signature and that the database's row at its ``audit_id`` still
carries its hash: history rewritten before a checkpoint is found even when the whole chain
in the database was recomputed, unless the rewriter also holds the signing key.

A checkpoint line::

    {"v":1,"seq":3,"audit_id":120,"hash":"<hex>","count":118,"at":"2025-...Z",
     "key":"<SHA-256 fingerprint of the public key>","sig":"<base64 DER ECDSA-SHA256>"}

The signature covers ``SIGNING_CONTEXT`` followed by the line's other fields as compact JSON
with sorted keys. ``seq`` is the line's number in the file (1 for the first line), so a
removed or reordered line is found too.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from ingest import keys
from storage.audit import ChainHead
from storage.errors import StorageError

CHECKPOINT_VERSION = 1
SIGNING_CONTEXT = b"trialstream audit checkpoint v1\n"
CHECKPOINT_FILE_MODE = 0o644


class CheckpointError(StorageError):
    """The checkpoint key or file cannot be used (missing, unreadable, unprotected)."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    head: ChainHead
    at: datetime
    # Fingerprint (``ingest.keys.fingerprint``) of the public key that signed it.
    key: str
    signature: bytes

    def signed_fields(self) -> dict[str, object]:
        return {
            "v": CHECKPOINT_VERSION,
            "seq": self.seq,
            "audit_id": self.head.audit_id,
            "hash": self.head.hash.hex(),
            "count": self.head.count,
            "at": self.at.astimezone(UTC).isoformat(timespec="microseconds"),
            "key": self.key,
        }

    def to_line(self) -> str:
        fields = self.signed_fields()
        fields["sig"] = base64.b64encode(self.signature).decode()
        return json.dumps(fields, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class FileProblem:
    """A line of the checkpoint file that cannot be trusted, and why."""

    line: int
    message: str


@dataclass(frozen=True, slots=True)
class CheckpointFile:
    path: Path
    # Checkpoints whose signature verifies with the verification key, in file order.
    checkpoints: tuple[Checkpoint, ...]
    problems: tuple[FileProblem, ...]
    # Whether the file exists at all (an absent file is not a problem, but verify says so).
    exists: bool


def _message(fields: dict[str, object]) -> bytes:
    return SIGNING_CONTEXT + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def public_key_path(key_path: Path) -> Path:
    """Where the public half of the signing key is written beside it."""
    return key_path.with_name(key_path.name + ".pub")


def load_or_create_signing_key(path: Path) -> tuple[ec.EllipticCurvePrivateKey, bool]:
    """The checkpoint signing key at ``path``, created (mode 0600) if absent; and whether it
    was created. Its public half is written to ``<path>.pub`` on creation."""
    try:
        if path.exists():
            return keys.load_private_key(path), False
        key = keys.generate_private_key()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            keys.save_private_key(key, path)
        except keys.KeyMaterialError:
            if path.exists():  # another run created it first
                return keys.load_private_key(path), False
            raise
        public_key_path(path).write_bytes(keys.public_key_to_pem(key.public_key()))
    except keys.KeyMaterialError as exc:
        raise CheckpointError(f"audit checkpoint key: {exc}") from exc
    except OSError as exc:
        raise CheckpointError(f"audit checkpoint key: cannot create {path}: {exc}") from exc
    return key, True


def load_verification_key(
    key_path: Path, public_key: Path | None = None
) -> ec.EllipticCurvePublicKey | None:
    """The key to check checkpoints with: ``public_key`` if given, else the signing key at
    ``key_path``, else its ``.pub`` beside it; None if there is none of them."""
    try:
        if public_key is not None:
            return keys.load_public_key(public_key)
        if key_path.exists():
            return keys.load_private_key(key_path).public_key()
        pub = public_key_path(key_path)
        if pub.exists():
            return keys.load_public_key(pub)
    except keys.KeyMaterialError as exc:
        raise CheckpointError(f"audit checkpoint key: {exc}") from exc
    return None


def _parse(line: str) -> tuple[dict[str, object], Checkpoint]:
    """A checkpoint line's signed fields and the checkpoint; ValueError or TypeError naming
    what is wrong."""
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise TypeError("not a JSON object")
    sig = obj.pop("sig", None)
    if obj.get("v") != CHECKPOINT_VERSION:
        raise ValueError(f"unknown version {obj.get('v')!r}")
    if set(obj) != {"v", "seq", "audit_id", "hash", "count", "at", "key"}:
        raise ValueError(f"unexpected fields {sorted(obj)}")
    seq, audit_id, count = obj["seq"], obj["audit_id"], obj["count"]
    h, at, key = obj["hash"], obj["at"], obj["key"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (seq, audit_id, count)):
        raise ValueError("seq, audit_id and count must be integers")
    if not (isinstance(h, str) and isinstance(at, str) and isinstance(key, str)):
        raise TypeError("hash, at and key must be strings")
    if not isinstance(sig, str):
        raise TypeError("no signature")
    try:
        digest = bytes.fromhex(h)
        signature = base64.b64decode(sig, validate=True)
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"bad hash or signature encoding: {exc}") from None
    when = datetime.fromisoformat(at)
    if when.tzinfo is None:
        raise ValueError("time without a zone")
    checkpoint = Checkpoint(seq, ChainHead(audit_id, digest, count), when, key, signature)
    return obj, checkpoint


def read(path: Path, public_key: ec.EllipticCurvePublicKey | None) -> CheckpointFile:
    """Every checkpoint in ``path`` whose signature verifies with ``public_key``, and a
    problem for each line that does not: unparseable, signed by another key, a signature
    that does not verify, or out of sequence (a line removed, reordered or inserted)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return CheckpointFile(path, (), (), exists=False)
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read the audit checkpoints {path}: {exc}") from exc
    lines = text.splitlines()
    if any(line.strip() for line in lines) and public_key is None:
        raise CheckpointError(
            f"cannot check the audit checkpoints in {path}: no key to verify them with "
            "(set TRIALSTREAM_AUDIT_CHECKPOINT_KEY or pass --public-key)"
        )
    fingerprint = keys.fingerprint(public_key) if public_key is not None else ""
    good: list[Checkpoint] = []
    problems: list[FileProblem] = []
    for lineno, line in enumerate(lines, start=1):
        try:
            fields, checkpoint = _parse(line)
        except (ValueError, TypeError, KeyError) as exc:
            problems.append(FileProblem(lineno, f"not a checkpoint ({exc})"))
            continue
        name = f"checkpoint #{checkpoint.seq}"
        if checkpoint.seq != lineno:
            problems.append(
                FileProblem(
                    lineno,
                    f"{name} is on line {lineno}: lines were removed, reordered or inserted",
                )
            )
        if checkpoint.key != fingerprint:
            problems.append(
                FileProblem(
                    lineno, f"{name} names key {checkpoint.key[:16]}, not {fingerprint[:16]}"
                )
            )
            continue
        assert public_key is not None
        try:
            public_key.verify(checkpoint.signature, _message(fields), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            problems.append(
                FileProblem(lineno, f"{name}: the signature does not verify (forged or altered)")
            )
            continue
        good.append(checkpoint)
    return CheckpointFile(path, tuple(good), tuple(problems), exists=True)


def append(path: Path, key: ec.EllipticCurvePrivateKey, head: ChainHead) -> Checkpoint:
    """Sign ``head`` and append it to ``path`` (created if absent) as the next checkpoint.

    The file is locked while its lines are counted and the new one written, so two runs at
    once still number their lines 1, 2, 3 ...; the line is fsynced before returning.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, CHECKPOINT_FILE_MODE)
    except OSError as exc:
        raise CheckpointError(f"cannot open the audit checkpoints {path}: {exc}") from exc
    with os.fdopen(fd, "r+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        existing = f.read()
        if existing and not existing.endswith(b"\n"):
            f.write(b"\n")  # a torn last line stays a line of its own (and is reported)
        seq = len(existing.splitlines()) + 1
        unsigned = Checkpoint(seq, head, datetime.now(UTC), keys.fingerprint(key.public_key()), b"")
        signature = key.sign(_message(unsigned.signed_fields()), ec.ECDSA(hashes.SHA256()))
        checkpoint = Checkpoint(seq, head, unsigned.at, unsigned.key, signature)
        f.write(checkpoint.to_line().encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
    return checkpoint
