"""Bad input to the API: each case answered with problem details, and nothing stored."""

from __future__ import annotations

from typing import Any

from storage import db
from tests.web.conftest import PASSWORD, Web

SQLISH = "P1'; DROP TABLE participants; --"
SCRIPT = "<script>alert(1)</script>"

# (name, method, path, body or raw bytes, content type, status, problem type suffix)
CASES: list[tuple[str, str, str, Any, str, int, str]] = [
    (
        "malformed_json",
        "POST",
        "/api/v1/sites/SITE-A/participants",
        b'{"participant_id": ',
        "application/json",
        400,
        "malformed-json",
    ),
    (
        # Python refuses to convert an integer of more than 4300 digits (a ValueError that
        # is not a JSONDecodeError): once a 500, now a refusal like any malformed body.
        "integer_too_long",
        "POST",
        "/api/v1/sites/SITE-A/participants",
        b'{"participant_id": ' + b"9" * 5000 + b"}",
        "application/json",
        400,
        "malformed-json",
    ),
    (
        # Nesting deeper than the recursion limit fits in the 64 KiB a body may have.
        "nested_too_deep",
        "POST",
        "/api/v1/sites/SITE-A/participants",
        b"[" * 30_000 + b"]" * 30_000,
        "application/json",
        400,
        "malformed-json",
    ),
    (
        "not_an_object",
        "POST",
        "/api/v1/sites/SITE-A/participants",
        b'["P9"]',
        "application/json",
        400,
        "malformed-json",
    ),
    (
        "not_json",
        "POST",
        "/api/v1/sites/SITE-A/participants",
        b"participant_id=P9",
        "application/x-www-form-urlencoded",
        415,
        "unsupported-media-type",
    ),
    (
        "oversized",
        "POST",
        "/api/v1/sites/SITE-A/participants",
        b'{"participant_id": "' + b"x" * 70_000 + b'"}',
        "application/json",
        413,
        "too-large",
    ),
    (
        "wrong_type",
        "POST",
        "/api/v1/sites/SITE-A/participants",
        {"participant_id": 9},
        "",
        400,
        "invalid-field",
    ),
    ("missing_field", "POST", "/api/v1/sites/SITE-A/participants", {}, "", 400, "invalid-field"),
    (
        "unknown_field",
        "POST",
        "/api/v1/sites/SITE-A/participants",
        {"participant_id": "P9", "site_id": "SITE-B"},
        "",
        400,
        "invalid-field",
    ),
    (
        "sql_in_time_zone",
        "POST",
        "/api/v1/sites/SITE-A/participants",
        {"participant_id": "P9", "time_zone": "Europe/Berlin'; DROP TABLE participants; --"},
        "",
        400,
        "invalid-field",
    ),
    (
        "path_as_time_zone",
        "POST",
        "/api/v1/sites/SITE-A/participants",
        {"participant_id": "P9", "time_zone": "../../etc/localtime"},
        "",
        400,
        "invalid-field",
    ),
    (
        # The shape of a zone name, but no zone: the participant is not created either.
        "unknown_time_zone",
        "POST",
        "/api/v1/sites/SITE-A/participants",
        {"participant_id": "P9", "time_zone": "Mars/Olympus_Mons"},
        "",
        400,
        "invalid-field",
    ),
    (
        "long_time_zone",
        "POST",
        "/api/v1/sites/SITE-A/participants",
        {"participant_id": "P9", "time_zone": "E" * 65},
        "",
        400,
        "invalid-field",
    ),
    (
        "sql_in_id",
        "POST",
        "/api/v1/sites/SITE-A/participants",
        {"participant_id": SQLISH},
        "",
        400,
        "invalid-field",
    ),
    (
        "script_in_id",
        "POST",
        "/api/v1/sites/SITE-A/participants",
        {"participant_id": SCRIPT},
        "",
        400,
        "invalid-field",
    ),
    (
        "nul_in_name",
        "POST",
        "/api/v1/users",
        {
            "username": "x1",
            "display_name": "a\u0000b",
            "role": "monitor",
            "password": "long enough password",
            "sites": ["SITE-A"],
        },
        "",
        400,
        "invalid-field",
    ),
    (
        "bool_as_int",
        "POST",
        "/api/v1/participants/P1/enrollment-codes",
        {"ttl_hours": True},
        "",
        400,
        "invalid-field",
    ),
    (
        "out_of_range",
        "POST",
        "/api/v1/participants/P1/enrollment-codes",
        {"ttl_hours": 10**9},
        "",
        400,
        "invalid-field",
    ),
    (
        "sql_in_path",
        "GET",
        "/api/v1/participants/P1'%20OR%20'1'='1",
        None,
        "",
        400,
        "invalid-field",
    ),
    (
        "sql_in_query",
        "GET",
        "/api/v1/alerts?severity=high'%20OR%201=1",
        None,
        "",
        400,
        "invalid-field",
    ),
    (
        "repeated_query",
        "GET",
        "/api/v1/participants/P1/readings?minutes=1&minutes=2",
        None,
        "",
        400,
        "invalid-field",
    ),
    (
        "text_as_int",
        "GET",
        "/api/v1/participants/P1/readings?minutes=ten",
        None,
        "",
        400,
        "invalid-field",
    ),
    ("huge_int", "GET", "/api/v1/alerts/99999999999999999999999", None, "", 400, "invalid-field"),
    ("unknown_site", "GET", "/api/v1/sites/NOPE", None, "", 404, "not-found"),
    ("bad_last_event_id", "GET", "/api/v1/alerts/events?after=-1", None, "", 400, "invalid-field"),
    # Adherence spans: a date that matches the pattern but is not a day, the wrong order,
    # too long a span, a time where a day belongs, and a day in the path that is not one.
    (
        "no_such_day",
        "GET",
        "/api/v1/participants/P1/adherence?to=2026-02-30",
        None,
        "",
        400,
        "invalid-field",
    ),
    (
        "span_backwards",
        "GET",
        "/api/v1/participants/P1/adherence?from=2026-03-02&to=2026-03-01",
        None,
        "",
        400,
        "invalid-field",
    ),
    (
        "span_too_long",
        "GET",
        "/api/v1/sites/SITE-A/adherence?from=2025-01-01&to=2026-01-01",
        None,
        "",
        400,
        "invalid-field",
    ),
    (
        "time_for_day",
        "GET",
        "/api/v1/participants/P1/adherence?from=2026-03-01T00:00",
        None,
        "",
        400,
        "invalid-field",
    ),
    (
        # Days at the ends of the calendar: a default span before the first, or a day's
        # end after the last, cannot even be computed.
        "first_day_of_the_calendar",
        "GET",
        "/api/v1/participants/P1/adherence?to=0001-01-05",
        None,
        "",
        400,
        "invalid-field",
    ),
    (
        "last_day_of_the_calendar",
        "GET",
        "/api/v1/participants/P1/adherence/9999-12-31",
        None,
        "",
        400,
        "invalid-field",
    ),
    (
        # Year 1 at +14:00 is year 0 in UTC, which no datetime holds: stored, it would
        # break every later read of the queries (and, as a lock, every batch of the study).
        "time_before_the_calendar",
        "POST",
        "/api/v1/participants/P1/queries",
        {"target": "range", "metric": "spo2", "from": "0001-01-01T00:00:00+14:00", "text": "why?"},
        "",
        400,
        "invalid-field",
    ),
    (
        "path_day",
        "GET",
        "/api/v1/participants/P1/adherence/2026-13-01",
        None,
        "",
        400,
        "invalid-field",
    ),
]


