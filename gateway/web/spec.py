"""One description per API operation, from which come both its checks and its OpenAPI entry.

An :class:`Endpoint` names the method, path, roles, parameters, body fields and responses of
one operation. :func:`handler_for` wraps its handler with the checks every call gets, in this
order: signed in (401), role (403), CSRF token on a change (403), parameters and body against
the same fields the document shows (400); the handler then checks the site (404).
:func:`openapi_document` builds the document from the same list, so what is served is what
is checked.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.problems import problem, read_json_object
from gateway.web import auth, trail
from gateway.web.access import Principal
from gateway.web.errors import BadInput, Forbidden, Unauthenticated, WebError
from ingest.wire import TEXT_CONTROL_RE
from storage.users import Role

log = logging.getLogger(__name__)

JSON = "application/json"
PROBLEM = "application/problem+json"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True, slots=True)
class Field:
    """A JSON body field or a query/path parameter."""

    name: str
    kind: str = "string"  # string | integer | boolean | array (of strings)
    required: bool = True
    max_len: int = 200
    min_len: int = 1
    pattern: str | None = None
    enum: tuple[str, ...] | None = None
    minimum: int | None = None
    maximum: int | None = None
    max_items: int = 32
    description: str = ""
    default: Any = None

    def schema(self) -> dict[str, Any]:
        if self.kind == "integer":
            s: dict[str, Any] = {"type": "integer"}
            if self.minimum is not None:
                s["minimum"] = self.minimum
            if self.maximum is not None:
                s["maximum"] = self.maximum
        elif self.kind == "boolean":
            s = {"type": "boolean"}
        elif self.kind == "array":
            s = {
                "type": "array",
                "items": self._string_schema(),
                "maxItems": self.max_items,
                "uniqueItems": True,
            }
        else:
            s = self._string_schema()
        if self.description:
            s["description"] = self.description
        if self.default is not None:
            s["default"] = self.default
        return s

    def _string_schema(self) -> dict[str, Any]:
        if self.enum is not None:
            return {"type": "string", "enum": list(self.enum)}
        s: dict[str, Any] = {"type": "string", "minLength": self.min_len, "maxLength": self.max_len}
        s["pattern"] = self.pattern or r"^[^\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f]*$"
        return s

    def check_string(self, value: object) -> str:
        if not isinstance(value, str):
            raise BadInput(f"{self.name!r} must be a string", field=self.name)
        if self.enum is not None:
            if value not in self.enum:
                raise BadInput(f"{self.name!r} must be one of {list(self.enum)}", field=self.name)
            return value
        if not self.min_len <= len(value) <= self.max_len:
            raise BadInput(
                f"{self.name!r} must have {self.min_len} to {self.max_len} characters",
                field=self.name,
            )
        if TEXT_CONTROL_RE.search(value):  # bounded, and no control characters
            raise BadInput(f"{self.name!r} must not contain control characters", field=self.name)
        if self.pattern is not None and re.search(self.pattern, value) is None:
            raise BadInput(f"{self.name!r} does not have the expected form", field=self.name)
        return value

    def check(self, value: object) -> object:
        if self.kind == "integer":
            if isinstance(value, bool) or not isinstance(value, int):
                raise BadInput(f"{self.name!r} must be an integer", field=self.name)
            if (self.minimum is not None and value < self.minimum) or (
                self.maximum is not None and value > self.maximum
            ):
                raise BadInput(
                    f"{self.name!r} must be between {self.minimum} and {self.maximum}",
                    field=self.name,
                )
            return value
        if self.kind == "boolean":
            if not isinstance(value, bool):
                raise BadInput(f"{self.name!r} must be true or false", field=self.name)
            return value
        if self.kind == "array":
            if not isinstance(value, list) or len(value) > self.max_items:
                raise BadInput(
                    f"{self.name!r} must be a list of at most {self.max_items} strings",
                    field=self.name,
                )
            items = [self.check_string(v) for v in value]
            if len(set(items)) != len(items):
                raise BadInput(f"{self.name!r} has an item twice", field=self.name)
            return items
        return self.check_string(value)

    def from_query(self, raw: str) -> object:
        """A query or path parameter's text, converted and checked like a body field."""
        if self.kind == "integer":
            if not re.fullmatch(r"-?[0-9]{1,19}", raw):
                raise BadInput(f"{self.name!r} must be an integer", field=self.name)
            return self.check(int(raw))
        return self.check(raw)


