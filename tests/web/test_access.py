"""Access, table-driven over the OpenAPI document: every operation it lists is tried without a
session, with each role at the participant's site, and with each role of another site; only
the expected ones succeed. An operation without a row in EXPECTED fails the test, so a new
route cannot go unchecked; so does a route under /api/v1 that the document does not list."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from device_drivers.identity import make_csr
from gateway import enrollment
from gateway.app import STUDY_CA
from ingest import hub_requests, keys
from storage import alerts, db, locks, queries, registry
from tests.fixtures.gateway import METRICS_HEADERS
from tests.fixtures.hubs import issued_a_day_ago
from tests.fixtures.trial import ALL_SCOPES
from tests.web.conftest import ACCOUNTS, PASSWORD, Web

_counter = itertools.count(1)
Build = Callable[[Web], Awaitable[tuple[str, Any]]]


def fixed(path: str, body: Any = None) -> Build:
    async def build(_: Web) -> tuple[str, Any]:
        return path, body

    return build


async def fresh_participant(w: Web) -> tuple[str, Any]:
    return "/api/v1/sites/SITE-A/participants", {"participant_id": f"PX{next(_counter)}"}


async def open_alert(w: Web) -> tuple[str, Any]:
    return f"/api/v1/alerts/{await w.new_alert()}/acknowledge", {"note": "seen"}


async def acknowledged_alert(w: Web) -> tuple[str, Any]:
    alert_id = await w.new_alert()
    async with db.connection(w.trial.url, autocommit=True) as conn:
        await alerts.acknowledge(conn, alert_id, by="tester")
    return f"/api/v1/alerts/{alert_id}/resolve", {"note": "done"}


async def any_alert(w: Web) -> tuple[str, Any]:
    return f"/api/v1/alerts/{await w.new_alert()}", None


async def new_version(w: Web) -> tuple[str, Any]:
    async with db.connection(w.trial.url) as conn, conn.transaction():
        doc = await registry.create_consent_document(
            conn,
            w.trial.study_id,
            "Main ICF",
            f"1.{next(_counter)}",
            "I agree to share my readings, version with new wording.",
            ALL_SCOPES,
            effective_at=datetime.now(UTC) - timedelta(seconds=1),
        )
    body = {
        "document_id": doc,
        "scopes": sorted(ALL_SCOPES),
        "printed_name": "Participant One",
        "username": "participant",
        "password": PASSWORD,
    }
    return "/api/v1/participants/P1/consents", body


async def withdrawal(w: Web, key: str | None) -> tuple[str, Any]:
    """P1's consent in force again, and a withdrawal of it signed with the caller's own
    password: by the participant themself, or recorded by staff as a phoned-in request."""
    async with db.connection(w.trial.url) as conn, conn.transaction():
        await registry.record_consent(
            conn,
            "P1",
            w.trial.document_id,
            "consent",
            ALL_SCOPES,
            effective_at=datetime.now(UTC),  # after the withdrawal the last call made
            recorded_by="test",
            signer_name="Participant One",
            meaning="consent",
        )
    body: dict[str, Any] = {
        "initiated_by": "participant",
        "username": key or "nobody",
        "password": PASSWORD,
    }
    if key is not None and key.removeprefix("other_") != "participant":
        body |= {"received_via": "phone", "reason": "asked by phone"}
    return "/api/v1/participants/P1/withdrawals", body


async def new_user(w: Web) -> tuple[str, Any]:
    n = next(_counter)
    body = {
        "username": f"nurse{n}",
        "display_name": "Nurse",
        "role": "clinician",
        "password": "a long enough password",
        "sites": ["SITE-A"],
    }
    return "/api/v1/users", body


async def enrollment_body(w: Web) -> tuple[str, Any]:
    async with db.connection(w.trial.url) as conn:
        issued = await enrollment.issue_code(conn, "P1", created_by="tester")
    csr = make_csr(keys.generate_private_key()).decode()
    return "/api/v1/enrollments", {"code": issued.code, "csr": csr}


async def enrolled_device(w: Web) -> tuple[str, Any]:
    """A hub enrolled a day ago (so a renewal issues a new certificate): its id and key."""
    key = keys.generate_private_key()
    ca = w.gateway.client.app[STUDY_CA]  # type: ignore[attr-defined]
    async with db.connection(w.trial.url) as conn:
        issued = await enrollment.issue_code(conn, "P1", created_by="tester")
        enrolled = await enrollment.enroll(
            conn, issued.code, make_csr(key), ca, keys.generate_private_key().public_key()
        )
    await issued_a_day_ago(w.trial.url, enrolled.device_id)
    return enrolled.device_id, key


def hub_signed(purpose: str, body: bytes, device_id: str, key: Any) -> dict[str, Any]:
    signed_at = int(datetime.now(UTC).timestamp() * 1000)
    signature = hub_requests.sign(key, purpose, device_id, signed_at, body)
    return {"signed_at_ms": signed_at, "signature": signature}


async def renewal_body(w: Web) -> tuple[str, Any]:
    device_id, key = await enrolled_device(w)
    csr = make_csr(key).decode()
    body = {**hub_signed(hub_requests.PURPOSE_RENEW, csr.encode(), device_id, key), "csr": csr}
    return f"/api/v1/devices/{device_id}/certificates", body


async def standing_body(w: Web) -> tuple[str, Any]:
    device_id, key = await enrolled_device(w)
    body = hub_signed(hub_requests.PURPOSE_STANDING, b"", device_id, key)
    return f"/api/v1/devices/{device_id}/standing", body


RANGE = queries.Subject(
    queries.Target.RANGE,
    datetime(2026, 3, 1, tzinfo=UTC),
    datetime(2026, 3, 2, tzinfo=UTC),
    "heart_rate",
)


async def fresh_query(w: Web, *, closed: bool = False) -> int:
    """A query on P1's heart rate, open (or closed), so each attempt finds it as it needs."""
    async with db.connection(w.trial.url) as conn:
        query_id = await queries.open_query(conn, "P1", RANGE, "Why so low?", actor="monitor")
        if closed:
            await queries.step(conn, query_id, queries.Step.CLOSE, "Seen", actor="monitor")
    return query_id