async def counts(url: str) -> tuple[int, ...]:
    async with db.connection(url) as conn:
        cur = await conn.execute(
            "SELECT (SELECT count(*) FROM participants), (SELECT count(*) FROM users),"
            " (SELECT count(*) FROM enrollment_codes), (SELECT count(*) FROM sites),"
            " (SELECT count(*) FROM participant_time_zones)"
        )
        row = await cur.fetchone()
        assert row is not None
        return tuple(int(v) for v in row)


async def test_bad_input_gets_problem_details_and_stores_nothing(web: Web) -> None:
    headers = (await web.sign_in("admin")).headers()
    failures = []
    for name, method, path, body, ctype, status, kind in CASES:
        before = await counts(web.trial.url)
        if isinstance(body, bytes):
            resp = await web.gateway.client.request(
                method, path, data=body, headers={**headers, "Content-Type": ctype}
            )
        else:
            resp = await web.gateway.client.request(method, path, json=body, headers=headers)
        text = await resp.text()
        problem = await resp.json() if resp.content_type == "application/problem+json" else {}
        if (
            resp.status,
            problem.get("status"),
            str(problem.get("type", "")).rsplit("/", 1)[-1],
        ) != (
            status,
            status,
            kind,
        ):
            failures.append(f"{name}: {resp.status} {resp.content_type} {text[:200]}")
        if await counts(web.trial.url) != before:
            failures.append(f"{name}: something was stored")
    assert not failures, "\n".join(failures)


