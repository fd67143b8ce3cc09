"""Who may do what: roles per operation, and site scoping of every resource.

Two checks, in this order, on every API call and page:

1. the role: each operation names the roles allowed (``403 forbidden`` otherwise);
2. the site: staff (site coordinators, clinicians, monitors) see only the participants,
   devices and alerts of the sites they belong to, a participant only themselves, an admin
   everything. A resource outside the user's reach answers ``404 not-found``, exactly as an
   absent one does, so ids of other sites cannot be probed.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.web.errors import NotFound
from storage import sessions, views
from storage.db import Conn
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


async def visible_sites(conn: Conn, principal: Principal) -> list[str]:
    """Every site id the principal may see (for an admin: all of them)."""
    sites = principal.site_ids
    if sites is not None:
        return sorted(sites)
    return [s.site_id for s in await views.sites(conn, None)]


async def require_site(principal: Principal, site_id: str, conn: Conn) -> views.SiteRow:
    if principal.covers_site(site_id):
        found = await views.sites(conn, [site_id])
        if found:
            return found[0]
    raise NotFound(f"no site {site_id!r}")


async def require_participant(
    principal: Principal, participant_id: str, conn: Conn
) -> tuple[str, str]:
    """``(study_id, site_id)`` of a participant the principal may see, else ``NotFound``."""
    home = await views.participant_home(conn, participant_id)
    if home is None or not principal.covers_participant(participant_id, home[1]):
        raise NotFound(f"no participant {participant_id!r}")
    return home


async def still_signed_in(conn: Conn, principal: Principal) -> Principal | None:
    """The principal as its session says now (its sites and role may have changed), or None
    once the session has ended: what a long-lived stream checks now and then."""
    session = await sessions.lookup(conn, principal.token)
    if session is None:
        return None
    return Principal(session.user, session.csrf_token, principal.token)