@dataclass(frozen=True, slots=True)
class Ctx:
    request: web.Request
    principal: Principal | None
    path: Mapping[str, Any]
    query: Mapping[str, Any]
    body: Mapping[str, Any]

    @property
    def user(self) -> Principal:
        assert self.principal is not None, "only called by handlers of signed-in operations"
        return self.principal


Handler = Callable[[Ctx], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: str
    path: str  # OpenAPI form: /api/v1/sites/{site_id}
    operation_id: str
    summary: str
    handler: Handler
    roles: frozenset[Role] | None  # None: no sign-in needed
    tag: str
    path_params: tuple[Field, ...] = ()
    query: tuple[Field, ...] = ()
    body: tuple[Field, ...] | None = None
    ok_status: int = 200
    ok_schema: Mapping[str, Any] = field(default_factory=dict)
    ok_content_type: str = JSON
    conflicts: bool = False  # may answer 409
    description: str = ""
    extra_statuses: tuple[int, ...] = ()
    # False: documented here, routed elsewhere (the hubs' routes, in gateway.hub_routes).
    routed: bool = True
    # A read of participants' health data, recorded in the audit trail (gateway.web.trail);
    # streams record themselves as they open.
    audit_read: bool = False

    @property
    def aiohttp_path(self) -> str:
        path = self.path
        for p in self.path_params:
            if p.kind == "integer":
                path = path.replace("{" + p.name + "}", "{" + p.name + ":[0-9]+}")
        return path


def _problem_of(exc: WebError) -> web.Response:
    return problem(exc.status, exc.kind, exc.title, exc.detail, **exc.extra)


async def _checked(ep: Endpoint, request: web.Request) -> Ctx:
    principal = await auth.principal_of(request)
    if ep.roles is not None:
        if principal is None:
            raise Unauthenticated("sign in first")
        if principal.role not in ep.roles:
            raise Forbidden(f"a {principal.role.value} may not {ep.summary.lower()}")
        if request.method in UNSAFE_METHODS:
            auth.check_csrf(request, principal)
    path = {p.name: p.from_query(request.match_info[p.name]) for p in ep.path_params}
    query: dict[str, Any] = {}
    for p in ep.query:
        values = request.query.getall(p.name, [])
        if len(values) > 1:
            raise BadInput(f"{p.name!r} given more than once", field=p.name)
        if values:
            query[p.name] = p.from_query(values[0])
        elif p.required:
            raise BadInput(f"{p.name!r} is required", field=p.name)
        else:
            query[p.name] = p.default
    body: dict[str, Any] = {}
    if ep.body is not None:
        raw = await read_json_object(request)
        known = {f.name for f in ep.body}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise BadInput(f"unknown fields {unknown}", field=unknown[0])
        for f in ep.body:
            if f.name in raw:
                body[f.name] = f.check(raw[f.name])
            elif f.required:
                raise BadInput(f"{f.name!r} is required", field=f.name)
            else:
                body[f.name] = f.default
    return Ctx(request, principal, path, query, body)


def handler_for(ep: Endpoint) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    about_participant = any(p.name == "participant_id" for p in ep.path_params)

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            ctx = await _checked(ep, request)
            resp = await ep.handler(ctx)
        except WebError as exc:
            if exc.status in (401, 403):
                log.info(
                    "refused operation=%s status=%d user=%s",
                    ep.operation_id,
                    exc.status,
                    request.get(auth.REQUEST_USER, "-"),
                )
            principal = request.get(auth.REQUEST_PRINCIPAL)
            if about_participant and exc.status in (403, 404) and principal is not None:
                await _record_refusal(request, principal, ep.operation_id, exc.status)
            return _problem_of(exc)
        except web.HTTPException:
            raise
        except Exception:
            log.exception("operation failed operation=%s", ep.operation_id)
            return problem(500, "internal-error", "the gateway could not answer this request")
        if ep.audit_read and ctx.principal is not None:
            try:
                await trail.record(
                    request,
                    ctx.principal,
                    trail.READ,
                    ep.operation_id,
                    participant_id=ctx.path.get("participant_id"),
                    query=ctx.query,
                )
            except Exception:
                # Fail closed: a read that is not on record is not answered.
                log.exception("read not recorded; not answered operation=%s", ep.operation_id)
                return problem(500, "internal-error", "the gateway could not record this read")
        return resp

    handle.__name__ = ep.operation_id
    return handle


async def _record_refusal(
    request: web.Request, principal: Principal, operation: str, status: int
) -> None:
    try:
        await trail.record(
            request,
            principal,
            trail.REFUSED,
            operation,
            participant_id=_claimed_participant(request),
            status=status,
        )
    except Exception:  # the refusal stands; the log says it went unrecorded
        log.exception("refusal not recorded operation=%s", operation)


_CLAIMED_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _claimed_participant(request: web.Request) -> str:
    """The participant id a refused request named, as far as it is a valid id."""
    claimed = request.match_info.get("participant_id", "")
    return claimed if _CLAIMED_ID.fullmatch(claimed) else "(not a valid id)"


# --- the OpenAPI document -----------------------------------------------------------------

PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "title", "status"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "field": {"type": "string"},
    },
}

