"""The versioned JSON API under ``/api/v1``: its operations, in one list.

``ENDPOINTS`` is the one list: the router, the access checks and the OpenAPI document
(``GET /api/v1/openapi.json``) all come from it (``gateway.web.spec``). Handlers receive
checked parameters and check the site themselves (``gateway.web.access``).

The operations and their handlers live by concern: session and users (``api_people``),
sites, participants, readings and rollups (``api_participants``), consent
(``api_consent``), alerts (``api_alerts``) and exports (``api_exports``); the answers'
JSON schemas are in ``gateway.web.schemas``, what the handlers share in
``gateway.web.api_common``. Their order here is the OpenAPI document's.
"""

from __future__ import annotations

from aiohttp import web

from gateway.web import (
    api_adherence,
    api_alerts,
    api_consent,
    api_exports,
    api_participants,
    api_people,
    api_queries,
    api_review,
)
from gateway.web.access import ADMIN_ONLY
from gateway.web.api_common import V1
from gateway.web.schemas import INT, NULL_TIME, STR, TIME, arr, obj
from gateway.web.spec import Ctx, Endpoint, Field, openapi_document

DEVICE_ID = Field("device_id", max_len=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# What every request a hub signs carries (ingest.hub_requests).
SIGNED = (
    Field("signed_at_ms", kind="integer", minimum=0, maximum=2**53),
    Field("signature", max_len=128, description="ECDSA P-256 / SHA-256, base64 (DER)"),
)


async def get_openapi(ctx: Ctx) -> web.StreamResponse:
    return web.json_response(openapi_document(ENDPOINTS))


# --- the operations -----------------------------------------------------------------------

ENDPOINTS: tuple[Endpoint, ...] = (
    *api_people.SESSION_ENDPOINTS,
    *api_participants.ENDPOINTS,
    *api_consent.ENDPOINTS,
    *api_adherence.ENDPOINTS,
    *api_alerts.ENDPOINTS,
    *api_queries.ENDPOINTS,
    *api_review.ENDPOINTS,
    *api_exports.ENDPOINTS,
    *api_people.USER_ENDPOINTS,
    Endpoint(
        "POST",
        f"{V1}/enrollments",
        "enroll_hub",
        "Enroll a hub",
        get_openapi,
        None,
        "hubs",
        body=(Field("code", max_len=64), Field("csr", max_len=8192)),
        ok_status=201,
        ok_schema=obj(
            {
                "device_id": STR,
                "participant_id": STR,
                "study_id": STR,
                "certificate_pem": STR,
                "ca_pem": STR,
                "receipt_key_pem": STR,
                "broker": obj(
                    {
                        "host": STR,
                        "port": INT,
                        "tls": {"type": "boolean"},
                        "alternates": arr(obj({"host": STR, "port": INT})),
                        "mqtt5": {"type": "boolean"},
                    }
                ),
                "topics": {"type": "object"},
            }
        ),
        extra_statuses=(404, 409, 410, 429),
        routed=False,
        description="A hub redeems a single-use enrollment code and a PEM certificate signing "
        "request for its identity (routed in gateway.hub_routes).",
    ),
    Endpoint(
        "POST",
        f"{V1}/devices/{{device_id}}/certificates",
        "renew_hub_certificate",
        "Renew a hub's certificate",
        get_openapi,
        None,
        "hubs",
        path_params=(DEVICE_ID,),
        body=(*SIGNED, Field("csr", max_len=8192)),
        ok_status=201,
        ok_schema=obj({"device_id": STR, "certificate_pem": STR, "serial": STR, "not_after": TIME}),
        extra_statuses=(403, 429),
        routed=False,
        description="An enrolled hub renews its certificate, for the key it enrolled with, with "
        "a request signed by that key (ingest.hub_requests). Refused for a revoked hub and "
        "for one whose certificate has expired (it enrolls again); a renewal within minutes "
        "of the last answers with that certificate again.",
    ),
    Endpoint(
        "POST",
        f"{V1}/devices/{{device_id}}/standing",
        "hub_standing",
        "A hub's standing",
        get_openapi,
        None,
        "hubs",
        path_params=(DEVICE_ID,),
        body=SIGNED,
        ok_schema=obj(
            {
                "device_id": STR,
                "status": {"type": "string", "enum": ["active", "revoked", "expired"]},
                "revoked_at": NULL_TIME,
                "certificate_not_after": NULL_TIME,
            }
        ),
        extra_statuses=(429,),
        routed=False,
        description="An enrolled hub asks, with a request signed by its key, whether it is "
        "active, revoked or expired; a revoked or expired hub stops relaying.",
    ),
    Endpoint(
        "GET",
        f"{V1}/openapi.json",
        "get_openapi",
        "This document",
        get_openapi,
        ADMIN_ONLY,
        "meta",
        ok_schema={"type": "object"},
        description="For admins: it maps every operation the gateway offers.",
    ),
)