def query_step(action: str, *, closed: bool = False) -> Build:
    async def build(w: Web) -> tuple[str, Any]:
        path = f"/api/v1/queries/{await fresh_query(w, closed=closed)}/{action}"
        return path, {"text": f"{action} it"}

    return build


async def a_query(w: Web) -> tuple[str, Any]:
    return f"/api/v1/queries/{await fresh_query(w)}", None


# Review and lock (docs/review.md): e-signed with the caller's own password; a period of
# long ago, so that no other operation's data falls in a lock the sweep makes.
LOCKED_FROM = datetime(2020, 1, 1, tzinfo=UTC)
LOCKED_TO = datetime(2020, 1, 2, tzinfo=UTC)
SIGNERS = frozenset({"clinician", "monitor"})


async def review_sign_off(w: Web, key: str | None) -> tuple[str, Any]:
    body = {
        "from": LOCKED_FROM.isoformat(),
        "to": LOCKED_TO.isoformat(),
        "meaning": "Reviewed",
        "username": key or "nobody",
        "password": PASSWORD,
    }
    return "/api/v1/participants/P1/reviews", body


async def lock_body(w: Web) -> tuple[str, Any]:
    body = {
        "from": LOCKED_FROM.isoformat(),
        "to": LOCKED_TO.isoformat(),
        "reason": "interim analysis",
        "username": "admin",
        "password": PASSWORD,
    }
    return "/api/v1/studies/S1/locks", body


async def fresh_lock(w: Web) -> tuple[str, Any]:
    """A lock in force, so each attempt finds one to lift."""
    async with db.connection(w.trial.url, autocommit=True) as conn:
        lock_id = await locks.lock_period(
            conn, "S1", LOCKED_FROM, LOCKED_TO, "interim analysis", actor="admin"
        )
    body = {"reason": "query answered", "username": "admin", "password": PASSWORD}
    return f"/api/v1/locks/{lock_id}/unlock", body


async def login_body(w: Web) -> tuple[str, Any]:
    return "/api/v1/session", {"username": "admin", "password": PASSWORD}


