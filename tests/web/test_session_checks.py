"""Open streams' sessions, checked together: one query for all of a process's streams, the
user as the session says now, an ended session as None, and a stream opened while a check
runs not taken for signed out, one closed while a check runs not kept."""

from __future__ import annotations

import asyncio
from collections.abc import Collection

from psycopg_pool import AsyncConnectionPool

from gateway.web.access import Principal, SessionChecks
from storage import db, sessions, users
from storage.db import Conn
from tests.web.conftest import Web


async def principal(web: Web, key: str) -> Principal:
    signed = await web.sign_in(key)
    async with db.connection(web.trial.url) as conn:
        session = await sessions.lookup(conn, signed.cookie)
    assert session is not None
    return Principal(session.user, session.csrf_token, signed.cookie)


async def test_one_query_checks_every_open_stream(web: Web, pool: AsyncConnectionPool) -> None:
    clinician, monitor = await principal(web, "clinician"), await principal(web, "monitor")
    checks = SessionChecks(every_s=0.0)
    checks.opened(clinician)
    checks.opened(clinician)  # two streams of one session
    checks.opened(monitor)
    now = await checks.current(pool, clinician)
    assert now is not None
    assert now.user.sites == frozenset({"SITE-A"})
    assert checks.checks == 1
    # The monitor signs out; the clinician loses SITE-A: the next check says so.
    async with db.connection(web.trial.url) as conn:
        assert await sessions.end_session(conn, monitor.token)
        await conn.execute(
            "DELETE FROM user_sites WHERE user_id ="
            " (SELECT user_id FROM users WHERE username = 'clinician')"
        )
        await conn.commit()
    assert await checks.current(pool, monitor) is None
    after = await checks.current(pool, clinician)
    assert after is not None
    assert after.user.sites == frozenset()
    assert checks.checks == 3
    # One of the clinician's two streams closes: the other still counts.
    checks.closed(clinician)
    assert await checks.current(pool, clinician) is not None
    checks.closed(clinician)
    assert await checks.current(pool, clinician) is None  # no stream of it left


async def test_a_stream_opened_during_a_check_is_not_taken_for_signed_out(
    web: Web, pool: AsyncConnectionPool
) -> None:
    clinician, monitor = await principal(web, "clinician"), await principal(web, "monitor")
    asked: list[list[str]] = []
    querying, go_on = asyncio.Event(), asyncio.Event()

    async def slow(conn: Conn, tokens: Collection[str]) -> dict[str, sessions.Session]:
        asked.append(sorted(tokens))
        querying.set()
        await go_on.wait()
        return await sessions.lookup_many(conn, tokens)

    coordinator = await principal(web, "coordinator")
    checks = SessionChecks(every_s=0.0, lookup_many=slow)
    checks.opened(clinician)
    checks.opened(coordinator)
    check = asyncio.create_task(checks.current(pool, clinician))
    await querying.wait()
    checks.opened(monitor)  # the monitor's stream opens while the check runs
    checks.closed(coordinator)  # and the coordinator's closes
    go_on.set()
    assert await check is not None
    assert asked == [sorted([clinician.token, coordinator.token])]
    checks.every_s = 3600.0  # no new check: the monitor keeps what its request found
    assert await checks.current(pool, monitor) == monitor
    # The coordinator's session is live, but no stream of it is open any more.
    assert await checks.current(pool, coordinator) is None


async def test_a_disabled_users_streams_are_signed_out(web: Web, pool: AsyncConnectionPool) -> None:
    clinician = await principal(web, "clinician")
    checks = SessionChecks(every_s=0.0)
    checks.opened(clinician)
    async with db.connection(web.trial.url) as conn:
        await users.disable_user(conn, actor="admin", username="clinician", reason="left")
        await conn.commit()
    assert await checks.current(pool, clinician) is None
