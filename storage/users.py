"""People who use trialstream: accounts with argon2id password hashes and a lockout.

``verify_password`` is the one place a password is checked (login, and re-authentication when
a participant signs consent). After ``MAX_FAILED_LOGINS`` failures in a row the account is
locked for ``LOCKOUT``; a success resets the count. An unknown user name costs the same hash
as a wrong password and raises the same error, so neither timing nor type tells them apart.

The counters must survive the failure they count: ``verify_password`` commits its own
transaction, so call it on a connection with no transaction open (autocommit or idle).
Account changes are audited (``storage.audit``) in the transaction that makes them.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from psycopg import errors as pg_errors

from storage import audit
from storage.db import Conn
from storage.errors import StorageError

log = logging.getLogger(__name__)

# Five wrong passwords in a row, then 15 minutes locked: slows online guessing to a few
# hundred tries a day per account while a participant who mistypes is not locked out for good.
MAX_FAILED_LOGINS = 5
LOCKOUT = timedelta(minutes=15)
MIN_PASSWORD_LENGTH = 10

DEFAULT_HASHER = PasswordHasher()


class Role(StrEnum):
    PARTICIPANT = "participant"
    SITE_COORDINATOR = "site_coordinator"
    CLINICIAN = "clinician"
    MONITOR = "monitor"
    ADMIN = "admin"


class UserError(StorageError):
    """Base of account errors."""


class InvalidCredentials(UserError):
    """Unknown user name or wrong password (deliberately not told apart)."""


class AccountLocked(UserError):
    def __init__(self, username: str, until: datetime) -> None:
        super().__init__(f"account {username!r} is locked until {until.isoformat()}")
        self.until = until


class AccountDisabled(UserError):
    """The account was disabled; it cannot sign in or sign."""


class DuplicateUser(UserError):
    """A user with that name exists."""


class InvalidUser(UserError):
    """The account's fields are not acceptable (role, password length, missing participant)."""


@dataclass(frozen=True, slots=True)
class User:
    user_id: int
    username: str
    display_name: str
    role: Role
    participant_id: str | None
    sites: frozenset[str]


async def create_user(
    conn: Conn,
    *,
    actor: str,
    username: str,
    display_name: str,
    role: Role,
    password: str,
    participant_id: str | None = None,
    sites: Collection[str] = (),
    hasher: PasswordHasher = DEFAULT_HASHER,
) -> User:
    """Create an account (audited ``user.create``); a participant account names its participant."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidUser(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
    if (role is Role.PARTICIPANT) != (participant_id is not None):
        raise InvalidUser("a participant account, and only one, names its participant")
    if not username or not username.isprintable() or username != username.strip():
        raise InvalidUser("user name must be printable without surrounding spaces")
    pw_hash = hasher.hash(password)
    try:
        async with conn.transaction():
            cur = await conn.execute(
                "INSERT INTO users (username, display_name, role, participant_id, password_hash)"
                " VALUES (%s, %s, %s, %s, %s) RETURNING user_id",
                (username, display_name, role.value, participant_id, pw_hash),
            )
            row = await cur.fetchone()
            assert row is not None
            user_id = int(row[0])
            site_set = frozenset(sites)
            for site in sorted(site_set):
                await conn.execute(
                    "INSERT INTO user_sites (user_id, site_id) VALUES (%s, %s)", (user_id, site)
                )
            detail: dict[str, object] = {"role": role.value, "sites": sorted(site_set)}
            if participant_id is not None:
                detail["participant_id"] = participant_id
            await audit.append(
                conn,
                actor=actor,
                action="user.create",
                entity="user",
                entity_id=username,
                detail=detail,
            )
    except pg_errors.UniqueViolation as exc:
        raise DuplicateUser(f"user {username!r} exists") from exc
    except pg_errors.ForeignKeyViolation as exc:
        raise InvalidUser(f"unknown participant or site for user {username!r}") from exc
    log.info("user created username=%s role=%s", username, role.value)
    return User(user_id, username, display_name, role, participant_id, site_set)


_SELECT = """
SELECT u.user_id, u.username, u.display_name, u.role, u.participant_id, u.password_hash,
       u.failed_logins, u.locked_until, u.disabled_at IS NOT NULL, now(),
       coalesce((SELECT array_agg(site_id) FROM user_sites s WHERE s.user_id = u.user_id), '{}')