PUBLIC = "public"
ANY = frozenset(ACCOUNTS) - {k for k in ACCOUNTS if k.startswith("other_")}
STAFF = frozenset({"coordinator", "clinician", "monitor", "admin"})
CLINICAL = frozenset({"clinician", "monitor", "admin"})
COORDINATION = frozenset({"coordinator", "admin"})


# The submitter of an export job used for each account: itself where it may export at
# SITE-A (it sees only its own jobs), SITE-A's monitor otherwise (so another site's staff
# ask for a job that is not theirs, and roles without access are refused before any lookup).
# Exports hold reading values: only the roles that may read those may export.
def job_owner(key: str | None) -> str:
    return key if key in CLINICAL else "monitor"


async def export_job(w: Web, key: str | None) -> tuple[str, Any]:
    return f"/api/v1/exports/{await w.finished_job(job_owner(key))}", None


async def export_file(w: Web, key: str | None) -> tuple[str, Any]:
    return f"/api/v1/exports/{await w.finished_job(job_owner(key))}/files/0", None


@dataclass(frozen=True)
class Expect:
    allowed: frozenset[str] | str  # roles (as account keys at SITE-A) or PUBLIC
    build: Build
    status: int = 200
    # Instead of build, for requests that depend on who asks.
    build_for: Callable[[Web, str | None], Awaitable[tuple[str, Any]]] | None = None


EXPECTED: dict[str, Expect] = {
    "login": Expect(PUBLIC, login_body),
    "get_openapi": Expect(frozenset({"admin"}), fixed("/api/v1/openapi.json")),
    "enroll_hub": Expect(PUBLIC, enrollment_body, 201),
    # A hub's own signature is the credential; a session neither helps nor hinders.
    "renew_hub_certificate": Expect(PUBLIC, renewal_body, 201),
    "hub_standing": Expect(PUBLIC, standing_body),
    "get_session": Expect(ANY, fixed("/api/v1/session")),
    "list_sites": Expect(STAFF, fixed("/api/v1/sites")),
    "get_site": Expect(STAFF, fixed("/api/v1/sites/SITE-A")),
    "create_participant": Expect(COORDINATION, fresh_participant, 201),
    "get_participant": Expect(ANY, fixed("/api/v1/participants/P1")),
    "create_enrollment_code": Expect(
        COORDINATION, fixed("/api/v1/participants/P1/enrollment-codes", {"ttl_hours": 2}), 201
    ),
    "get_readings": Expect(CLINICAL, fixed("/api/v1/participants/P1/readings?minutes=5")),
    "follow_readings": Expect(CLINICAL, fixed("/api/v1/participants/P1/readings/live?minutes=5")),
    "get_rollups": Expect(CLINICAL, fixed("/api/v1/participants/P1/rollups?days=2")),
    "get_adherence": Expect(STAFF, fixed("/api/v1/participants/P1/adherence")),
    "get_adherence_day": Expect(STAFF, fixed("/api/v1/participants/P1/adherence/2026-03-23")),
    "get_site_adherence": Expect(
        STAFF, fixed("/api/v1/sites/SITE-A/adherence?from=2026-03-01&to=2026-03-31")
    ),
    "open_query": Expect(
        frozenset({"monitor", "admin"}),
        fixed(
            "/api/v1/participants/P1/queries",
            {
                "target": "range",
                "metric": "heart_rate",
                "from": "2026-03-01T00:00:00Z",
                "to": "2026-03-02T00:00:00Z",
                "text": "Values flat for a day?",
            },
        ),
        201,
    ),
    "list_participant_queries": Expect(STAFF, fixed("/api/v1/participants/P1/queries")),
    "list_site_queries": Expect(STAFF, fixed("/api/v1/sites/SITE-A/queries?state=all")),
    "get_query": Expect(STAFF, a_query),
    "answer_query": Expect(frozenset({"coordinator", "clinician", "admin"}), query_step("answer")),
    "close_query": Expect(frozenset({"monitor", "admin"}), query_step("close")),
    "reopen_query": Expect(frozenset({"monitor", "admin"}), query_step("reopen", closed=True)),
    "sign_off_review": Expect(SIGNERS, fixed(""), 201, build_for=review_sign_off),
    "list_reviews": Expect(STAFF, fixed("/api/v1/participants/P1/reviews")),
    "lock_period": Expect(frozenset({"admin"}), lock_body, 201),
    "list_locks": Expect(STAFF, fixed("/api/v1/studies/S1/locks")),
    "unlock_period": Expect(frozenset({"admin"}), fresh_lock),
    "set_late_data_policy": Expect(
        frozenset({"admin"}), fixed("/api/v1/studies/S1/late-data-policy", {"policy": "refuse"})
    ),
    "sign_consent": Expect(frozenset({"participant", "coordinator", "admin"}), new_version, 201),
    "withdraw_consent": Expect(
        frozenset({"participant", "coordinator", "admin"}), fixed(""), 201, build_for=withdrawal
    ),
    "list_consent_documents": Expect(ANY, fixed("/api/v1/participants/P1/consent-documents")),
    "submit_export": Expect(
        CLINICAL,
        fixed("/api/v1/exports", {"kind": "fhir", "study_id": "S1", "participant_id": "P1"}),
        202,
    ),
    "get_export": Expect(CLINICAL, fixed(""), build_for=export_job),
    "download_export_file": Expect(CLINICAL, fixed(""), build_for=export_file),
    "list_alerts": Expect(CLINICAL, fixed("/api/v1/alerts?site=SITE-A")),
    "alert_events": Expect(CLINICAL, fixed("/api/v1/alerts/events")),
    "list_alert_deliveries": Expect(CLINICAL, fixed("/api/v1/alerts/deliveries?site=SITE-A")),
    "get_alert": Expect(CLINICAL, any_alert),
    "acknowledge_alert": Expect(CLINICAL, open_alert),
    "resolve_alert": Expect(CLINICAL, acknowledged_alert),
    "list_users": Expect(frozenset({"admin"}), fixed("/api/v1/users")),
    "create_user": Expect(frozenset({"admin"}), new_user, 201),
}
# Signing out ends the caller's session: tried last, once per account, below.
LOGOUT = "logout"


