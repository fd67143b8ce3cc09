"""The pages the gateway serves: plain HTML shells whose scripts (``static/``) read the API.

Each page checks the signed-in user's role and site before it answers, like the API does;
its data then comes from the API, which checks again. Nothing a user typed is ever put
into a page as markup: the shells carry only escaped ids in ``data-`` attributes, and the
scripts insert text with ``textContent``. A strict Content-Security-Policy (scripts and
styles from the gateway only, no inline script) makes an injected tag inert even if it
got into the markup.
"""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from aiohttp import web

from gateway.web import auth
from gateway.web.access import (
    CLINICAL,
    EVERYONE,
    STAFF_AND_ADMIN,
    Principal,
    require_participant,
    require_site,
    require_study,
)
from gateway.web.errors import NotFound
from storage.users import Role

STATIC_DIR = Path(__file__).parent / "static"

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def render(
    title: str,
    script: str,
    *,
    principal: Principal | None,
    data: dict[str, str] | None = None,
    body: str = "",
    status: int = 200,
) -> web.Response:
    attrs = "".join(
        f' data-{html.escape(k)}="{html.escape(v, quote=True)}"' for k, v in (data or {}).items()
    )
    page_script = f'<script src="/static/{script}" defer></script>' if script else ""
    nav = ""
    if principal is not None:
        nav = (
            '<nav aria-label="account"><span class="who">'
            f"{html.escape(principal.user.display_name)} ({html.escape(principal.role.value)})"
            '</span> <a href="/">Home</a> '
            '<button type="button" id="sign-out">Sign out</button></nav>'
        )
    page = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)} · trialstream</title>
<link rel="stylesheet" href="/static/app.css">
<script src="/static/common.js" defer></script>
{page_script}
</head>
<body{attrs}>
<header><a class="brand" href="/">trialstream</a><h1>{html.escape(title)}</h1>{nav}</header>
<main id="main">{body}</main>
<div id="status" role="status" aria-live="polite"></div>
</body>
</html>
"""
    return web.Response(
        text=page, status=status, content_type="text/html", headers=SECURITY_HEADERS
    )


def _refused(principal: Principal, status: int, text: str) -> web.Response:
    return render(
        "Not available",
        "",
        principal=principal,
        body=f'<p class="refusal">{html.escape(text)}</p>',
        status=status,
    )


PageHandler = Callable[[web.Request, Principal], Awaitable[web.Response]]


@dataclass(frozen=True, slots=True)
class Page:
    path: str
    name: str
    roles: frozenset[Role]
    handler: PageHandler


def _wrap(page: Page) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        principal = await auth.principal_of(request)
        if principal is None:
            raise web.HTTPSeeOther(f"/login?next={quote(request.path_qs, safe='')}")
        if principal.role not in page.roles:
            return _refused(principal, 403, "Your role does not give access to this page.")
        try:
            return await page.handler(request, principal)
        except NotFound:
            return _refused(principal, 404, "There is no such page within your sites.")

    handle.__name__ = f"page_{page.name}"
    return handle


def _pool_conn(request: web.Request):  # type: ignore[no-untyped-def]
    return request.app[auth.POOL_KEY].connection()


async def monitor_board(request: web.Request, principal: Principal) -> web.Response:
    return render("Alert board", "monitor.js", principal=principal, data={"page": "monitor"})


async def live_view(request: web.Request, principal: Principal) -> web.Response:
    pid = request.match_info["participant_id"]
    async with _pool_conn(request) as conn:
        await require_participant(principal, pid, conn)
    return render(
        f"Live: {pid}", "live.js", principal=principal, data={"page": "live", "participant": pid}
    )


async def site_page(request: web.Request, principal: Principal) -> web.Response:
    site_id = request.match_info["site_id"]
    async with _pool_conn(request) as conn:
        site = await require_site(principal, site_id, conn)
    return render(
        f"Site {site.name}",
        "site.js",
        principal=principal,
        data={"page": "site", "site": site_id, "role": principal.role.value},
    )


async def participant_page(request: web.Request, principal: Principal) -> web.Response:
    pid = request.match_info["participant_id"]
    async with _pool_conn(request) as conn:
        await require_participant(principal, pid, conn)
    return render(
        f"Participant {pid}",
        "participant.js",
        principal=principal,
        data={"page": "participant", "participant": pid, "role": principal.role.value},
    )


async def site_adherence_page(request: web.Request, principal: Principal) -> web.Response:
    site_id = request.match_info["site_id"]
    async with _pool_conn(request) as conn:
        site = await require_site(principal, site_id, conn)
    return render(
        f"Adherence: {site.name}",
        "adherence.js",
        principal=principal,
        data={"page": "site-adherence", "site": site_id, "role": principal.role.value},
    )


async def participant_adherence_page(request: web.Request, principal: Principal) -> web.Response:
    pid = request.match_info["participant_id"]
    async with _pool_conn(request) as conn:
        _, site_id = await require_participant(principal, pid, conn)
    return render(
        f"Adherence: {pid}",
        "adherence.js",
        principal=principal,
        data={
            "page": "participant-adherence",
            "participant": pid,
            "site": site_id,
            "role": principal.role.value,
        },
    )


async def study_page(request: web.Request, principal: Principal) -> web.Response:
    study_id = request.match_info["study_id"]
    async with _pool_conn(request) as conn:
        await require_study(principal, study_id, conn)
    return render(
        f"Study {study_id}: locks",
        "study.js",
        principal=principal,
        data={"page": "study", "study": study_id, "role": principal.role.value},
    )


PAGES: tuple[Page, ...] = (
    Page("/monitor", "monitor", CLINICAL, monitor_board),
    Page("/sites/{site_id}", "site", STAFF_AND_ADMIN, site_page),
    Page("/participants/{participant_id}", "participant", EVERYONE, participant_page),
    Page("/participants/{participant_id}/live", "live", CLINICAL, live_view),
    Page("/sites/{site_id}/adherence", "site_adherence", STAFF_AND_ADMIN, site_adherence_page),
    Page("/studies/{study_id}", "study", STAFF_AND_ADMIN, study_page),
    Page(
        "/participants/{participant_id}/adherence",
        "participant_adherence",
        STAFF_AND_ADMIN,
        participant_adherence_page,
    ),
)


async def login_page(request: web.Request) -> web.Response:
    form = """
