"""People who use trialstream: accounts with argon2id password hashes and a lockout.

``verify_password`` is the one place a password is checked (login, and re-authentication when
a participant signs consent). After ``MAX_FAILED_LOGINS`` failures in a row the account is
locked for ``LOCKOUT``; a success resets the count. An unknown user name costs the same hash
as a wrong password and raises the same error, so neither timing nor type tells them apart.

The lockout is counted before the password is checked: one ``UPDATE ... RETURNING`` reserves
the attempt (counts it as a failure, and sets the lock when it is the last one allowed), then
the hash is verified with no transaction or row lock held, and a right password resets the
count. Concurrent guesses therefore never get more than ``MAX_FAILED_LOGINS`` checks.

argon2 never runs on the event loop, nor at the priority of ingestion: hashing and verifying
(also of the dummy hash) run in a helper process at the lowest CPU priority (nice 19), behind
a semaphore of ``HASH_SLOTS`` (``hash_off_loop``). A thread was not enough: one verify with
the default parameters keeps 1.5 of 2 cores busy for about 0.1 s (four lanes), and a flood of
sign-ins pushed the gateway's p99 receipt latency from 0.1 s to 0.5-0.8 s (docs/performance.md,
login flood). At nice 19 the hashes use the CPU that ingestion leaves.

The counters must survive the failure they count: ``verify_password`` commits its own
transaction, so call it on a connection with no transaction open (autocommit or idle).
Account changes are audited (``storage.audit``) in the transaction that makes them.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Collection
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from psycopg import errors as pg_errors
from psycopg.rows import class_row

from storage import audit
from storage.db import Conn
from storage.errors import StorageError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Five wrong passwords in a row, then 15 minutes locked: slows online guessing to a few
# hundred tries a day per account while a participant who mistypes is not locked out for good.
MAX_FAILED_LOGINS = 5
LOCKOUT = timedelta(minutes=15)
MIN_PASSWORD_LENGTH = 10

DEFAULT_HASHER = PasswordHasher()

# argon2 runs in a low-priority helper process, never on the event loop that also runs the
# MQTT consumer. Each hash takes about 0.16 s of CPU and 64 MiB with the default parameters;
# two at a time bound that to 128 MiB, whatever the number of sign-ins waiting (the web rate
# limits, gateway.web.ratelimit, bound that number).
HASH_SLOTS = 2
HASH_NICENESS = 19
# How soon a hashing process whose parent is gone ends.
PARENT_CHECK_S = 1.0
# (pid, pool): made once per process, on first use.
_hash_pool: tuple[int, ProcessPoolExecutor] | None = None
_hash_pool_lock = threading.Lock()
# One semaphore per event loop: an asyncio.Semaphore belongs to the loop it first waits on.
_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


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
    pw_hash = await hash_off_loop(hasher.hash, password)
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


def _start_hashing_process(parent: int) -> None:
    """In the hashing process: yield the CPU to everything else (argon2's lane threads
    inherit the niceness), and end with the process it hashes for. A pool's process does
    not notice its parent's death by itself (it holds both ends of its own task queue), and a
    killed gateway worker would leave it behind."""
    os.nice(HASH_NICENESS)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _hashers() -> ProcessPoolExecutor:
    """The argon2 processes of this process (a forked child makes its own), started on
    first use. They are spawned, not forked (the gateway has threads, paho's and psycopg's,
    that a fork would copy mid-flight), from a thread of their own whose priority is lowered
    first: on Linux niceness is per thread and a process inherits its starter's, so the new
    interpreters' start-up (imports: a second or more of CPU) is niced from its first
    instruction, not only once the initializer runs."""
    global _hash_pool
    with _hash_pool_lock:
        if _hash_pool is None or _hash_pool[0] != os.getpid():
            pool = ProcessPoolExecutor(
                max_workers=HASH_SLOTS,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_hashing_process,
                initargs=(os.getpid(),),
            )
            starter = threading.Thread(
                target=_spawn_niced, args=(pool,), name="start-hashing", daemon=True
            )
            starter.start()
            starter.join()
            _hash_pool = (os.getpid(), pool)
        return _hash_pool[1]


def _spawn_niced(pool: ProcessPoolExecutor) -> None:
    try:
        if sys.platform == "linux":
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASH_NICENESS)
        for started in [pool.submit(os.getpid) for _ in range(HASH_SLOTS)]:
            started.result()
    except Exception:  # the pool starts what it lacks on its own, at the caller's priority
        log.exception("the password hashing processes could not be started niced")


def _replace_broken(pool: ProcessPoolExecutor) -> None:
    global _hash_pool
    with _hash_pool_lock:
        if _hash_pool is not None and _hash_pool[1] is pool:
            _hash_pool = None
    pool.shutdown(wait=False, cancel_futures=True)


def stop_hashing() -> None:
    """End the hashing processes (a server calls it as it stops). Left to the interpreter's
    exit, a process started by ``multiprocessing`` itself (a gateway worker) waits for them
    forever: it joins its children before the pool is told to end them."""
    global _hash_pool
    with _hash_pool_lock:
        found, _hash_pool = _hash_pool, None
    if found is not None and found[0] == os.getpid():
        found[1].shutdown(wait=True, cancel_futures=True)


async def hash_off_loop(work: Callable[..., T], *args: object) -> T:
    """``work(*args)`` in the argon2 process, at most ``HASH_SLOTS`` at a time.

    The slot is held until the work ends, even when the caller is cancelled meanwhile, so
    cancelled sign-ins cannot pile up argon2 work beyond the bound. A hashing process that
    died (killed for its memory) is replaced, and the work tried once more in the new one.
    """
    loop = asyncio.get_running_loop()
    slots = _SLOTS.get(loop)
    if slots is None:
        slots = _SLOTS[loop] = asyncio.Semaphore(HASH_SLOTS)
    for attempt in (1, 2):
        await slots.acquire()
        found = _hash_pool
        try:
            if found is not None and found[0] == os.getpid():
                pool = found[1]
            else:  # started off the loop: spawning waits for the new interpreters
                pool = await asyncio.to_thread(_hashers)
        except BaseException:
            slots.release()
            raise
        try:
            done = loop.run_in_executor(pool, work, *args)
        except BaseException:
            slots.release()
            raise
        done.add_done_callback(lambda _: slots.release())
        try:
            return await asyncio.shield(done)
        except BrokenProcessPool:
            _replace_broken(pool)
            if attempt == 2:
                raise
            log.error("the password hashing process died; starting another")
    raise AssertionError("unreachable")


_DUMMY_HASHES: dict[tuple[int, int, int], str] = {}


def _dummy_hash(hasher: PasswordHasher) -> str:
    """A hash with the hasher's cost, verified when there is no real one: same time spent."""
    key = (hasher.time_cost, hasher.memory_cost, hasher.parallelism)
    found = _DUMMY_HASHES.get(key)
    if found is None:
        found = _DUMMY_HASHES[key] = hasher.hash("no account has this password")
    return found


