"""The routes hubs call, not people: enrollment, certificate renewal and standing.

- ``POST /api/v1/enrollments`` {code, csr}: a hub redeems its site's code for an identity
  (``gateway/enrollment.py``).
- ``POST /api/v1/devices/{device_id}/certificates`` {csr, signed_at_ms, signature}: an
  enrolled hub renews its certificate (``gateway/renewal.py``).
- ``POST /api/v1/devices/{device_id}/standing`` {signed_at_ms, signature}: an enrolled hub
  asks whether it is active, revoked or expired.

No session or CSRF token: a code, or the hub's own signature, is the credential. Every
refusal, a malformed body included, is on the audit trail with the client's address; the
code itself never is.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway import enrollment, renewal
from gateway.pki import PkiError
from gateway.problems import problem, read_json_object, require_int, require_str
from gateway.settings import broker_addresses
from gateway.web.ratelimit import client_address
from ingest.wire import is_device_id
from storage import audit

log = logging.getLogger(__name__)

ENROLLMENT_STATUS = {
    "malformed_code": 400,
    "unknown_code": 404,
    "code_used": 409,
    "code_expired": 410,
}
HUB_REQUEST_STATUS = {
    "stale_request": 400,
    "invalid_csr": 400,
    "not_authenticated": 401,
    "device_revoked": 403,
    "certificate_expired": 403,
}
MAX_CSR_CHARS = 8_192
# Signed times are milliseconds since 1970; these bounds only keep the number sane (the
# skew check then compares it with the gateway's clock).
SIGNED_AT_BOUNDS = (0, 2**53)


async def _record_refusal(
    request: web.Request, *, action: str, entity: str, entity_id: str, kind: str
) -> None:
    """Put a refusal on record (who tried: the client's address; why: ``kind``) without
    letting a failure to record it change the answer."""
    from gateway.app import POOL  # gateway.app imports this module

    address = client_address(request)
    try:
        async with request.app[POOL].connection() as conn, conn.transaction():
            await audit.append(
                conn,
                actor=f"hub@{address}",
                action=action,
                entity=entity,
                entity_id=entity_id,
                detail={"kind": kind},
            )
    except Exception:  # the refusal stands; the log says it went unrecorded
        log.exception(
            "refused hub request not recorded path=%s address=%s kind=%s",
            request.path,
            address,
            kind,
        )


async def post_enrollment(request: web.Request) -> web.Response:
    from gateway.app import POOL, RECEIPT_KEY, SETTINGS, STUDY_CA

    async def refused(kind: str) -> None:
        await _record_refusal(
            request,
            action="enrollment.refused",
            entity="enrollment",
            entity_id=client_address(request),
            kind=kind,
        )

    try:
        body = await read_json_object(request)
        code = require_str(body, "code", max_len=64)
        csr = require_str(body, "csr", max_len=MAX_CSR_CHARS)
    except web.HTTPException:
        await refused("malformed_request")
        raise
    app = request.app
    settings = app[SETTINGS]
    try:
        async with app[POOL].connection() as conn:
            result = await enrollment.enroll(
                conn, code, csr.encode(), app[STUDY_CA], app[RECEIPT_KEY].public_key()
            )
    except enrollment.EnrollmentError as exc:
        await refused(exc.kind)
        return problem(ENROLLMENT_STATUS.get(exc.kind, 400), exc.kind.replace("_", "-"), str(exc))
    except PkiError as exc:
        await refused("invalid_csr")
        return problem(400, "invalid-csr", str(exc))
    if settings.rabbitmq_admin_url:
        await _broker_identity(settings.rabbitmq_admin_url, result.device_id)
    return web.json_response(
        {
            "device_id": result.device_id,
            "participant_id": result.participant_id,
            "study_id": result.study_id,
            "certificate_pem": result.certificate_pem,
            "ca_pem": result.ca_pem,
            "receipt_key_pem": result.receipt_key_pem,
            "broker": {
                "host": settings.mqtt_host,
                "port": settings.mqtt_port,
                "tls": settings.mqtt_tls,
                "alternates": [
                    {"host": h, "port": p} for h, p in broker_addresses(settings.mqtt_alternates)
                ],
                "mqtt5": settings.mqtt_v5,
            },
            "topics": enrollment.topics(result.device_id),
        },
        status=201,
    )


async def _broker_identity(admin_url: str, device_id: str) -> None:
    """The new hub's user on RabbitMQ. The enrollment stands if the broker cannot be reached:
    the hub then cannot connect until ``trialstream broker sync-hubs`` creates it."""
    from gateway.errors import BrokerError
    from gateway.rabbit_admin import RabbitAdmin

    try:
        await RabbitAdmin(admin_url).add_hub(device_id)
    except BrokerError as exc:
        log.error(
            "hub %s enrolled without its broker identity (run `trialstream broker sync-hubs`): %s",
            device_id,
            exc,
        )


def _device_id(request: web.Request) -> str:
    device_id = request.match_info["device_id"]
    if not is_device_id(device_id):
        raise web.HTTPNotFound()
    return device_id


async def _signed_request(
    request: web.Request, *, with_csr: bool
) -> tuple[str, dict[str, Any], Callable[[str], Awaitable[None]]]:
    """The device id, the checked body, and how to put a refusal of it on record."""
    device_id = _device_id(request)

    async def refused(kind: str) -> None:
        await _record_refusal(
            request,
            action="device.request_refused",
            entity="device",
            entity_id=device_id,
            kind=kind,
        )

    try:
        body = await read_json_object(request)
        fields: dict[str, Any] = {
            "signed_at_ms": require_int(
                body, "signed_at_ms", low=SIGNED_AT_BOUNDS[0], high=SIGNED_AT_BOUNDS[1]
            ),
            "signature": require_str(body, "signature", max_len=128),
        }
        if with_csr:
            fields["csr"] = require_str(body, "csr", max_len=MAX_CSR_CHARS)
    except web.HTTPException:
        await refused("malformed_request")
        raise
    return device_id, fields, refused


def _hub_problem(exc: renewal.HubRequestError) -> web.Response:
    extra: dict[str, Any] = {}
    if exc.server_time_ms is not None:
        extra["server_time_ms"] = exc.server_time_ms
    return problem(
        HUB_REQUEST_STATUS.get(exc.kind, 400), exc.kind.replace("_", "-"), str(exc), None, **extra
    )


async def post_renewal(request: web.Request) -> web.Response:
    from gateway.app import POOL, STUDY_CA

    device_id, fields, refused = await _signed_request(request, with_csr=True)
    try:
        async with request.app[POOL].connection() as conn:
            record = await renewal.renew(
                conn,
                device_id,
                fields["csr"],
                fields["signed_at_ms"],
                fields["signature"],
                request.app[STUDY_CA],
            )
    except renewal.HubRequestError as exc:
        await refused(exc.kind)
        return _hub_problem(exc)
    return web.json_response(
        {
            "device_id": device_id,
            "certificate_pem": record.certificate_pem,
            "serial": record.serial,
            "not_after": record.not_after.isoformat(),
        },
        status=201,
    )


async def post_standing(request: web.Request) -> web.Response:
    from gateway.app import POOL

    device_id, fields, refused = await _signed_request(request, with_csr=False)
    try:
        async with request.app[POOL].connection() as conn:
            found = await renewal.standing(
                conn, device_id, fields["signed_at_ms"], fields["signature"]
            )
    except renewal.HubRequestError as exc:
        await refused(exc.kind)
        return _hub_problem(exc)
    return web.json_response(
        {
            "device_id": device_id,
            "status": found.status,
            "revoked_at": found.revoked_at.isoformat() if found.revoked_at else None,
            "certificate_not_after": (
                found.certificate_not_after.isoformat() if found.certificate_not_after else None
            ),
        }
    )


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/enrollments", post_enrollment)
    app.router.add_post("/api/v1/devices/{device_id}/certificates", post_renewal)
    app.router.add_post("/api/v1/devices/{device_id}/standing", post_standing)
