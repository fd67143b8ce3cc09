"""Errors of the web layer; each becomes a problem-details response with its status."""

from __future__ import annotations

from typing import Any

from gateway.errors import GatewayError


class WebError(GatewayError):
    """Base of the web errors: ``status`` and ``kind`` make the problem response."""

    status = 400
    kind = "bad-request"

    def __init__(self, title: str, detail: str | None = None, **extra: Any) -> None:
        super().__init__(title)
        self.title = title
        self.detail = detail
        self.extra = extra


class BadInput(WebError):
    status = 400
    kind = "invalid-field"


class Unauthenticated(WebError):
    status = 401
    kind = "unauthenticated"


class Forbidden(WebError):
    """The user's role may not do this (or a change came without its CSRF token)."""

    status = 403
    kind = "forbidden"


class NotFound(WebError):
    """Absent, or outside the user's sites: the two are not told apart."""

    status = 404
    kind = "not-found"


class Conflict(WebError):
    status = 409
    kind = "conflict"


class Locked(WebError):
    status = 423
    kind = "account-locked"
