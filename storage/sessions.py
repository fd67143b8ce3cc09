"""Sign-in sessions of the web pages and the API.

A session is a random token in a cookie; the database keeps only its SHA-256, so reading the
table does not let anyone sign in. Each session ends after ``IDLE_TIMEOUT`` without use or
``ABSOLUTE_TIMEOUT`` after sign-in, whichever comes first, or when the user signs out or is
disabled. Each session has its own CSRF token, which a page sends back in a header on every
request that changes something.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

from storage.db import Conn
from storage.errors import StorageError
from storage.users import Role, User

# A clinician's tele-visit or a monitor's shift fits in 12 hours; 30 idle minutes keep an
# unattended screen from staying signed in for long (ICH E6 asks for controls on access).
IDLE_TIMEOUT = timedelta(minutes=30)
ABSOLUTE_TIMEOUT = timedelta(hours=12)
TOKEN_BYTES = 32


class SessionError(StorageError):
    """Base of the session errors."""


@dataclass(frozen=True, slots=True)
class NewSession:
    token: str
    csrf_token: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Session:
    user: User
    csrf_token: str
    created_at: datetime
    expires_at: datetime
    # When it ends unless used before then (never after ``expires_at``).
    idle_expires_at: datetime


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def create_session(
    conn: Conn,
    user_id: int,
    *,
    idle: timedelta = IDLE_TIMEOUT,
    absolute: timedelta = ABSOLUTE_TIMEOUT,
) -> NewSession:
    token = secrets.token_urlsafe(TOKEN_BYTES)
    csrf = secrets.token_urlsafe(TOKEN_BYTES)
    cur = await conn.execute(
        "INSERT INTO web_sessions (token_sha256, user_id, csrf_token, idle_expires_at,"
        " expires_at) VALUES (%s, %s, %s, now() + %s, now() + %s) RETURNING expires_at",
        (token_digest(token), user_id, csrf, idle, absolute),
    )
    row = await cur.fetchone()
    assert row is not None
    return NewSession(token, csrf, row[0])


_LOOKUP = """
SELECT s.token_sha256, u.user_id, u.username, u.display_name, u.role, u.participant_id,
       coalesce((SELECT array_agg(site_id) FROM user_sites x WHERE x.user_id = u.user_id),
                '{}'),
       s.csrf_token, s.created_at, s.expires_at, s.idle_expires_at,
       s.last_seen_at < now() - %(touch)s
FROM web_sessions s JOIN users u ON u.user_id = s.user_id
WHERE s.token_sha256 = ANY(%(digests)s)
  AND s.ended_at IS NULL AND s.idle_expires_at > now() AND s.expires_at > now()
  AND u.disabled_at IS NULL
"""
_TOUCH = """
UPDATE web_sessions s SET last_seen_at = now(),
       idle_expires_at = least(s.expires_at, now() + %(idle)s)
WHERE s.token_sha256 = ANY(%(digests)s) AND s.ended_at IS NULL
"""
# A session's idle expiry restarts on use, written at most this often: a page polling every
# few seconds then costs a read per request, not a write (and a commit) per request.
TOUCH_EVERY = timedelta(seconds=60)


async def lookup(conn: Conn, token: str, *, idle: timedelta = IDLE_TIMEOUT) -> Session | None:
    """The live session of ``token`` (its idle time restarts, to within TOUCH_EVERY), or None."""
    return (await lookup_many(conn, [token], idle=idle)).get(token)


async def lookup_many(
    conn: Conn, tokens: Collection[str], *, idle: timedelta = IDLE_TIMEOUT, touch: bool = True
) -> dict[str, Session]:
    """The live sessions among ``tokens``, by token, in one query (a gateway process checks
    the sessions of all its open streams at once); each one's idle time restarts as in
    :func:`lookup`, unless ``touch`` is False: a check that is not a use of the session (an
    open stream's) must not keep it alive."""
    by_digest = {token_digest(t): t for t in tokens if t and len(t) <= 128}
    if not by_digest:
        return {}
    cur = await conn.execute(_LOOKUP, {"digests": list(by_digest), "touch": TOUCH_EVERY})
    found: dict[str, Session] = {}
    stale: list[bytes] = []
    for (
        digest,
        uid,
        username,
        display,
        role,
        pid,
        sites,
        csrf,
        created,
        expires,
        idle_expires,
        old,
    ) in await cur.fetchall():
        user = User(int(uid), str(username), str(display), Role(role), pid, frozenset(sites))
        found[by_digest[bytes(digest)]] = Session(user, str(csrf), created, expires, idle_expires)
        if old and touch:
            stale.append(bytes(digest))
    if stale:
        await conn.execute(_TOUCH, {"digests": stale, "idle": idle})
    return found


async def end_session(conn: Conn, token: str, *, reason: str = "signed_out") -> bool:
    cur = await conn.execute(
        "UPDATE web_sessions SET ended_at = now(), ended_reason = %s"
        " WHERE token_sha256 = %s AND ended_at IS NULL",
        (reason, token_digest(token)),
    )
    return cur.rowcount == 1


async def end_user_sessions(conn: Conn, user_id: int, *, reason: str) -> int:
    cur = await conn.execute(
        "UPDATE web_sessions SET ended_at = now(), ended_reason = %s"
        " WHERE user_id = %s AND ended_at IS NULL",
        (reason, user_id),
    )
    return cur.rowcount


async def purge_expired(conn: Conn, *, older_than: timedelta = timedelta(days=30)) -> int:
    """Delete sessions that ended or expired more than ``older_than`` ago."""
    cur = await conn.execute(
        "DELETE FROM web_sessions WHERE least(coalesce(ended_at, 'infinity'), idle_expires_at,"
        " expires_at) < now() - %s",
        (older_than,),
    )
    return cur.rowcount


__all__ = [
    "ABSOLUTE_TIMEOUT",
    "IDLE_TIMEOUT",
    "NewSession",
    "Session",
    "SessionError",
    "create_session",
    "end_session",
    "end_user_sessions",
    "lookup",
    "purge_expired",
    "token_digest",
]