def mentions_site_a(value: Any) -> bool:
    """Whether a JSON value names SITE-A or its participant P1 anywhere."""
    if isinstance(value, dict):
        return any(mentions_site_a(v) for v in value.values())
    if isinstance(value, list):
        return any(mentions_site_a(v) for v in value)
    return value in ("SITE-A", "P1")


async def attempt(w: Web, key: str | None, method: str, exp: Expect) -> tuple[int, Any]:
    path, body = await (exp.build(w) if exp.build_for is None else exp.build_for(w, key))
    if path.endswith(("/alerts/events", "/readings/live?minutes=5")):
        # A live stream: read its first line only, then let it go.
        headers = {} if key is None else (await w.sign_in(key)).headers()
        async with w.gateway.client.get(path, headers=headers) as resp:
            if resp.status == 200:
                assert resp.headers["Content-Type"].startswith("text/event-stream")
                first = await resp.content.readline()
                assert first.startswith(b"retry:")
                return 200, None
            return resp.status, await resp.json()
    resp = await w.call(key, method, path, json=body)
    if resp.status < 400 and resp.content_type != "application/json":
        return resp.status, None  # a file
    text = await resp.text()
    if resp.status >= 400:
        assert resp.content_type == "application/problem+json", (resp.status, text)
    return resp.status, (await resp.json() if text else None)


