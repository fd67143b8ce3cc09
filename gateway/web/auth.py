"""Sign-in, sessions and CSRF for the pages and the API.

- Passwords are checked by ``storage.users.verify_password`` (argon2id, lockout after
  repeated failures). Every sign-in, failed sign-in and sign-out is in the audit trail; a
  failure answers the same whatever its cause (unknown name, wrong password, locked or
  disabled account), and the audit record says which it was. Sign-in is rate limited per
  client address and per user name (``gateway.web.ratelimit``): past a limit, 429.
- The session is a random token in the cookie ``__Host-trialstream``: ``HttpOnly`` (no
  script reads it), ``Secure`` (sent over HTTPS only; browsers count loopback addresses as
  secure, so local development works), ``SameSite=Strict`` (never sent by another site's
  page), ``Path=/``. The database keeps only the token's SHA-256 (``storage.sessions``).
- CSRF: each session has a token of its own, given at sign-in and by ``GET
  /api/v1/session``; every request that changes something must carry it in the
  ``X-CSRF-Token`` header. A page of another site can neither read it nor set the header
  without a CORS preflight, which the gateway never grants.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from gateway.web.access import Principal, SessionChecks
from gateway.web.errors import Forbidden, Unauthenticated
from gateway.web.ratelimit import check_request, client_address
from storage import audit, sessions, users

log = logging.getLogger(__name__)

COOKIE = "__Host-trialstream"
CSRF_HEADER = "X-CSRF-Token"
REQUEST_PRINCIPAL = web.RequestKey("principal", Principal)
REQUEST_LOOKED_UP = web.RequestKey("principal_looked_up", bool)
REQUEST_USER = web.RequestKey("username", str)
POOL_KEY = web.AppKey("web_pool", AsyncConnectionPool)
# Where the data endpoints read (readings, rollups, adherence): a pool on
# TRIALSTREAM_READ_DATABASE_URL (a standby), else the same pool as POOL_KEY.
READ_POOL_KEY = web.AppKey("web_read_pool", AsyncConnectionPool)
SESSION_CHECKS_KEY = web.AppKey("session_checks", SessionChecks)


def _pool(request: web.Request) -> AsyncConnectionPool:
    return request.app[POOL_KEY]


async def principal_of(request: web.Request) -> Principal | None:
    """The signed-in user of this request (looked up once per request), or None."""
    if request.get(REQUEST_LOOKED_UP):
        return request.get(REQUEST_PRINCIPAL)
    principal: Principal | None = None
    token = request.cookies.get(COOKIE)
    if token:
        async with _pool(request).connection() as conn:
            session = await sessions.lookup(conn, token)
        if session is not None:
            principal = Principal(session.user, session.csrf_token, token)
            request[REQUEST_PRINCIPAL] = principal
            request[REQUEST_USER] = session.user.username
    request[REQUEST_LOOKED_UP] = True
    return principal


async def require_principal(request: web.Request) -> Principal:
    principal = await principal_of(request)
    if principal is None:
        raise Unauthenticated("sign in first")
    return principal


def check_csrf(request: web.Request, principal: Principal) -> None:
    sent = request.headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(sent.encode(), principal.csrf_token.encode()):
        raise Forbidden("missing or wrong CSRF token", f"send the session's token in {CSRF_HEADER}")


def user_json(user: users.User) -> dict[str, Any]:
    return {
        "username": user.username,
        "display_name": user.display_name,
        "role": user.role.value,
        "participant_id": user.participant_id,
        "sites": sorted(user.sites),
    }


def _remote(request: web.Request) -> str:
    return client_address(request)


async def sign_in(request: web.Request, username: str, password: str) -> web.Response:
    """Check the password; on success start a session and set its cookie.

    The per-address limit is the middleware's; the per-account one is taken here.
    """
    check_request(request, lambda limits: limits.login_per_account, username)
    pool = _pool(request)
    async with pool.connection() as conn:
        try:
            user = await users.verify_password(conn, username, password)
        except users.UserError as exc:
            cause = type(exc).__name__
            async with conn.transaction():
                await audit.append(
                    conn,
                    actor=username,
                    action="user.login_failed",
                    entity="user",
                    entity_id=username,
                    detail={"cause": cause, "remote": _remote(request)},
                )
            log.info("sign-in refused cause=%s", cause)
            raise Unauthenticated(
                "sign-in failed: wrong user name or password, or the account is locked or disabled"
            ) from exc
        async with conn.transaction():
            new = await sessions.create_session(conn, user.user_id)
            await audit.append(
                conn,
                actor=user.username,
                action="user.login",
                entity="user",
                entity_id=user.username,
                detail={"role": user.role.value, "remote": _remote(request)},
            )
    log.info("signed in username=%s role=%s", user.username, user.role.value)
    resp = web.json_response(
        {
            "user": user_json(user),
            "csrf_token": new.csrf_token,
            "expires_at": new.expires_at.isoformat(),
        }
    )
    resp.set_cookie(
        COOKIE,
        new.token,
        path="/",
        secure=True,
        httponly=True,
        samesite="Strict",
        max_age=int(sessions.ABSOLUTE_TIMEOUT.total_seconds()),
    )
    return resp


async def sign_out(request: web.Request, principal: Principal) -> web.Response:
    async with _pool(request).connection() as conn, conn.transaction():
        await sessions.end_session(conn, principal.token)
        await audit.append(
            conn,
            actor=principal.username,
            action="user.logout",
            entity="user",
            entity_id=principal.username,
        )
    resp = web.Response(status=204)
    resp.del_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
    return resp