FROM users u WHERE u.username = %s
"""


async def get_user(conn: Conn, username: str) -> User | None:
    if "\x00" in username:
        return None
    cur = await conn.execute(_SELECT, (username,))
    row = await cur.fetchone()
    if row is None:
        return None
    return User(int(row[0]), str(row[1]), str(row[2]), Role(row[3]), row[4], frozenset(row[10]))


_DUMMY_HASHES: dict[tuple[int, int, int], str] = {}


def _dummy_hash(hasher: PasswordHasher) -> str:
    """A hash with the hasher's cost, verified when there is no real one: same time spent."""
    key = (hasher.time_cost, hasher.memory_cost, hasher.parallelism)
    found = _DUMMY_HASHES.get(key)
    if found is None:
        found = _DUMMY_HASHES[key] = hasher.hash("no account has this password")
    return found


def _password_matches(hasher: PasswordHasher, pw_hash: str | None, password: str) -> bool:
    try:
        if pw_hash is None:
            hasher.verify(_dummy_hash(hasher), password)
            return False
        return hasher.verify(pw_hash, password)
    except (VerificationError, InvalidHashError):
        return False


async def verify_password(
    conn: Conn,
    username: str,
    password: str,
    *,
    hasher: PasswordHasher = DEFAULT_HASHER,
) -> User:
    """The account if the password is right; else ``InvalidCredentials``, ``AccountLocked``
    or ``AccountDisabled``. Counts failures and locks the account (audited ``user.locked``)."""
    row = None
    if "\x00" not in username:
        async with conn.transaction():
            cur = await conn.execute(_SELECT, (username,))
            row = await cur.fetchone()
    if row is None:
        _password_matches(hasher, None, password)
        raise InvalidCredentials("invalid user name or password")
    (
        user_id,
        _,
        display,
        role,
        participant_id,
        pw_hash,
        _failed,
        locked_until,
        disabled,
        now,
        sites,
    ) = row
    user = User(int(user_id), username, str(display), Role(role), participant_id, frozenset(sites))
    if disabled:
        raise AccountDisabled(f"account {username!r} is disabled")
    if locked_until is not None and locked_until > now:
        raise AccountLocked(username, locked_until)
    if _password_matches(hasher, pw_hash, password):
        async with conn.transaction():
            await conn.execute(
                "UPDATE users SET failed_logins = 0, locked_until = NULL WHERE user_id = %s",
                (user_id,),
            )
        if pw_hash is not None and hasher.check_needs_rehash(pw_hash):
            async with conn.transaction():
                await conn.execute(
                    "UPDATE users SET password_hash = %s WHERE user_id = %s",
                    (hasher.hash(password), user_id),
                )
        return user
    async with conn.transaction():
        cur = await conn.execute(
            "UPDATE users SET failed_logins = failed_logins + 1,"
            " locked_until = CASE WHEN failed_logins + 1 >= %s THEN now() + %s END"
            " WHERE user_id = %s RETURNING failed_logins, locked_until",
            (MAX_FAILED_LOGINS, LOCKOUT, user_id),
        )
        counted = await cur.fetchone()
        assert counted is not None
        if counted[1] is not None:
            await audit.append(
                conn,
                actor=username,
                action="user.locked",
                entity="user",
                entity_id=username,
                detail={"failed_logins": int(counted[0])},
                reason="too many failed password attempts",
            )
            log.warning("account locked username=%s failed=%d", username, counted[0])
    raise InvalidCredentials("invalid user name or password")


async def disable_user(conn: Conn, *, actor: str, username: str, reason: str) -> None:
    """Disable an account (audited ``user.disable``); its rows stay for attribution."""
    async with conn.transaction():
        cur = await conn.execute(
            "UPDATE users SET disabled_at = now() WHERE username = %s AND disabled_at IS NULL",
            (username,),
        )
        if cur.rowcount != 1:
            raise InvalidUser(f"no enabled user {username!r}")
        await audit.append(
            conn,
            actor=actor,
            action="user.disable",
            entity="user",
            entity_id=username,
            reason=reason,
        )


__all__ = [
    "DEFAULT_HASHER",
    "LOCKOUT",
    "MAX_FAILED_LOGINS",
    "AccountDisabled",
    "AccountLocked",
    "DuplicateUser",
    "InvalidCredentials",
    "InvalidUser",
    "Role",
    "User",
    "UserError",
    "create_user",
    "disable_user",
    "get_user",
    "verify_password",
]