async def test_every_operation_answers_only_the_right_roles_and_sites(web: Web) -> None:
    resp = await web.call("admin", "GET", "/api/v1/openapi.json")
    document = await resp.json()
    operations = [
        (method.upper(), path, op["operationId"])
        for path, item in document["paths"].items()
        for method, op in item.items()
    ]
    listed = {(m, p) for m, p, _ in operations}
    routed = {
        (r.method, r.resource.canonical.replace(":[0-9]+", ""))
        for r in web.gateway.client.app.router.routes()  # type: ignore[attr-defined]
        if r.resource is not None
        and r.resource.canonical.startswith("/api/v1/")
        and r.method != "HEAD"
    }
    assert routed == listed, "routes and the OpenAPI document differ"
    ids = {op_id for *_, op_id in operations}
    assert ids - {LOGOUT} == set(EXPECTED), "every operation needs a row in EXPECTED"

    failures: list[str] = []
    tried = 0
    for method, _path, op_id in operations:
        if op_id == LOGOUT:
            continue
        exp = EXPECTED[op_id]
        for key in [None, *ACCOUNTS]:
            status, body = await attempt(web, key, method, exp)
            tried += 1
            if exp.allowed == PUBLIC:
                want = {exp.status}
            elif key is None:
                want = {401}
            else:
                role_key = key.removeprefix("other_")
                if role_key not in exp.allowed:
                    want = {403}
                elif key.startswith("other_"):
                    want = {404, 200}  # absent for them, or a list without SITE-A in it
                else:
                    want = {exp.status}
            if status not in want:
                failures.append(f"{op_id} as {key}: {status}, expected {sorted(want)}: {body}")
            elif key and key.startswith("other_") and status == 200 and mentions_site_a(body):
                failures.append(f"{op_id} as {key}: SITE-A data leaked: {body}")
    assert not failures, "\n".join(failures)
    assert tried == (len(ACCOUNTS) + 1) * len(EXPECTED)

    for key in ACCOUNTS:
        assert (await web.call(key, "DELETE", "/api/v1/session")).status == 204
        assert (await web.call(key, "GET", "/api/v1/session")).status == 401
    assert (await web.call(None, "DELETE", "/api/v1/session")).status == 401


PAGES: dict[str, frozenset[str]] = {
    "/monitor": CLINICAL,
    "/sites/SITE-A": STAFF,
    "/participants/P1": ANY,
    "/participants/P1/live": CLINICAL,
    "/sites/SITE-A/adherence": STAFF,
    "/participants/P1/adherence": STAFF,
    "/studies/S1": STAFF,
}
# Pages that staff of SITE-B (another site of the same study) see too.
NOT_SITE_SCOPED = {"/monitor", "/studies/S1"}


async def test_every_page_checks_role_and_site(web: Web) -> None:
    routed = {
        r.resource.canonical
        for r in web.gateway.client.app.router.routes()  # type: ignore[attr-defined]
        if r.resource is not None and r.method == "GET"
    }
    page_routes = {
        p for p in routed if not p.startswith(("/api/", "/static/", "/healthz", "/metrics"))
    }
    assert page_routes - {"/", "/login"} == {
        "/monitor",
        "/sites/{site_id}",
        "/participants/{participant_id}",
        "/participants/{participant_id}/live",
        "/sites/{site_id}/adherence",
        "/participants/{participant_id}/adherence",
        "/studies/{study_id}",
    }, "a new page needs a row in PAGES"
    failures = []
    for path, allowed in PAGES.items():
        resp = await web.gateway.client.get(path, allow_redirects=False)
        if resp.status != 303 or not resp.headers["Location"].startswith("/login?next="):
            failures.append(f"{path} without a session: {resp.status}")
        for key in ACCOUNTS:
            resp = await web.call(key, "GET", path)
            role_key = key.removeprefix("other_")
            if role_key not in allowed:
                want = 403
            elif key.startswith("other_") and path not in NOT_SITE_SCOPED:
                want = 404
            else:
                want = 200
            if resp.status != want:
                failures.append(f"{path} as {key}: {resp.status}, expected {want}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    ("key", "headers", "status"),
    [
        (None, {}, 401),
        (None, {"Authorization": "Bearer not-the-token"}, 401),
        ("participant", {}, 403),
        ("clinician", {}, 403),
        ("monitor", {}, 403),
        ("admin", {}, 200),
        (None, METRICS_HEADERS, 200),
    ],
)
async def test_metrics_are_for_the_scraper_and_admins(
    web: Web, key: str | None, headers: dict[str, str], status: int
) -> None:
    resp = await web.call(key, "GET", "/metrics", headers=headers)
    assert resp.status == status
    if status == 401:
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    if status == 200:
        assert "trialstream_messages_total" in await resp.text()
    else:
        assert "trialstream_" not in await resp.text()
