"""Sign-in under load: argon2 stays off the event loop, and the lockout holds under concurrency."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from argon2 import PasswordHasher
from argon2.exceptions import VerificationError

from storage import db, users
from storage.db import Conn
from tests.web.conftest import Web

LOGIN = "/api/v1/session"
PASSWORD = "the right password"


async def _max_lateness(stop: asyncio.Event, interval: float = 0.01) -> float:
    """How late, at most, a 10 ms sleep on this loop woke up until ``stop``."""
    worst = 0.0
    while not stop.is_set():
        start = time.perf_counter()
        await asyncio.sleep(interval)
        worst = max(worst, time.perf_counter() - start - interval)
    return worst


def _one_verification() -> float:
    """Seconds one failed verification with the gateway's hasher takes (blocking)."""
    pw_hash = users.DEFAULT_HASHER.hash("some password or other")
    start = time.perf_counter()
    with pytest.raises(VerificationError):
        users.DEFAULT_HASHER.verify(pw_hash, "not that one")
    return time.perf_counter() - start


async def test_failed_sign_ins_do_not_stall_the_event_loop(web: Web) -> None:
    # The server runs on this test's loop, like the consumer does on the gateway's: while
    # sign-ins are checked, a coroutine that sleeps 10 ms must keep waking about on time.
    baseline = min(_one_verification() for _ in range(3))
    client = web.gateway.client
    stop = asyncio.Event()
    monitor = asyncio.create_task(_max_lateness(stop))
    await asyncio.sleep(0.05)
    # Unknown names (a dummy hash each, as costly as a real one), each its own account.
    answers = await asyncio.gather(
        *(
            client.post(LOGIN, json={"username": f"nobody-{i}", "password": "wrong guess"})
            for i in range(8)
        )
    )
    stop.set()
    lateness = await monitor
    assert [a.status for a in answers] == [401] * 8
    # Eight verifications ran meanwhile; on the loop, each would delay it by a whole one.
    # Off the loop the delays are the requests' own work: a fraction of one verification.
    assert lateness < baseline / 2, (lateness, baseline)


# A real argon2 hasher, cheap: the counts matter here, not the cost.
CHEAP = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


class Checks:
    """Counts the password checks sent to the hashing process (``users._password_matches``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = users.hash_off_loop

        async def counting(work: Any, *args: Any) -> Any:
            if work is users._password_matches:
                self.count += 1
            return await real(work, *args)

        monkeypatch.setattr(users, "hash_off_loop", counting)


GUESSES = 20


@pytest.fixture
async def conns(database_url: str) -> AsyncIterator[list[Conn]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(db.connection(database_url, autocommit=True))
            for _ in range(GUESSES)
        ]


async def test_concurrent_wrong_guesses_get_no_more_checks_than_the_lockout(
    conns: list[Conn], monkeypatch: pytest.MonkeyPatch
) -> None:
    hasher = CHEAP
    checks = Checks(monkeypatch)
    await users.create_user(
        conns[0],
        actor="tester",
        username="target",
        display_name="Target",
        role=users.Role.ADMIN,
        password=PASSWORD,
        hasher=hasher,
    )

    async def guess(conn: Conn, n: int) -> str:
        try:
            await users.verify_password(conn, "target", f"guess number {n}", hasher=hasher)
        except users.UserError as exc:
            return type(exc).__name__
        return "signed in"

    outcomes = await asyncio.gather(*(guess(c, n) for n, c in enumerate(conns)))
    assert checks.count == users.MAX_FAILED_LOGINS
    assert outcomes.count("InvalidCredentials") == users.MAX_FAILED_LOGINS
    assert outcomes.count("AccountLocked") == GUESSES - users.MAX_FAILED_LOGINS
    cur = await conns[0].execute(
        "SELECT failed_logins, locked_until > now() FROM users WHERE username = 'target'"
    )
    assert await cur.fetchone() == (users.MAX_FAILED_LOGINS, True)
    cur = await conns[0].execute("SELECT count(*) FROM audit_log WHERE action = 'user.locked'")
    assert await cur.fetchone() == (1,)
    # Locked: even the right password is refused, without a check.
    with pytest.raises(users.AccountLocked):
        await users.verify_password(conns[1], "target", PASSWORD, hasher=hasher)
    assert checks.count == users.MAX_FAILED_LOGINS


async def test_a_right_password_among_the_guesses_resets_the_count(conns: list[Conn]) -> None:
    hasher = CHEAP
    await users.create_user(
        conns[0],
        actor="tester",
        username="target",
        display_name="Target",
        role=users.Role.ADMIN,
        password=PASSWORD,
        hasher=hasher,
    )
    for n in range(users.MAX_FAILED_LOGINS - 1):
        with pytest.raises(users.InvalidCredentials):
            await users.verify_password(conns[0], "target", f"guess {n}", hasher=hasher)
    user = await users.verify_password(conns[0], "target", PASSWORD, hasher=hasher)
    assert user.username == "target"
    cur = await conns[0].execute("SELECT failed_logins, locked_until FROM users")
    assert await cur.fetchone() == (0, None)