async def test_a_script_tag_in_a_name_is_stored_as_text_and_served_escaped(web: Web) -> None:
    body = {
        "username": "nurse",
        "display_name": SCRIPT,
        "role": "clinician",
        "password": "long enough password",
        "sites": ["SITE-A"],
    }
    resp = await web.call("admin", "POST", "/api/v1/users", json=body)
    assert resp.status == 201
    assert (await resp.json())["display_name"] == SCRIPT
    resp = await web.gateway.client.post(
        "/api/v1/session", json={"username": "nurse", "password": "long enough password"}
    )
    cookie = resp.cookies["__Host-trialstream"].value
    web.gateway.client.session.cookie_jar.clear()
    page = await web.gateway.client.get(
        "/monitor", headers={"Cookie": f"__Host-trialstream={cookie}"}
    )
    html = await page.text()
    assert SCRIPT not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


async def test_sql_looking_text_is_data_not_sql(web: Web) -> None:
    body = {
        "username": "robert",
        "display_name": SQLISH,
        "role": "monitor",
        "password": "long enough password",
        "sites": ["SITE-A"],
    }
    assert (await web.call("admin", "POST", "/api/v1/users", json=body)).status == 201
    resp = await web.call("admin", "GET", "/api/v1/users")
    names = {u["username"]: u["display_name"] for u in (await resp.json())["users"]}
    assert names["robert"] == SQLISH
    assert await counts(web.trial.url) >= (2, 1, 0, 2)