def _password_matches(hasher: PasswordHasher, pw_hash: str | None, password: str) -> bool:
    """Blocking (argon2): call through ``hash_off_loop``."""
    try:
        if pw_hash is None:
            hasher.verify(_dummy_hash(hasher), password)
            return False
        return hasher.verify(pw_hash, password)
    except (VerificationError, InvalidHashError):
        return False


@dataclass(frozen=True, slots=True)
class _Attempt:
    """An account whose sign-in attempt was reserved (counted as a failure until proven)."""

    user_id: int
    display_name: str
    role: str
    participant_id: str | None
    password_hash: str | None
    failed_logins: int
    locks: bool  # this attempt is the last one allowed: it set the lock
    sites: list[str]


@dataclass(frozen=True, slots=True)
class _Refusal:
    disabled: bool
    locked_until: datetime | None


# Only an enabled account that is not locked gets an attempt; the attempt that reaches the
# limit sets the lock itself, so a concurrent one finds the account locked (PostgreSQL
# re-checks the WHERE clause on the row a concurrent UPDATE committed).
_RESERVE = """
UPDATE users u SET failed_logins = u.failed_logins + 1,
       locked_until = CASE WHEN u.failed_logins + 1 >= %(max)s THEN now() + %(lockout)s END
WHERE u.username = %(username)s AND u.disabled_at IS NULL
  AND (u.locked_until IS NULL OR u.locked_until <= now())
RETURNING u.user_id, u.display_name, u.role, u.participant_id, u.password_hash,
          u.failed_logins, u.locked_until IS NOT NULL AS locks,
          coalesce((SELECT array_agg(s.site_id) FROM user_sites s WHERE s.user_id = u.user_id),
                   '{}') AS sites
"""

_REFUSAL = """
SELECT disabled_at IS NOT NULL AS disabled, locked_until FROM users WHERE username = %s
"""


