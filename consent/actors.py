"""Who acts on consent records: a user, their role and their sites."""

from __future__ import annotations

from dataclasses import dataclass

from storage import users

STAFF_ROLES = frozenset({users.Role.SITE_COORDINATOR, users.Role.CLINICIAN, users.Role.MONITOR})


@dataclass(frozen=True, slots=True)
class Actor:
    """Who is acting: a user, their role, and the sites they work for (admin: all sites)."""

    user: str
    role: users.Role
    sites: frozenset[str] = frozenset()
    participant_id: str | None = None

    @classmethod
    def of(cls, user: users.User) -> Actor:
        return cls(user.username, user.role, user.sites, user.participant_id)

    def covers_site(self, site_id: str) -> bool:
        return self.role is users.Role.ADMIN or (self.role in STAFF_ROLES and site_id in self.sites)

    def is_participant(self, participant_id: str) -> bool:
        return self.role is users.Role.PARTICIPANT and self.participant_id == participant_id
