"""The hub's identity: its key (which never leaves it), certificate and enrollment record.

``enroll`` makes a P-256 key (file mode 0600), sends a CSR with the site's code to the
gateway, and keeps what comes back in the hub directory:

    hub.key       the private key (signs envelopes, authenticates to the broker)
    hub.pem       the certificate for the device id, signed by the study CA
    ca.pem        the study CA (verifies the broker)
    receipt.pem   the gateway's receipt key (verifies receipts)
    hub.json      device id, participant, study, broker address, topics
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device_drivers.errors import DeviceDriverError
from ingest import keys
from ingest.transport import TlsFiles

ENROLL_TIMEOUT_S = 30


class HubIdentityError(DeviceDriverError):
    """The hub is not enrolled, or enrollment failed; the message says what to do."""


@dataclass(frozen=True, slots=True)
class HubIdentity:
    directory: Path
    device_id: str
    participant_id: str
    study_id: str
    broker_host: str
    broker_port: int
    broker_tls: bool
    gateway_url: str

    @property
    def key_path(self) -> Path:
        return self.directory / "hub.key"

    @property
    def tls(self) -> TlsFiles | None:
        if not self.broker_tls:
            return None
        return TlsFiles(self.directory / "ca.pem", self.directory / "hub.pem", self.key_path)

    def key(self) -> ec.EllipticCurvePrivateKey:
        return keys.load_private_key(self.key_path)

    def receipt_key(self) -> ec.EllipticCurvePublicKey:
        return keys.load_public_key(self.directory / "receipt.pem")

    @classmethod
    def load(cls, directory: Path) -> HubIdentity:
        try:
            record = json.loads((directory / "hub.json").read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise HubIdentityError(
                f"this hub is not enrolled ({directory / 'hub.json'} is missing): "
                "run `trialstream hub enroll --gateway URL --code CODE`"
            ) from exc
        except (OSError, json.JSONDecodeError) as exc:
            raise HubIdentityError(f"cannot read {directory / 'hub.json'}: {exc}") from exc
        try:
            return cls(
                directory,
                record["device_id"],
                record["participant_id"],
                record["study_id"],
                record["broker"]["host"],
                int(record["broker"]["port"]),
                bool(record["broker"]["tls"]),
                record["gateway_url"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise HubIdentityError(f"{directory / 'hub.json'} is incomplete: {exc}") from exc


def make_csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The CSR sent with the code; the gateway chooses the name (the device id) itself."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pending-enrollment")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)


def _prepare(directory: Path) -> ec.EllipticCurvePrivateKey:
    if (directory / "hub.json").exists():
        existing = HubIdentity.load(directory)
        raise HubIdentityError(
            f"this hub is already enrolled as {existing.device_id}; "
            f"remove {directory} to enroll it again"
        )
    directory.mkdir(parents=True, exist_ok=True)
    key_path = directory / "hub.key"
    if key_path.exists():
        return keys.load_private_key(key_path)  # a previous attempt that did not complete
    key = keys.generate_private_key()
    keys.save_private_key(key, key_path)
    return key


def _store(directory: Path, gateway_url: str, body: dict[str, Any]) -> HubIdentity:
    try:
        _write(directory / "hub.pem", body["certificate_pem"])
        _write(directory / "ca.pem", body["ca_pem"])
        _write(directory / "receipt.pem", body["receipt_key_pem"])
        record = {
            "device_id": body["device_id"],
            "participant_id": body["participant_id"],
            "study_id": body["study_id"],
            "broker": body["broker"],
            "topics": body["topics"],
            "gateway_url": gateway_url,
        }
    except (KeyError, TypeError) as exc:
        raise HubIdentityError(f"the gateway's enrollment answer is incomplete: {exc}") from exc
    _write(directory / "hub.json", json.dumps(record, indent=2) + "\n")
    return HubIdentity.load(directory)


async def enroll(directory: Path, gateway_url: str, code: str) -> HubIdentity:
    """Enroll this hub with ``code``; refuses if the directory already holds an identity."""
    key = await asyncio.to_thread(_prepare, directory)
    url = gateway_url.rstrip("/") + "/api/v1/enrollments"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ENROLL_TIMEOUT_S)) as http,
            http.post(url, json={"code": code, "csr": make_csr(key).decode()}) as resp,
        ):
            body: dict[str, Any] = await resp.json(content_type=None)
            status = resp.status
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
        raise HubIdentityError(f"cannot reach the gateway at {url}: {exc}") from exc
    if status != 201:
        title = body.get("title") or body.get("detail") or f"HTTP {status}"
        raise HubIdentityError(f"the gateway refused the enrollment: {title}")
    return await asyncio.to_thread(_store, directory, gateway_url, body)
