"""Helpers for consent tests: actors, participant accounts with a cheap (real) argon2 hasher."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from consent.records import Actor
from storage import db, users
from storage.db import Conn
from tests.fixtures.signers import CHEAP_HASHER, PASSWORD
from tests.fixtures.trial import Trial

__all__ = ["CHEAP_HASHER", "PASSWORD"]

ADMIN = Actor("admin", users.Role.ADMIN)
COORDINATOR = Actor("coord-a", users.Role.SITE_COORDINATOR, frozenset({"SITE-A"}))
OTHER_COORDINATOR = Actor("coord-b", users.Role.SITE_COORDINATOR, frozenset({"SITE-B"}))


@dataclass
class Accounts:
    url: str

    async def participant(self, participant_id: str) -> Actor:
        async with db.connection(self.url) as conn:
            user = await users.create_user(
                conn,
                actor="admin",
                username=f"user-{participant_id}",
                display_name=f"Participant {participant_id}",
                role=users.Role.PARTICIPANT,
                password=PASSWORD,
                participant_id=participant_id,
                hasher=CHEAP_HASHER,
            )
            await conn.commit()
        return Actor.of(user)


@pytest.fixture
def accounts(trial: Trial) -> Accounts:
    return Accounts(trial.url)


@pytest.fixture
async def conn(trial: Trial) -> AsyncIterator[Conn]:
    """An autocommit connection: the consent functions own their transactions."""
    async with db.connection(trial.url, autocommit=True) as c:
        yield c
