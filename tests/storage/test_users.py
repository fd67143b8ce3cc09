"""Accounts: argon2id hashes, one error for unknown user and wrong password, lockout."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from argon2 import PasswordHasher

from storage import db, registry, users
from storage.db import Conn

HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
PASSWORD = "a long enough password"


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[Conn]:
    async with db.connection(database_url, autocommit=True) as c:
        await registry.create_study(c, "S1", "Study")
        await registry.create_site(c, "SITE-A", "S1", "Site A")
        await registry.create_participant(c, "P1", "S1", "SITE-A")
        yield c


async def make(conn: Conn, username: str = "coord", **kw: object) -> users.User:
    args: dict[str, object] = {
        "actor": "admin",
        "username": username,
        "display_name": "Coordinator",
        "role": users.Role.SITE_COORDINATOR,
        "password": PASSWORD,
        "sites": {"SITE-A"},
        "hasher": HASHER,
    }
    args.update(kw)
    return await users.create_user(conn, **args)  # type: ignore[arg-type]


async def test_create_and_verify(conn: Conn) -> None:
    made = await make(conn)
    assert made.sites == frozenset({"SITE-A"})
    cur = await conn.execute("SELECT password_hash FROM users WHERE username = 'coord'")
    row = await cur.fetchone()
    assert row is not None
    assert str(row[0]).startswith("$argon2id$")
    assert PASSWORD not in str(row[0])
    assert await users.verify_password(conn, "coord", PASSWORD, hasher=HASHER) == made
    assert await users.get_user(conn, "coord") == made
    assert await users.get_user(conn, "nobody") is None
    cur = await conn.execute("SELECT action, entity_id FROM audit_log")
    assert await cur.fetchall() == [("user.create", "coord")]


@pytest.mark.parametrize(
    ("error", "changes"),
    [
        (users.InvalidUser, {"password": "short"}),
        (users.InvalidUser, {"role": users.Role.PARTICIPANT}),  # names no participant
        (users.InvalidUser, {"participant_id": "P1"}),  # staff naming a participant
        (users.InvalidUser, {"username": " padded "}),
        (users.InvalidUser, {"username": ""}),
        (users.InvalidUser, {"sites": {"SITE-NONE"}}),
        (users.InvalidUser, {"role": users.Role.PARTICIPANT, "participant_id": "P-none"}),
    ],
)
async def test_bad_accounts_are_refused(
    conn: Conn, error: type[Exception], changes: dict[str, object]
) -> None:
    with pytest.raises(error):
        await make(conn, **changes)
    cur = await conn.execute("SELECT count(*) FROM users")
    assert await cur.fetchone() == (0,)


async def test_duplicate_user(conn: Conn) -> None:
    await make(conn)
    with pytest.raises(users.DuplicateUser):
        await make(conn)


async def test_unknown_user_and_wrong_password_are_the_same_error(conn: Conn) -> None:
    await make(conn)
    with pytest.raises(users.InvalidCredentials) as unknown:
        await users.verify_password(conn, "nobody", PASSWORD, hasher=HASHER)
    with pytest.raises(users.InvalidCredentials) as wrong:
        await users.verify_password(conn, "coord", "not the password", hasher=HASHER)
    assert str(unknown.value) == str(wrong.value)


async def test_lockout_after_repeated_failures_then_reset(conn: Conn) -> None:
    await make(conn)
    for _ in range(users.MAX_FAILED_LOGINS):
        with pytest.raises(users.InvalidCredentials):
            await users.verify_password(conn, "coord", "wrong password", hasher=HASHER)
    with pytest.raises(users.AccountLocked):
        await users.verify_password(conn, "coord", PASSWORD, hasher=HASHER)
    cur = await conn.execute("SELECT action FROM audit_log ORDER BY audit_id")
    assert await cur.fetchall() == [("user.create",), ("user.locked",)]
    # Once the lock has expired the right password works and resets the count.
    await conn.execute("UPDATE users SET locked_until = now() - interval '1 second'")
    await users.verify_password(conn, "coord", PASSWORD, hasher=HASHER)
    cur = await conn.execute("SELECT failed_logins, locked_until FROM users")
    assert await cur.fetchone() == (0, None)


async def test_disabled_account(conn: Conn) -> None:
    await make(conn)
    await users.disable_user(conn, actor="admin", username="coord", reason="left the study")
    with pytest.raises(users.AccountDisabled):
        await users.verify_password(conn, "coord", PASSWORD, hasher=HASHER)
    with pytest.raises(users.InvalidUser):
        await users.disable_user(conn, actor="admin", username="coord", reason="again")


async def test_hash_is_upgraded_when_the_parameters_change(conn: Conn) -> None:
    await make(conn)
    stronger = PasswordHasher(time_cost=2, memory_cost=16, parallelism=1)
    await users.verify_password(conn, "coord", PASSWORD, hasher=stronger)
    cur = await conn.execute("SELECT password_hash FROM users")
    row = await cur.fetchone()
    assert row is not None
    assert "m=16,t=2" in str(row[0])