# Review and lock (docs/review.md): (caller, name, method, path, body, status, problem type
# suffix). A monitor signs off, an admin locks; each case is refused before a password is
# checked, and nothing is stored.
REVIEWS = "/api/v1/participants/P1/reviews"
SIGN = {
    "from": "2026-03-10T00:00:00Z",
    "to": "2026-03-11T00:00:00Z",
    "meaning": "Reviewed",
    "username": "monitor",
    "password": PASSWORD,
}
LOCK = {
    "from": SIGN["from"],
    "to": SIGN["to"],
    "reason": "interim analysis",
    "username": "admin",
    "password": PASSWORD,
}
UNLOCK = {"reason": "answered", "username": "admin", "password": PASSWORD}
REVIEW_CASES: list[tuple[str, str, str, str, Any, int, str]] = [
    ("monitor", "time_without_zone", "POST", REVIEWS, {**SIGN, "to": "2026-03-11T00:00"}, 400,
     "invalid-field"),
    ("monitor", "no_such_month", "POST", REVIEWS, {**SIGN, "from": "2026-13-01T00:00:00Z"}, 400,
     "invalid-field"),
    ("monitor", "time_too_long", "POST", REVIEWS, {**SIGN, "from": "2" * 5000}, 400,
     "invalid-field"),
    ("monitor", "time_as_number", "POST", REVIEWS, {**SIGN, "from": 1773100800}, 400,
     "invalid-field"),
    ("monitor", "period_backwards", "POST", REVIEWS, {**SIGN, "to": SIGN["from"]}, 400,
     "invalid-field"),
    ("monitor", "meaning_too_long", "POST", REVIEWS, {**SIGN, "meaning": "x" * 201}, 400,
     "invalid-field"),
    ("monitor", "meaning_blank", "POST", REVIEWS, {**SIGN, "meaning": "   "}, 400,
     "invalid-field"),
    ("monitor", "meaning_control", "POST", REVIEWS, {**SIGN, "meaning": "a\u0007b"}, 400,
     "invalid-field"),
    ("monitor", "signer_role_given", "POST", REVIEWS, {**SIGN, "signer_role": "admin"}, 400,
     "invalid-field"),
    ("monitor", "password_too_long", "POST", REVIEWS, {**SIGN, "password": "x" * 1025}, 400,
     "invalid-field"),
    ("monitor", "sql_in_participant", "POST", "/api/v1/participants/P1'%20OR%201=1/reviews",
     SIGN, 400, "invalid-field"),
    ("monitor", "unknown_participant", "POST", "/api/v1/participants/P404/reviews", SIGN, 404,
     "not-found"),
    ("admin", "sql_in_study", "POST", "/api/v1/studies/S1'%20OR%201=1/locks", LOCK, 400,
     "invalid-field"),
    ("admin", "reason_too_long", "POST", "/api/v1/studies/S1/locks",
     {**LOCK, "reason": "x" * 501}, 400, "invalid-field"),
    ("admin", "reason_blank", "POST", "/api/v1/studies/S1/locks", {**LOCK, "reason": " "}, 400,
     "invalid-field"),
    ("admin", "lock_unknown_study", "POST", "/api/v1/studies/NOPE/locks", LOCK, 404,
     "not-found"),
    ("admin", "locks_unknown_study", "GET", "/api/v1/studies/NOPE/locks", None, 404,
     "not-found"),
    ("admin", "lock_id_zero", "POST", "/api/v1/locks/0/unlock", UNLOCK, 400, "invalid-field"),
    ("admin", "lock_id_huge", "POST", "/api/v1/locks/99999999999999999999/unlock", UNLOCK, 400,
     "invalid-field"),
    ("admin", "unknown_lock", "POST", "/api/v1/locks/999999/unlock", UNLOCK, 404, "not-found"),
    ("admin", "unknown_policy", "PUT", "/api/v1/studies/S1/late-data-policy",
     {"policy": "drop"}, 400, "invalid-field"),
    ("admin", "policy_unknown_study", "PUT", "/api/v1/studies/NOPE/late-data-policy",
     {"policy": "hold"}, 404, "not-found"),
]  # fmt: skip


async def review_state(url: str) -> tuple[int, ...]:
    async with db.connection(url) as conn:
        cur = await conn.execute(
            "SELECT (SELECT count(*) FROM review_signoffs), (SELECT count(*) FROM period_locks),"
            " (SELECT sum(failed_logins) FROM users),"
            " (SELECT count(*) FROM studies WHERE late_data_policy <> 'refuse')"
        )
        row = await cur.fetchone()
        assert row is not None
        return tuple(int(v) for v in row)


async def test_bad_review_and_lock_input_gets_problem_details_and_spends_no_password(
    web: Web,
) -> None:
    before = await review_state(web.trial.url)
    failures = []
    for key, name, method, path, body, status, kind in REVIEW_CASES:
        headers = (await web.sign_in(key)).headers()
        resp = await web.gateway.client.request(method, path, json=body, headers=headers)
        text = await resp.text()
        problem = await resp.json() if resp.content_type == "application/problem+json" else {}
        got = (resp.status, problem.get("status"), str(problem.get("type", "")).rsplit("/", 1)[-1])
        if got != (status, status, kind):
            failures.append(f"{name}: {resp.status} {resp.content_type} {text[:200]}")
    assert not failures, "\n".join(failures)
    assert await review_state(web.trial.url) == before
