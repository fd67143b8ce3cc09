"""The API's session (sign in, show, sign out) and user operations."""

from __future__ import annotations

from aiohttp import web

from gateway.web import auth
from gateway.web.access import ADMIN_ONLY, EVERYONE
from gateway.web.api_common import ID_PATTERN, V1, iso, pool_of
from gateway.web.errors import BadInput, Conflict
from gateway.web.schemas import SESSION, TIME, USER, USER_ROW, arr, obj
from gateway.web.spec import Ctx, Endpoint, Field
from storage import users, views

USERNAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"


# --- handlers: session ----------------------------------------------------------------------


async def login(ctx: Ctx) -> web.StreamResponse:
    return await auth.sign_in(ctx.request, ctx.body["username"], ctx.body["password"])


async def get_session(ctx: Ctx) -> web.StreamResponse:
    return web.json_response(
        {"user": auth.user_json(ctx.user.user), "csrf_token": ctx.user.csrf_token}
    )


async def logout(ctx: Ctx) -> web.StreamResponse:
    return await auth.sign_out(ctx.request, ctx.user)


# --- handlers: users ------------------------------------------------------------------------


async def create_user(ctx: Ctx) -> web.StreamResponse:
    b = ctx.body
    async with pool_of(ctx).connection() as conn:
        try:
            user = await users.create_user(
                conn,
                actor=ctx.user.username,
                username=b["username"],
                display_name=b["display_name"],
                role=users.Role(b["role"]),
                password=b["password"],
                participant_id=b["participant_id"],
                sites=b["sites"] or (),
            )
        except users.DuplicateUser as exc:
            raise Conflict(str(exc)) from exc
        except users.InvalidUser as exc:
            raise BadInput(str(exc)) from exc
    return web.json_response(auth.user_json(user), status=201)


async def list_users(ctx: Ctx) -> web.StreamResponse:
    async with pool_of(ctx).connection() as conn:
        rows = await views.user_list(conn)
    return web.json_response(
        {
            "users": [
                {
                    "username": u.username,
                    "display_name": u.display_name,
                    "role": u.role,
                    "participant_id": u.participant_id,
                    "sites": list(u.sites),
                    "locked": u.locked,
                    "disabled": u.disabled,
                    "created_at": iso(u.created_at),
                }
                for u in rows
            ]
        }
    )


# --- the operations -----------------------------------------------------------------------

SESSION_ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "POST",
        f"{V1}/session",
        "login",
        "Sign in",
        login,
        None,
        "session",
        body=(Field("username", max_len=128), Field("password", max_len=1024)),
        ok_schema={**SESSION, "properties": {**SESSION["properties"], "expires_at": TIME}},
        description="Checks the password (lockout after repeated failures) and sets the "
        "session cookie.",
        extra_statuses=(429,),
    ),
    Endpoint(
        "GET",
        f"{V1}/session",
        "get_session",
        "Show the session",
        get_session,
        EVERYONE,
        "session",
        ok_schema=SESSION,
    ),
    Endpoint(
        "DELETE",
        f"{V1}/session",
        "logout",
        "Sign out",
        logout,
        EVERYONE,
        "session",
        ok_status=204,
        ok_content_type="none",
    ),
)


USER_ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "GET",
        f"{V1}/users",
        "list_users",
        "List users",
        list_users,
        ADMIN_ONLY,
        "users",
        ok_schema=obj({"users": arr(USER_ROW)}),
    ),
    Endpoint(
        "POST",
        f"{V1}/users",
        "create_user",
        "Create a user",
        create_user,
        ADMIN_ONLY,
        "users",
        body=(
            Field("username", pattern=USERNAME_PATTERN, max_len=64),
            Field("display_name", max_len=200),
            Field("role", enum=tuple(r.value for r in users.Role)),
            Field("password", min_len=users.MIN_PASSWORD_LENGTH, max_len=1024),
            Field("participant_id", required=False, pattern=ID_PATTERN, max_len=64),
            Field("sites", kind="array", required=False, pattern=ID_PATTERN, max_len=64),
        ),
        ok_status=201,
        ok_schema=USER,
        conflicts=True,
    ),
)
