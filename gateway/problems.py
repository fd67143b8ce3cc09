"""Errors as JSON problem details (RFC 9457), for every API response that is not a success.

A middleware turns aiohttp's own HTTP errors (404, 405, 413 for an oversized body) into the
same shape, so a client parses one format whatever went wrong.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

PROBLEM_TYPE_BASE = "https://trialstream.invalid/problems/"
CONTENT_TYPE = "application/problem+json"


def problem(
    status: int, kind: str, title: str, detail: str | None = None, **extra: Any
) -> web.Response:
    body: dict[str, Any] = {"type": PROBLEM_TYPE_BASE + kind, "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return web.Response(status=status, text=json.dumps(body), content_type=CONTENT_TYPE)


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400/415 problem raised as an HTTP error."""
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(
            text=json.dumps(
                {
                    "type": PROBLEM_TYPE_BASE + "unsupported-media-type",
                    "title": "the body must be application/json",
                    "status": 415,
                }
            ),
            content_type=CONTENT_TYPE,
        )
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError) as exc:
        # ValueError covers JSONDecodeError and an integer of more digits than Python converts.
        raise _bad_request("malformed-json", "the body is not valid JSON", str(exc)) from exc
    except RecursionError as exc:
        raise _bad_request("malformed-json", "the body nests too deeply") from exc
    if not isinstance(body, dict):
        raise _bad_request("malformed-json", "the body must be a JSON object")
    return body


def require_str(body: dict[str, Any], name: str, *, max_len: int = 10_000) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise _bad_request("invalid-field", f"{name!r} must be a non-empty string", field=name)
    if len(value) > max_len:
        raise _bad_request(
            "invalid-field", f"{name!r} is longer than {max_len} characters", field=name
        )
    return value


def require_int(body: dict[str, Any], name: str, *, low: int, high: int) -> int:
    """An integer field within [low, high] (a JSON number without a fraction; not a bool)."""
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad_request("invalid-field", f"{name!r} must be an integer", field=name)
    if not low <= value <= high:
        raise _bad_request(
            "invalid-field", f"{name!r} must be between {low} and {high}", field=name
        )
    return value


def _bad_request(
    kind: str, title: str, detail: str | None = None, **extra: Any
) -> web.HTTPBadRequest:
    body: dict[str, Any] = {"type": PROBLEM_TYPE_BASE + kind, "title": title, "status": 400}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return web.HTTPBadRequest(text=json.dumps(body), content_type=CONTENT_TYPE)


@web.middleware
async def problem_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == CONTENT_TYPE or exc.status < 400:
            raise
        kind = {404: "not-found", 405: "method-not-allowed", 413: "too-large"}.get(
            exc.status, "http-error"
        )
        return problem(exc.status, kind, exc.reason)
