"""Sign-in, sessions, lockout, CSRF and the audit of each."""

from __future__ import annotations

from storage import db, users
from tests.web.conftest import PASSWORD, Web

LOGIN = "/api/v1/session"


async def audit_actions(url: str, actor: str) -> list[tuple[str, str]]:
    async with db.connection(url) as conn:
        cur = await conn.execute(
            "SELECT action, detail ->> 'cause' FROM audit_log WHERE actor = %s"
            " AND action LIKE 'user.%%' AND action <> 'user.create' ORDER BY audit_id",
            (actor,),
        )
        return [(str(a), c) for a, c in await cur.fetchall()]


async def test_sign_in_sets_a_locked_down_cookie_and_is_audited(web: Web) -> None:
    resp = await web.gateway.client.post(LOGIN, json={"username": "monitor", "password": PASSWORD})
    assert resp.status == 200
    body = await resp.json()
    assert body["user"] == {
        "username": "monitor",
        "display_name": "Monitor",
        "role": "monitor",
        "participant_id": None,
        "sites": ["SITE-A"],
    }
    cookie = resp.headers["Set-Cookie"]
    assert cookie.startswith("__Host-trialstream=")
    for flag in ("HttpOnly", "Secure", "SameSite=Strict", "Path=/"):
        assert flag in cookie
    assert "Domain" not in cookie
    token = resp.cookies["__Host-trialstream"].value
    async with db.connection(web.trial.url) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM web_sessions WHERE csrf_token = %s", (body["csrf_token"],)
        )
        assert await cur.fetchone() == (1,)
        cur = await conn.execute(
            "SELECT count(*) FROM web_sessions WHERE token_sha256 = sha256(%s::bytea)",
            (token.encode(),),
        )
        assert await cur.fetchone() == (1,)
        cur = await conn.execute(
            "SELECT count(*) FROM web_sessions WHERE csrf_token = %s", (token,)
        )
        assert await cur.fetchone() == (0,)
    assert await audit_actions(web.trial.url, "monitor") == [("user.login", None)]


async def test_failures_answer_alike_and_lock_the_account(web: Web) -> None:
    client = web.gateway.client
    unknown = await client.post(LOGIN, json={"username": "nobody", "password": "whatever it is"})
    wrong = await client.post(LOGIN, json={"username": "clinician", "password": "not the one"})
    assert unknown.status == wrong.status == 401
    assert (await unknown.json())["title"] == (await wrong.json())["title"]
    assert unknown.content_type == "application/problem+json"
    for _ in range(users.MAX_FAILED_LOGINS - 1):
        assert (
            await client.post(LOGIN, json={"username": "clinician", "password": "x"})
        ).status == 401
    # Locked now: even the right password is refused, with the same answer.
    right = await client.post(LOGIN, json={"username": "clinician", "password": PASSWORD})
    assert right.status == 401
    assert (await right.json())["title"] == (await wrong.json())["title"]
    assert "Set-Cookie" not in right.headers
    actions = await audit_actions(web.trial.url, "clinician")
    assert actions.count(("user.login_failed", "InvalidCredentials")) == users.MAX_FAILED_LOGINS
    assert ("user.locked", None) in actions
    assert actions[-1] == ("user.login_failed", "AccountLocked")
    assert await audit_actions(web.trial.url, "nobody") == [
        ("user.login_failed", "InvalidCredentials")
    ]


async def test_a_disabled_account_cannot_sign_in_and_its_session_stops_working(web: Web) -> None:
    assert (await web.call("monitor", "GET", "/api/v1/alerts")).status == 200
    async with db.connection(web.trial.url) as conn:
        await users.disable_user(conn, actor="admin", username="monitor", reason="left the study")
    assert (await web.call("monitor", "GET", "/api/v1/alerts")).status == 401
    resp = await web.gateway.client.post(LOGIN, json={"username": "monitor", "password": PASSWORD})
    assert resp.status == 401


async def test_changes_need_the_sessions_csrf_token(web: Web) -> None:
    alert_id = await web.new_alert()
    path = f"/api/v1/alerts/{alert_id}/acknowledge"
    without = await web.call("monitor", "POST", path, json={}, csrf=False)
    assert without.status == 403
    assert (await without.json())["type"].endswith("/forbidden")
    other = (await web.sign_in("clinician")).csrf
    wrong = await web.call(
        "monitor", "POST", path, json={}, csrf=False, headers={"X-CSRF-Token": other}
    )
    assert wrong.status == 403
    async with db.connection(web.trial.url) as conn:
        cur = await conn.execute("SELECT state FROM alerts WHERE alert_id = %s", (alert_id,))
        assert await cur.fetchone() == ("open",)
    assert (await web.call("monitor", "POST", path, json={})).status == 200


async def test_sign_out_ends_the_session_and_is_audited(web: Web) -> None:
    assert (await web.call("admin", "DELETE", LOGIN)).status == 204
    assert (await web.call("admin", "GET", LOGIN)).status == 401
    assert await audit_actions(web.trial.url, "admin") == [
        ("user.login", None),
        ("user.logout", None),
    ]


async def test_a_forged_or_expired_cookie_is_not_a_session(web: Web) -> None:
    forged = await web.gateway.client.get(
        LOGIN, headers={"Cookie": "__Host-trialstream=" + "A" * 43}
    )
    assert forged.status == 401
    signed = await web.sign_in("monitor")
    async with db.connection(web.trial.url) as conn:
        await conn.execute("UPDATE web_sessions SET idle_expires_at = now() - interval '1 s'")
        await conn.commit()
    resp = await web.gateway.client.get(LOGIN, headers=signed.headers())
    assert resp.status == 401


async def test_use_restarts_the_idle_expiry_with_at_most_one_write_a_minute(web: Web) -> None:
    signed = await web.sign_in("clinician")

    async def session_times() -> tuple[object, object]:
        async with db.connection(web.trial.url) as conn:
            cur = await conn.execute(
                "SELECT last_seen_at, idle_expires_at FROM web_sessions s"
                " JOIN users u USING (user_id) WHERE u.username = 'clinician'"
                " AND s.ended_at IS NULL"
            )
            row = await cur.fetchone()
            assert row is not None
            return row[0], row[1]

    before = await session_times()
    assert (await web.gateway.client.get(LOGIN, headers=signed.headers())).status == 200
    assert await session_times() == before  # used again within TOUCH_EVERY: nothing written
    async with db.connection(web.trial.url) as conn:
        await conn.execute(
            "UPDATE web_sessions SET last_seen_at = now() - interval '2 min',"
            " idle_expires_at = now() + interval '1 min'"
        )
        await conn.commit()
    stale = await session_times()
    assert (await web.gateway.client.get(LOGIN, headers=signed.headers())).status == 200
    seen, idle = await session_times()
    assert seen > stale[0]  # type: ignore[operator]
    assert idle > stale[1]  # type: ignore[operator]


async def test_pages_send_the_signed_out_to_sign_in_and_carry_a_strict_policy(web: Web) -> None:
    resp = await web.gateway.client.get("/monitor", allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"] == "/login?next=/monitor"
    login = await web.gateway.client.get("/login")
    csp = login.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert login.headers["X-Frame-Options"] == "DENY"
