"""The hub's credentials over time: its certificate renewed before it expires, and what the
hub does once its site has revoked it or its certificate has lapsed.

Hub certificates last 90 days (the gateway's choice, ``gateway/pki.py``). ``CertificateKeeper``
runs beside the relay and, every ``CHECK_EVERY_S`` (jittered):

- renews the certificate once half its life has passed: a CSR for the hub's own key, in a
  request signed by that key (``ingest/hub_requests.py``), to
  ``POST /api/v1/devices/{device_id}/certificates``. The new certificate replaces ``hub.pem``
  (written whole, then renamed) and the relay presents it from its next TLS handshake on. A
  gateway that cannot be reached is asked again at the next check: the old certificate is
  still good for weeks.
- asks for the hub's standing (``POST /api/v1/devices/{device_id}/standing``) when the relay
  has failed to connect ``STANDING_AFTER_FAILURES`` times in a row (a broker that refuses a
  revoked hub's handshake looks, from here, like any broken connection), at most once per
  ``STANDING_EVERY_S``.

A gateway that answers "revoked" (or "expired": the certificate lapsed before the hub could
renew it) is believed only from a signed conversation over HTTPS with the gateway the hub
enrolled with. The hub then writes ``standing.json`` in its directory, stops relaying and
reading wearables, and ``hub run`` exits with ``EXIT_WITHDRAWN`` and says why; it refuses to
start again until the hub is enrolled anew. Nothing in the outbox is deleted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from device_drivers.identity import (
    HubIdentity,
    HubIdentityError,
    make_csr,
    post_json,
    write_whole,
)
from ingest import hub_requests

log = logging.getLogger(__name__)

# The share of a certificate's life after which the hub renews it.
RENEW_AFTER_FRACTION = 0.5
CHECK_EVERY_S = 6 * 3600.0
STANDING_AFTER_FAILURES = 3
STANDING_EVERY_S = 600.0
# ``hub run`` exits with this when the hub was revoked or its certificate lapsed: a service
# manager should not restart it (deploy/: RestartPreventExitStatus).
EXIT_WITHDRAWN = 4
STANDING_FILE = "standing.json"
ACTIVE = "active"
WITHDRAWN = frozenset({"revoked", "expired"})


class HubWithdrawn(HubIdentityError):
    """The gateway says this hub is revoked or expired: it must stop and be enrolled anew."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class CertificateWindow:
    not_before: datetime
    not_after: datetime
    serial: str

    def renew_at(self) -> datetime:
        return self.not_before + (self.not_after - self.not_before) * RENEW_AFTER_FRACTION


def certificate_window(identity: HubIdentity) -> CertificateWindow:
    """When the hub's current certificate starts and ends."""
    try:
        cert = x509.load_pem_x509_certificate((identity.directory / "hub.pem").read_bytes())
    except (OSError, ValueError) as exc:
        raise HubIdentityError(f"cannot read the hub's certificate: {exc}") from exc
    return CertificateWindow(
        cert.not_valid_before_utc, cert.not_valid_after_utc, format(cert.serial_number, "x")
    )


def withdrawn_message(status: str, detail: dict[str, Any]) -> str:
    if status == "revoked":
        when = detail.get("revoked_at") or "an unknown time"
        return (
            f"this hub was revoked by its site (at {when}): it no longer sends readings."
            " Contact the study site; to use it again it must be enrolled with a new code."
        )
    return (
        "this hub's certificate expired before it could be renewed (it was offline too long):"
        " contact the study site for a new enrollment code."
    )


