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
import hashlib
import http.client
import ipaddress
import json
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device_drivers.errors import DeviceDriverError
from ingest import keys
from ingest.transport import TlsFiles

GATEWAY_TIMEOUT_S = 30
# A gateway busy with enrollments from this address (429) is asked again after the wait it
# names (at most ENROLL_BUSY_WAIT_S), this many times in all.
ENROLL_BUSY_TRIES = 5
ENROLL_BUSY_WAIT_S = 60.0
# The gateway's answers are a few KiB (certificates); anything much larger is not one.
MAX_ANSWER_BYTES = 256 * 1024
# What a site's QR code (or ``trialstream site enroll-code``) gives a hub: the gateway's
# address, the single-use code and the SHA-256 of the study CA's certificate.
ENROLL_URI_PREFIX = "trialstream:enroll?"
MAX_ENROLL_URI = 1024
MAX_GATEWAY_URL = 512
_CODE = re.compile(r"[A-Za-z0-9-]{1,64}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


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
    # The broker's other addresses (a cluster's nodes), tried in turn when one fails; and
    # whether it speaks MQTT 5 (else 3.1.1, as RabbitMQ 3.10 does). Both from enrollment.
    broker_alternates: tuple[tuple[str, int], ...] = ()
    broker_mqtt5: bool = True

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
                "run `trialstream-hub enroll 'trialstream:enroll?...'` with the site's code"
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
                _alternates(record["broker"].get("alternates", [])),
                bool(record["broker"].get("mqtt5", True)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise HubIdentityError(f"{directory / 'hub.json'} is incomplete: {exc}") from exc


MAX_BROKER_ALTERNATES = 16


def _alternates(given: object) -> tuple[tuple[str, int], ...]:
    """The broker's other addresses as the gateway gave them, each checked."""
    if not isinstance(given, list) or len(given) > MAX_BROKER_ALTERNATES:
        raise ValueError(f"broker alternates: expected at most {MAX_BROKER_ALTERNATES}")
    out = []
    for a in given:
        host, port = a["host"], a["port"]
        if not isinstance(host, str) or not 0 < len(host) <= 253 or not host.isprintable():
            raise ValueError("broker alternates: a host is not a host name")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError("broker alternates: a port is not a port")
        out.append((host, port))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class EnrollmentTicket:
    """What enrolling needs: where the gateway is, the code, and the CA to pin."""

    gateway_url: str
    code: str
    # SHA-256 (hex) of the study CA certificate's DER; None only for a loopback gateway.
    ca_sha256: str | None = None


def parse_enrollment(text: str) -> EnrollmentTicket:
    """The ticket in a ``trialstream:enroll?gateway=...&code=...&ca=...`` text (a QR code's),
    every part checked before use."""
    if len(text) > MAX_ENROLL_URI or not text.isascii() or not text.isprintable():
        raise HubIdentityError("not an enrollment code: too long, or not printable ASCII")
    if not text.startswith(ENROLL_URI_PREFIX):
        raise HubIdentityError(f"not an enrollment code: it must start with {ENROLL_URI_PREFIX}")
    try:
        fields = parse_qs(text[len(ENROLL_URI_PREFIX) :], strict_parsing=True, max_num_fields=3)
    except ValueError as exc:
        raise HubIdentityError(f"not an enrollment code: {exc}") from exc
    if any(len(v) != 1 for v in fields.values()) or not {"gateway", "code"} <= fields.keys():
        raise HubIdentityError("not an enrollment code: it needs one gateway and one code")
    ca = fields.get("ca", [None])[0]
    return checked_ticket(fields["gateway"][0], fields["code"][0], ca)


def checked_ticket(gateway_url: str, code: str, ca_sha256: str | None) -> EnrollmentTicket:
    """A ticket whose parts are well formed, whose gateway is reached over HTTPS (plain HTTP
    only on this machine), and which pins the study CA unless the gateway is on this
    machine: the code and the hub's certificate must not cross a network in clear, and the
    CA that will verify the broker must be the one the site's code names."""
    if not _CODE.fullmatch(code):
        raise HubIdentityError("the enrollment code is malformed (letters, digits and -)")
    if ca_sha256 is not None:
        ca_sha256 = ca_sha256.lower().removeprefix("sha256:")
        if not _SHA256_HEX.fullmatch(ca_sha256):
            raise HubIdentityError("the CA fingerprint is not a SHA-256 in hex")
    if len(gateway_url) > MAX_GATEWAY_URL or not gateway_url.isascii():
        raise HubIdentityError("the gateway address is too long or not ASCII")
    try:
        url = urlsplit(gateway_url)
        host = url.hostname
        url.port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError as exc:
        raise HubIdentityError(f"the gateway address is not a URL: {exc}") from exc
    if url.scheme not in ("https", "http") or not host or url.username or url.password:
        raise HubIdentityError("the gateway address must be https://host[:port]")
    local = _is_loopback(host)
    if url.scheme == "http" and not local:
        raise HubIdentityError(
            f"refusing plain http to {host}: the code and the hub's certificate would cross"
            " the network in clear; use the gateway's https address"
        )
    if ca_sha256 is None and not local:
        raise HubIdentityError(
            "the enrollment code does not name the study CA (ca=...): use the whole code from"
            " the site's QR code or `trialstream site enroll-code`"
        )
    return EnrollmentTicket(gateway_url.rstrip("/"), code, ca_sha256)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ca_fingerprint(ca_pem: str) -> str:
    """SHA-256 (hex) of a CA certificate's DER, as enrollment codes carry it."""
    try:
        cert = x509.load_pem_x509_certificate(ca_pem.encode())
    except ValueError as exc:
        raise HubIdentityError(f"the gateway's CA certificate cannot be read: {exc}") from exc
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


async def post_json(url: str, request: dict[str, Any]) -> tuple[dict[str, Any], int, float]:
    """POST ``request`` to the gateway: its answer (a JSON object), its status and the wait it
    asks for (``Retry-After``, bounded). Anything else the gateway could send is refused here,
    a body nested too deeply or a number too long to convert included.

    The standard library's HTTP client, in a worker thread: the hub installs without the
    server's HTTP stack (aiohttp)."""
    try:
        raw_body, status, raw = await asyncio.wait_for(
            asyncio.to_thread(_post, url, json.dumps(request).encode()), GATEWAY_TIMEOUT_S + 5
        )
    except (OSError, http.client.HTTPException, TimeoutError, ValueError) as exc:
        raise HubIdentityError(f"cannot reach the gateway at {url}: {exc}") from exc
    if len(raw_body) > MAX_ANSWER_BYTES:
        raise HubIdentityError(f"the gateway at {url} sent an answer too large to read")
    try:
        body = json.loads(raw_body)
    except (ValueError, RecursionError) as exc:
        raise HubIdentityError(f"the gateway at {url} did not answer with JSON") from exc
    if not isinstance(body, dict):
        raise HubIdentityError(f"the gateway at {url} did not answer with a JSON object")
    wait = float(raw) if raw.isdigit() and len(raw) <= 4 else ENROLL_BUSY_WAIT_S
    return body, status, min(max(wait, 1.0), ENROLL_BUSY_WAIT_S)


def _post(url: str, data: bytes) -> tuple[bytes, int, str]:
    """One POST (blocking): the body read up to one byte past the limit, status, Retry-After.

    ``http.client`` directly: no proxy from the environment, no redirect followed (an answer
    to refuse, not to chase), and the connection kept alive until the hub closes it, so the
    closing side (and its TIME_WAIT) is the hub's, never the gateway's listening port."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(
            host, parts.port, timeout=GATEWAY_TIMEOUT_S, context=ssl.create_default_context()
        )
    else:
        conn = http.client.HTTPConnection(host, parts.port, timeout=GATEWAY_TIMEOUT_S)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request("POST", target, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        length = resp.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > MAX_ANSWER_BYTES:
            raise HubIdentityError(f"the gateway at {url} sent an answer too large to read")
        body = resp.read(MAX_ANSWER_BYTES + 1)
        return body, resp.status, resp.headers.get("Retry-After", "")
    finally:
        conn.close()


def make_csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The CSR sent with the code; the gateway chooses the name (the device id) itself."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pending-enrollment")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def write_whole(path: Path, data: str, *, durable: bool = False) -> None:
    """Replace ``path`` with ``data`` at once (a temporary file renamed over it): a reader or
    a crash finds the old text or the new, never half. ``durable``: on disk before the
    rename."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
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
        write_whole(directory / "hub.pem", body["certificate_pem"])
        write_whole(directory / "ca.pem", body["ca_pem"])
        write_whole(directory / "receipt.pem", body["receipt_key_pem"])
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
    write_whole(directory / "hub.json", json.dumps(record, indent=2) + "\n")
    return HubIdentity.load(directory)


async def enroll(directory: Path, ticket: EnrollmentTicket) -> HubIdentity:
    """Enroll this hub with ``ticket``; refuses if the directory already holds an identity,
    and keeps nothing of an answer whose CA is not the one the ticket pins."""
    ticket = checked_ticket(ticket.gateway_url, ticket.code, ticket.ca_sha256)
    key = await asyncio.to_thread(_prepare, directory)
    url = ticket.gateway_url + "/api/v1/enrollments"
    request = {"code": ticket.code, "csr": make_csr(key).decode()}
    for attempt in range(1, ENROLL_BUSY_TRIES + 1):
        body, status, retry_after = await post_json(url, request)
        if status != 429 or attempt == ENROLL_BUSY_TRIES:
            break
        # Too many enrollments from this address for now: wait as the gateway asks.
        await asyncio.sleep(retry_after)
    if status != 201:
        title = body.get("title") or body.get("detail") or f"HTTP {status}"
        raise HubIdentityError(f"the gateway refused the enrollment: {title}")
    ca_pem = body.get("ca_pem")
    if not isinstance(ca_pem, str):
        raise HubIdentityError("the gateway's enrollment answer has no CA certificate")
    if ticket.ca_sha256 is not None and ca_fingerprint(ca_pem) != ticket.ca_sha256:
        raise HubIdentityError(
            "the gateway answered with a CA other than the one the enrollment code names;"
            " nothing was kept (ask the site for a new code)"
        )
    return await asyncio.to_thread(_store, directory, ticket.gateway_url, body)