async def _reserve_attempt(conn: Conn, username: str) -> _Attempt | _Refusal | None:
    """Count an attempt on ``username`` before its password is checked; why not, if not."""
    async with conn.transaction():
        async with conn.cursor(row_factory=class_row(_Attempt)) as cur:
            await cur.execute(
                _RESERVE, {"max": MAX_FAILED_LOGINS, "lockout": LOCKOUT, "username": username}
            )
            attempt = await cur.fetchone()
        if attempt is not None:
            return attempt
        async with conn.cursor(row_factory=class_row(_Refusal)) as cur:
            await cur.execute(_REFUSAL, (username,))
            return await cur.fetchone()


async def verify_password(
    conn: Conn,
    username: str,
    password: str,
    *,
    hasher: PasswordHasher = DEFAULT_HASHER,
) -> User:
    """The account if the password is right; else ``InvalidCredentials``, ``AccountLocked``
    or ``AccountDisabled``. Counts failures and locks the account (audited ``user.locked``).

    The attempt counts as a failure from its start until the password proves right, so an
    attempt cut short (cancelled, database gone) stays counted.
    """
    found = None if "\x00" in username else await _reserve_attempt(conn, username)
    if found is None:
        await hash_off_loop(_password_matches, hasher, None, password)
        raise InvalidCredentials("invalid user name or password")
    if isinstance(found, _Refusal):
        if found.disabled:
            raise AccountDisabled(f"account {username!r} is disabled")
        # Locked, or it was until a moment ago: refused either way, without a hash.
        raise AccountLocked(username, found.locked_until or datetime.now(UTC))
    a = found
    user = User(
        a.user_id, username, a.display_name, Role(a.role), a.participant_id, frozenset(a.sites)
    )
    if await hash_off_loop(_password_matches, hasher, a.password_hash, password):
        async with conn.transaction():
            await conn.execute(
                "UPDATE users SET failed_logins = 0, locked_until = NULL WHERE user_id = %s",
                (a.user_id,),
            )
        if a.password_hash is not None and hasher.check_needs_rehash(a.password_hash):
            new_hash = await hash_off_loop(hasher.hash, password)
            async with conn.transaction():
                await conn.execute(
                    "UPDATE users SET password_hash = %s WHERE user_id = %s",
                    (new_hash, a.user_id),
                )
        return user
    if a.locks:
        async with conn.transaction():
            # Still locked (a concurrent right password may have reset it): then audit it.
            cur = await conn.execute(
                "SELECT failed_logins FROM users WHERE user_id = %s AND locked_until > now()"
                " FOR UPDATE",
                (a.user_id,),
            )
            counted = await cur.fetchone()
            if counted is not None:
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


class AdminExists(UserError):
    """The first admin account exists: further accounts are made by an admin."""


# An arbitrary, fixed key for pg_advisory_xact_lock: "trialstream first admin".
FIRST_ADMIN_LOCK_KEY = 0x7472_6669_7273_74


async def has_admin(conn: Conn) -> bool:
    """Whether any admin account exists (a disabled one counts)."""
    cur = await conn.execute("SELECT EXISTS (SELECT 1 FROM users WHERE role = 'admin')")
    row = await cur.fetchone()
    return bool(row and row[0])


async def create_first_admin(
    conn: Conn,
    *,
    actor: str,
    username: str,
    display_name: str,
    password: str,
    hasher: PasswordHasher = DEFAULT_HASHER,
) -> User:
    """Create the first admin account (audited ``user.create``); ``AdminExists`` once any
    admin account exists. Concurrent calls are serialised, so only one of them succeeds."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (FIRST_ADMIN_LOCK_KEY,))
        if await has_admin(conn):
            raise AdminExists("an admin account exists: an admin creates further accounts")
        return await create_user(
            conn,
            actor=actor,
            username=username,
            display_name=display_name,
            role=Role.ADMIN,
            password=password,
            hasher=hasher,
        )


__all__ = [
    "DEFAULT_HASHER",
    "FIRST_ADMIN_LOCK_KEY",
    "HASH_SLOTS",
    "LOCKOUT",
    "MAX_FAILED_LOGINS",
    "AccountDisabled",
    "AccountLocked",
    "AdminExists",
    "DuplicateUser",
    "InvalidCredentials",
    "InvalidUser",
    "Role",
    "User",
    "UserError",
    "create_first_admin",
    "create_user",
    "disable_user",
    "get_user",
    "has_admin",
    "hash_off_loop",
    "stop_hashing",
    "verify_password",
]