def recorded_standing(directory: Path) -> dict[str, Any] | None:
    """What ``standing.json`` says (None if the hub was never told it is withdrawn)."""
    try:
        record = json.loads((directory / STANDING_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:
        # Unreadable: treated as withdrawn, so a damaged file never lets a revoked hub run.
        return {"status": "unknown", "detail": {"error": str(exc)}}
    return record if isinstance(record, dict) else {"status": "unknown", "detail": {}}


def check_not_withdrawn(directory: Path) -> None:
    """Refuse to run a hub that was told it is withdrawn (``HubWithdrawn``)."""
    record = recorded_standing(directory)
    if record is None:
        return
    status = str(record.get("status"))
    detail = record.get("detail")
    raise HubWithdrawn(
        status, withdrawn_message(status, detail if isinstance(detail, dict) else {})
    )


def _record_standing(directory: Path, status: str, detail: dict[str, Any]) -> None:
    record = {"status": status, "told_at": datetime.now(UTC).isoformat(), "detail": detail}
    write_whole(directory / STANDING_FILE, json.dumps(record, indent=2) + "\n")


async def _signed(
    identity: HubIdentity, route: str, purpose: str, fields: dict[str, Any], body: bytes
) -> tuple[dict[str, Any], int]:
    """A request signed with the hub's key; signed again once with the gateway's time if the
    hub's clock is too far off (``stale-request``)."""
    url = f"{identity.gateway_url}/api/v1/devices/{identity.device_id}/{route}"
    key = identity.key()
    signed_at = int(time.time() * 1000)
    for _ in range(2):
        signature = hub_requests.sign(key, purpose, identity.device_id, signed_at, body)
        request = {**fields, "signed_at_ms": signed_at, "signature": signature}
        answer, status, _wait = await post_json(url, request)
        server_time = answer.get("server_time_ms")
        stale = status == 400 and _kind(answer) == "stale-request"
        if stale and isinstance(server_time, int) and not isinstance(server_time, bool):
            log.warning(
                "hub clock off by %d ms; signing with the gateway's time", signed_at - server_time
            )
            signed_at = server_time
            continue
        return answer, status
    return answer, status


def _kind(answer: dict[str, Any]) -> str:
    """The kind of a problem document the gateway answered (the last part of its type)."""
    return str(answer.get("type", "")).rsplit("/", 1)[-1]


def _refusal(answer: dict[str, Any], status: int) -> str:
    kind = _kind(answer) or f"http-{status}"
    return f"{kind}: {answer.get('title') or answer.get('detail') or status}"


async def ask_standing(identity: HubIdentity) -> dict[str, Any]:
    """The gateway's answer about this hub: ``status`` active, revoked or expired."""
    answer, status = await _signed(identity, "standing", hub_requests.PURPOSE_STANDING, {}, b"")
    if status != 200 or answer.get("status") not in {ACTIVE, *WITHDRAWN}:
        raise HubIdentityError(
            f"the gateway did not say this hub's standing: {_refusal(answer, status)}"
        )
    return answer


async def renew(identity: HubIdentity) -> CertificateWindow:
    """A new certificate for the hub's key, kept as ``hub.pem``; ``HubWithdrawn`` if the
    gateway refuses because the hub is revoked or expired."""
    csr = make_csr(identity.key()).decode()
    answer, status = await _signed(
        identity, "certificates", hub_requests.PURPOSE_RENEW, {"csr": csr}, csr.encode()
    )
    kind = _kind(answer)
    if status == 403 and kind in ("device-revoked", "certificate-expired"):
        standing = "revoked" if kind == "device-revoked" else "expired"
        raise HubWithdrawn(standing, withdrawn_message(standing, {}))
    if status != 201 or not isinstance(answer.get("certificate_pem"), str):
        raise HubIdentityError(
            f"the gateway did not renew the certificate: {_refusal(answer, status)}"
        )
    pem = answer["certificate_pem"]
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
        ca = x509.load_pem_x509_certificate((identity.directory / "ca.pem").read_bytes())
        cert.verify_directly_issued_by(ca)
    except (OSError, ValueError, TypeError, InvalidSignature) as exc:
        raise HubIdentityError(
            f"the renewed certificate is not one the study CA issued: {exc!r}"
        ) from exc
    if cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != identity.key().public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise HubIdentityError("the renewed certificate is for another key; it was not kept")
    await asyncio.to_thread(write_whole, identity.directory / "hub.pem", pem, durable=True)
    window = certificate_window(identity)
    log.info("certificate renewed device=%s not_after=%s", identity.device_id, window.not_after)
    return window


class CertificateKeeper:
    """Renews the hub's certificate in time and stops the hub once it is withdrawn.

    ``connect_failures`` reads the relay's consecutive failed connections; ``on_renewed`` makes
    the relay present the new certificate (``ClientTls.reload``). ``clock`` is the wall clock
    the renewal time is judged by.
    """

    def __init__(
        self,
        identity: HubIdentity,
        *,
        connect_failures: Callable[[], int] = lambda: 0,
        on_renewed: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
        check_every_s: float = CHECK_EVERY_S,
        standing_after_failures: int = STANDING_AFTER_FAILURES,
        poll_s: float = 5.0,
    ) -> None:
        self.identity = identity
        self._connect_failures = connect_failures
        self._on_renewed = on_renewed
        self._clock = clock
        self._check_every_s = check_every_s
        self._standing_after_failures = standing_after_failures
        self._poll_s = poll_s
        self._last_standing = -float("inf")
        self.renewals = 0
        self.last_error: str | None = None

    async def run(self) -> None:
        """Check at once, then every ``check_every_s`` (jittered); raises ``HubWithdrawn``."""
        await asyncio.to_thread(check_not_withdrawn, self.identity.directory)
        next_check = 0.0
        while True:
            now = time.monotonic()
            if now >= next_check:
                await self.check()
                next_check = now + self._check_every_s * random.uniform(0.9, 1.1)  # noqa: S311
            if self._connect_failures() >= self._standing_after_failures:
                await self.ask_if_due()
            await asyncio.sleep(self._poll_s)

    async def check(self) -> None:
        """Renew if the certificate is past the renewal time."""
        window = certificate_window(self.identity)
        if datetime.fromtimestamp(self._clock(), UTC) < window.renew_at():
            return
        try:
            await renew(self.identity)
        except HubWithdrawn as exc:
            await self._withdrawn(exc.status, {})
        except HubIdentityError as exc:
            self.last_error = str(exc)
            log.warning("certificate not renewed (tried again later): %s", exc)
            return
        self.renewals += 1
        self.last_error = None
        self._on_renewed()

    async def ask_if_due(self) -> None:
        """Ask the gateway for the hub's standing, at most once per ``STANDING_EVERY_S``."""
        now = time.monotonic()
        if now - self._last_standing < STANDING_EVERY_S:
            return
        self._last_standing = now
        try:
            answer = await ask_standing(self.identity)
        except HubIdentityError as exc:
            self.last_error = str(exc)
            log.warning("standing not known (the broker may just be down): %s", exc)
            return
        status = str(answer["status"])
        if status in WITHDRAWN:
            await self._withdrawn(status, {"revoked_at": answer.get("revoked_at")})

    async def _withdrawn(self, status: str, detail: dict[str, Any]) -> None:
        await asyncio.to_thread(_record_standing, self.identity.directory, status, detail)
        message = withdrawn_message(status, detail)
        log.error("hub withdrawn device=%s: %s", self.identity.device_id, message)
        raise HubWithdrawn(status, message)
