"""Who may do what: roles per operation, and site scoping of every resource.

Two checks, in this order, on every API call and page:

1. the role: each operation names the roles allowed (``403 forbidden`` otherwise);
2. the site: staff (site coordinators, clinicians, monitors) see only the participants,
   devices and alerts of the sites they belong to, a participant only themselves, an admin
   everything. A resource outside the user's reach answers ``404 not-found``, exactly as an
   absent one does, so ids of other sites cannot be probed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import datetime

from psycopg_pool import AsyncConnectionPool

from gateway.web.errors import NotFound
from storage import locks, sessions, views
from storage.db import Conn
from storage.locks import LateDataPolicy
from storage.users import Role, User

STAFF = frozenset({Role.SITE_COORDINATOR, Role.CLINICIAN, Role.MONITOR})
EVERYONE = frozenset(Role)
STAFF_AND_ADMIN = STAFF | {Role.ADMIN}
# Reading values and alerts: the people who look after participants' health and data.
CLINICAL = frozenset({Role.CLINICIAN, Role.MONITOR, Role.ADMIN})
COORDINATION = frozenset({Role.SITE_COORDINATOR, Role.ADMIN})
ADMIN_ONLY = frozenset({Role.ADMIN})


@dataclass(frozen=True, slots=True)
class Principal:
    """A signed-in user, as the request's session says."""

    user: User
    csrf_token: str
    token: str
    # When the session ends unless used before then (None: not known to this request).
    idle_expires_at: datetime | None = None

    @property
    def username(self) -> str:
        return self.user.username

    @property
    def role(self) -> Role:
        return self.user.role

    @property
    def site_ids(self) -> frozenset[str] | None:
        """The sites this user works for; None for an admin (every site)."""
        if self.user.role is Role.ADMIN:
            return None
        if self.user.role in STAFF:
            return self.user.sites
        return frozenset()

    def covers_site(self, site_id: str) -> bool:
        sites = self.site_ids
        return sites is None or site_id in sites

    def covers_participant(self, participant_id: str, site_id: str) -> bool:
        if self.user.role is Role.PARTICIPANT:
            return self.user.participant_id == participant_id
        return self.covers_site(site_id)


async def visible_sites(db: Conn | AsyncConnectionPool, principal: Principal) -> list[str]:
    """Every site id the principal may see (for an admin: all of them, read from ``db``; a
    pool is only drawn on then, so a stream re-checking its user's sites costs no query)."""
    sites = principal.site_ids
    if sites is not None:
        return sorted(sites)
    if isinstance(db, AsyncConnectionPool):
        async with db.connection() as conn:
            return [s.site_id for s in await views.sites(conn, None)]
    return [s.site_id for s in await views.sites(db, None)]


async def require_site(principal: Principal, site_id: str, conn: Conn) -> views.SiteRow:
    if principal.covers_site(site_id):
        found = await views.sites(conn, [site_id])
        if found:
            return found[0]
    raise NotFound(f"no site {site_id!r}")


async def require_study(principal: Principal, study_id: str, conn: Conn) -> LateDataPolicy:
    """The late data policy of a study the principal may see (an admin any, staff one where
    they have a site), else ``NotFound``, like a study that does not exist."""
    policy = await locks.study_policy(conn, study_id)
    sites = principal.site_ids
    if policy is not None and sites is not None:
        mine = await views.sites(conn, sorted(sites))
        if not any(s.study_id == study_id for s in mine):
            policy = None
    if policy is None:
        raise NotFound(f"no study {study_id!r}")
    return policy


async def require_participant(
    principal: Principal, participant_id: str, conn: Conn
) -> tuple[str, str]:
    """``(study_id, site_id)`` of a participant the principal may see, else ``NotFound``."""
    home = await views.participant_home(conn, participant_id)
    if home is None or not principal.covers_participant(participant_id, home[1]):
        raise NotFound(f"no participant {participant_id!r}")
    return home


# Open streams' sessions are checked again this often.
STREAM_CHECK_S = 5.0

# How the sessions of many tokens are read at once (storage.sessions.lookup_many).
LookupMany = Callable[[Conn, Collection[str]], Awaitable[dict[str, sessions.Session]]]


async def _looked_at(conn: Conn, tokens: Collection[str]) -> dict[str, sessions.Session]:
    """The sessions of open streams, as they are: watching a stream is not a use of the
    session, so the check does not restart its idle time (an unattended screen is signed out
    after ``sessions.IDLE_TIMEOUT`` like any other)."""
    return await sessions.lookup_many(conn, tokens, touch=False)


class SessionChecks:
    """The sessions of a process's open streams (alert board, live views), checked again
    together: one query every ``every_s`` for all of them, not one per stream. A stream asks
    :meth:`current` for its user as the session says now (sites and role may have changed);
    None means the session has ended."""

    def __init__(self, every_s: float | None = None, lookup_many: LookupMany = _looked_at) -> None:
        self.every_s = every_s  # None: STREAM_CHECK_S, as it is at each check
        self._lookup_many = lookup_many
        self._open: dict[str, int] = {}  # token -> streams open with it
        self._current: dict[str, Principal] = {}
        self._checked_at = time.monotonic()
        self._checking = asyncio.Lock()
        self.checks = 0

    def opened(self, principal: Principal) -> None:
        """A stream opened with a session its request has just checked."""
        self._open[principal.token] = self._open.get(principal.token, 0) + 1
        self._current.setdefault(principal.token, principal)

    def closed(self, principal: Principal) -> None:
        left = self._open.get(principal.token, 0) - 1
        if left > 0:
            self._open[principal.token] = left
        else:
            self._open.pop(principal.token, None)
            self._current.pop(principal.token, None)

    async def current(self, pool: AsyncConnectionPool, principal: Principal) -> Principal | None:
        async with self._checking:
            every = STREAM_CHECK_S if self.every_s is None else self.every_s
            if time.monotonic() - self._checked_at >= every:
                asked = list(self._open)
                async with pool.connection() as conn:
                    found = await self._lookup_many(conn, asked)
                current = {
                    token: Principal(s.user, s.csrf_token, token, s.idle_expires_at)
                    for token, s in found.items()
                    if token in self._open  # not closed during the query
                }
                for token in self._open.keys() - set(asked):  # opened during the query
                    if token in self._current:
                        current[token] = self._current[token]
                self._current = current
                self._checked_at = time.monotonic()
                self.checks += 1
        return self._current.get(principal.token)