_STATUS_TEXT = {
    400: "The parameters or the body are not acceptable.",
    401: "Not signed in, or the session ended.",
    403: "The user's role may not do this, or the CSRF token is missing.",
    404: "No such resource within the user's sites.",
    409: "The resource is not in a state that allows this.",
    413: "The body is larger than the gateway accepts.",
    415: "The body must be application/json.",
    410: "The resource has expired.",
    429: "Too many requests of this kind from this address or account; Retry-After says when"
    " to ask again.",
}


def _problem_response(status: int) -> dict[str, Any]:
    return {
        "description": _STATUS_TEXT[status],
        "content": {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


def _operation(ep: Endpoint) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": ep.operation_id,
        "summary": ep.summary,
        "tags": [ep.tag],
        "x-roles": sorted(r.value for r in ep.roles) if ep.roles is not None else ["public"],
    }
    if ep.description:
        op["description"] = ep.description
    params = [
        {"name": p.name, "in": "path", "required": True, "schema": p.schema()}
        for p in ep.path_params
    ] + [
        {"name": p.name, "in": "query", "required": p.required, "schema": p.schema()}
        for p in ep.query
    ]
    if params:
        op["parameters"] = params
    if ep.body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {
                JSON: {
                    "schema": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": [f.name for f in ep.body if f.required],
                        "properties": {f.name: f.schema() for f in ep.body},
                    }
                }
            },
        }
    ok: dict[str, Any] = {"description": "Success."}
    if ep.ok_status == 204:
        pass
    elif ep.ok_content_type == JSON:
        ok["content"] = {JSON: {"schema": dict(ep.ok_schema)}}
    else:
        ok["content"] = {ep.ok_content_type: {"schema": {"type": "string"}}}
    responses: dict[str, Any] = {str(ep.ok_status): ok}
    statuses: list[int] = []
    if ep.query or ep.path_params or ep.body is not None:
        statuses.append(400)
    if ep.roles is not None:
        statuses += [401, 403]
    elif ep.body is not None:
        statuses.append(401)  # sign-in refused
    if ep.path_params:
        statuses.append(404)
    if ep.conflicts:
        statuses.append(409)
    if ep.body is not None:
        statuses += [413, 415]
    statuses += [s for s in ep.extra_statuses if s not in statuses]
    for status in sorted(statuses):
        responses[str(status)] = _problem_response(status)
    op["responses"] = responses
    if ep.roles is not None:
        op["security"] = [{"session": []}]
    else:
        op["security"] = []
    return op


def openapi_document(endpoints: Sequence[Endpoint]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for ep in endpoints:
        paths.setdefault(ep.path, {})[ep.method.lower()] = _operation(ep)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "trialstream API",
            "version": "1",
            "description": "The people-facing API of the trialstream gateway. Sign in with "
            "POST /api/v1/session; the session is a cookie, and every request that changes "
            "something carries the session's CSRF token in the X-CSRF-Token header. Errors "
            "are problem details (RFC 9457).",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": {"Problem": PROBLEM_SCHEMA},
            "securitySchemes": {"session": {"type": "apiKey", "in": "cookie", "name": auth.COOKIE}},
        },
    }
