"""Review sign-offs and period locks through the API (docs/review.md): a monitor signs off a
day of P1's data, a later reading outdates it and is listed; an admin locks the day, a late
reading is refused (period_locked), or held and stored at the unlock. Every e-signature is
re-authenticated with the caller's own password; a wrong one records nothing but the failed
attempt."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from psycopg_pool import AsyncConnectionPool

from storage import db, locks, registry
from storage.migrate import StorageMode
from tests.alerts.test_engine import rows
from tests.storage.test_review_lock import DAY, store
from tests.web.conftest import PASSWORD, Web

REVIEWS = "/api/v1/participants/P1/reviews"
LOCKS = "/api/v1/studies/S1/locks"
START = DAY.isoformat()
END = (DAY + timedelta(days=1)).isoformat()


def signature(key: str, password: str = PASSWORD) -> dict[str, str]:
    return {"username": key, "password": password}


def sign_body(key: str, **more: str) -> dict[str, str]:
    return {
        "from": START,
        "to": END,
        "meaning": "Reviewed, no concerns",
        **signature(key),
        **more,
    }


def lock_body(**more: str) -> dict[str, str]:
    return {"from": START, "to": END, "reason": "interim analysis", **signature("admin"), **more}


async def call(web: Web, key: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    resp = await web.call(key, method, path, json=body)
    return resp.status, await resp.json()


async def failed_logins(web: Web, username: str) -> int:
    ((n,),) = await rows(
        web.trial.url, "SELECT failed_logins FROM users WHERE username = %s", (username,)
    )
    assert isinstance(n, int)
    return n


async def test_a_sign_off_is_outdated_by_later_data_and_lists_what_came(
    web: Web, pool: AsyncConnectionPool, storage_mode: StorageMode
) -> None:
    await store(pool, storage_mode, 1, 2, 3)
    status, signed = await call(web, "monitor", "POST", REVIEWS, sign_body("monitor"))
    assert status == 201, signed
    assert (signed["readings"], signed["signer"], signed["signer_name"]) == (
        3,
        "monitor",
        "Monitor",
    )
    assert (signed["signer_role"], signed["outdated_at"], signed["changes"]) == (
        "monitor",
        None,
        [],
    )
    status, by_clinician = await call(web, "clinician", "POST", REVIEWS, sign_body("clinician"))
    assert status == 201, by_clinician
    assert by_clinician["signer_role"] == "clinician"

    late = await store(pool, storage_mode, 4, 5, 30)  # two in the period, one the next day
    status, listed = await call(web, "coordinator", "GET", REVIEWS)
    assert status == 200, listed
    assert [r["signoff_id"] for r in listed["reviews"]] == [
        signed["signoff_id"],
        by_clinician["signoff_id"],
    ]
    for r in listed["reviews"]:
        assert r["outdated_at"] is not None
        ((change),) = r["changes"]
        assert (change["device_id"], change["seq"], change["readings"]) == ("hub-1", late, 2)
        assert (change["first_time"], change["last_time"]) == (
            (DAY + timedelta(hours=4)).isoformat(),
            (DAY + timedelta(hours=5)).isoformat(),
        )
    assert await rows(
        web.trial.url,
        "SELECT actor, detail->>'meaning' FROM audit_log WHERE action = 'review.sign'"
        " ORDER BY audit_id",
    ) == [("monitor", "Reviewed, no concerns"), ("clinician", "Reviewed, no concerns")]


async def test_a_wrong_password_or_another_name_signs_nothing(web: Web) -> None:
    status, problem = await call(
        web, "monitor", "POST", REVIEWS, sign_body("monitor", password="not my password")
    )
    assert (status, problem["type"].rsplit("/", 1)[-1]) == (403, "reauthentication-failed")
    assert await failed_logins(web, "monitor") == 1
    assert await rows(
        web.trial.url,
        "SELECT actor, detail->>'cause', detail->>'reauthentication' FROM audit_log"
        " WHERE action = 'user.login_failed'",
    ) == [("monitor", "InvalidCredentials", "review.sign")]
    # Another's name: refused before any password is checked, so none of theirs is spent.
    status, problem = await call(web, "monitor", "POST", REVIEWS, sign_body("clinician"))
    assert (status, problem["type"].rsplit("/", 1)[-1]) == (403, "reauthentication-failed")
    assert await failed_logins(web, "clinician") == 0
    # Locks and unlocks are e-signed the same way.
    status, _ = await call(web, "admin", "POST", LOCKS, lock_body(password="wrong"))
    assert status == 403
    assert await failed_logins(web, "admin") == 1
    assert await rows(
        web.trial.url, "SELECT (SELECT count(*) FROM review_signoffs), count(*) FROM period_locks"
    ) == [(0, 0)]
    # The right password resets the count, as a sign-in does.
    status, _ = await call(web, "monitor", "POST", REVIEWS, sign_body("monitor"))
    assert status == 201
    assert await failed_logins(web, "monitor") == 0


async def test_another_sites_staff_find_nothing_and_roles_are_kept(web: Web) -> None:
    for key in ("other_monitor", "other_clinician"):
        status, problem = await call(web, key, "POST", REVIEWS, sign_body(key))
        assert status == 404, problem
        assert (await call(web, key, "GET", REVIEWS))[0] == 404
    for key in ("coordinator", "admin", "participant"):
        assert (await call(web, key, "POST", REVIEWS, sign_body(key)))[0] == 403
    assert await rows(web.trial.url, "SELECT count(*) FROM review_signoffs") == [(0,)]
    assert await failed_logins(web, "other_monitor") == 0


async def test_a_locked_period_refuses_late_readings(
    web: Web, pool: AsyncConnectionPool, storage_mode: StorageMode
) -> None:
    status, lock = await call(web, "admin", "POST", LOCKS, lock_body())
    assert status == 201, lock
    assert (lock["study_id"], lock["from"], lock["to"]) == ("S1", START, END)
    assert (lock["locked_by"], lock["unlocked_at"], lock["held"]) == ("admin", None, 0)
    await store(pool, storage_mode, 2, 3, 25)
    assert await rows(web.trial.url, "SELECT count(*) FROM readings") == [(1,)]
    assert await rows(web.trial.url, "SELECT reason, detail, reading_count FROM rejections") == [
        ("period_locked", locks.LOCKED_DETAIL, 2)
    ]
    # Staff with a site in the study see its locks (SITE-B is in S1 too); admins all.
    for key in ("coordinator", "other_monitor", "admin"):
        status, listed = await call(web, key, "GET", LOCKS)
        assert status == 200, listed
        assert listed["late_data_policy"] == "refuse"
        assert [x["lock_id"] for x in listed["locks"]] == [lock["lock_id"]]
    assert await rows(
        web.trial.url, "SELECT actor, reason FROM audit_log WHERE action = 'period.lock'"
    ) == [("admin", "interim analysis")]


async def test_staff_of_another_study_find_neither_it_nor_its_locks(web: Web) -> None:
    async with db.connection(web.trial.url) as conn, conn.transaction():
        await registry.create_study(conn, "S2", "Another study")
    assert (await call(web, "coordinator", "GET", "/api/v1/studies/S2/locks"))[0] == 404
    assert (await call(web, "admin", "GET", "/api/v1/studies/S2/locks"))[0] == 200
    assert (await call(web, "admin", "GET", "/api/v1/studies/NOPE/locks"))[0] == 404
    status, _ = await call(web, "admin", "POST", "/api/v1/studies/NOPE/locks", lock_body())
    assert status == 404
    assert await failed_logins(web, "admin") == 0


async def test_held_readings_are_stored_when_the_lock_is_lifted(
    web: Web, pool: AsyncConnectionPool, storage_mode: StorageMode
) -> None:
    status, policy = await call(
        web, "admin", "PUT", "/api/v1/studies/S1/late-data-policy", {"policy": "hold"}
    )
    assert (status, policy) == (200, {"study_id": "S1", "late_data_policy": "hold"})
    status, _ = await call(web, "monitor", "POST", REVIEWS, sign_body("monitor"))
    assert status == 201
    status, lock = await call(web, "admin", "POST", LOCKS, lock_body())
    assert status == 201
    seq = await store(pool, storage_mode, 2, 3)
    assert await rows(web.trial.url, "SELECT count(*) FROM readings") == [(0,)]
    status, listed = await call(web, "monitor", "GET", LOCKS)
    assert (listed["late_data_policy"], listed["locks"][0]["held"]) == ("hold", 2)

    unlock = f"/api/v1/locks/{lock['lock_id']}/unlock"
    status, lifted = await call(
        web, "admin", "POST", unlock, {"reason": "query answered", **signature("admin")}
    )
    assert status == 200, lifted
    assert lifted["released"] == 2
    assert (lifted["lock"]["unlocked_by"], lifted["lock"]["unlock_reason"]) == (
        "admin",
        "query answered",
    )
    assert lifted["lock"]["held"] == 0
    assert await rows(web.trial.url, "SELECT count(*) FROM readings") == [(2,)]
    status, listed = await call(web, "monitor", "GET", REVIEWS)
    ((review),) = listed["reviews"]
    assert review["outdated_at"] is not None
    assert [(c["seq"], c["readings"]) for c in review["changes"]] == [(seq, 2)]

    status, problem = await call(
        web, "admin", "POST", unlock, {"reason": "again", **signature("admin")}
    )
    assert (status, problem["type"].rsplit("/", 1)[-1]) == (409, "conflict")
    status, _ = await call(
        web, "admin", "POST", "/api/v1/locks/999999/unlock", {"reason": "x", **signature("admin")}
    )
    assert status == 404
    assert await rows(
        web.trial.url,
        "SELECT action FROM audit_log WHERE action IN ('period.lock', 'period.unlock',"
        " 'study.late_data_policy_set') ORDER BY audit_id",
    ) == [("study.late_data_policy_set",), ("period.lock",), ("period.unlock",)]


async def test_input_that_cannot_be_is_refused_before_a_password_is_checked(web: Web) -> None:
    cases: list[tuple[str, str, dict[str, str]]] = [
        ("monitor", REVIEWS, sign_body("monitor", to=START)),
        ("monitor", REVIEWS, sign_body("monitor", meaning="   ")),
        ("monitor", REVIEWS, sign_body("monitor", meaning="x" * 201)),
        ("monitor", REVIEWS, sign_body("monitor", **{"from": "2026-02-30T00:00:00Z"})),
        ("monitor", REVIEWS, sign_body("monitor", to="2026-03-11T00:00:00")),
        ("admin", LOCKS, lock_body(reason=" ")),
        ("admin", LOCKS, lock_body(reason="x" * 501)),
        ("admin", LOCKS, lock_body(to="2026-03-09T00:00:00+01:00")),
    ]
    for key, path, body in cases:
        status, problem = await call(web, key, "POST", path, body)
        assert (status, problem["type"].rsplit("/", 1)[-1]) == (400, "invalid-field"), body
    assert await failed_logins(web, "monitor") == 0
    assert await failed_logins(web, "admin") == 0
    assert await rows(
        web.trial.url, "SELECT (SELECT count(*) FROM review_signoffs), count(*) FROM period_locks"
    ) == [(0, 0)]