<form id="login" class="card narrow">
  <label for="username">User name</label>
  <input id="username" name="username" autocomplete="username" required maxlength="128">
  <label for="password">Password</label>
  <input id="password" name="password" type="password" autocomplete="current-password"
         required maxlength="1024">
  <button type="submit">Sign in</button>
  <p id="login-error" class="error" role="alert"></p>
</form>"""
    return render("Sign in", "login.js", principal=None, data={"page": "login"}, body=form)


async def home(request: web.Request) -> web.StreamResponse:
    principal = await auth.principal_of(request)
    if principal is None:
        raise web.HTTPSeeOther("/login")
    user = principal.user
    if user.role is Role.PARTICIPANT and user.participant_id:
        raise web.HTTPSeeOther(f"/participants/{quote(user.participant_id, safe='')}")
    if user.role in (Role.MONITOR, Role.CLINICIAN, Role.ADMIN):
        raise web.HTTPSeeOther("/monitor")
    if user.sites:
        raise web.HTTPSeeOther(f"/sites/{quote(sorted(user.sites)[0], safe='')}")
    return _refused(principal, 403, "Your account has no site yet: ask an admin.")


async def static_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    path = STATIC_DIR / name
    if "/" in name or name.startswith(".") or not path.is_file():
        raise web.HTTPNotFound()
    types = {".js": "text/javascript", ".css": "text/css"}
    return web.Response(
        body=path.read_bytes(),
        content_type=types.get(path.suffix, "application/octet-stream"),
        charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", home)
    app.router.add_get("/login", login_page)
    app.router.add_get("/static/{name}", static_file)
    for page in PAGES:
        app.router.add_get(page.path, _wrap(page))
