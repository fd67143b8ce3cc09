"""Participants' time zones over time: set through the real command, kept with history, a
reading's local time taken from the zone valid at its own time; bad zones and unknown
participants refused with a reason."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.commands.operator import PASSWORD_FILE_ENV
from storage import db, registry, time_zones, zones
from storage.users import Role
from tests.alerts.test_engine import rows
from tests.fixtures.signers import add_operators, password_file
from tests.fixtures.trial import Trial
from tests.test_cli import trialstream


async def test_the_zone_valid_at_each_time_gives_its_local_time(trial: Trial) -> None:
    async with db.connection(trial.url, autocommit=True) as conn:
        await time_zones.set_time_zone(
            conn, "P1", "Europe/Berlin", datetime(2026, 1, 1, tzinfo=UTC), actor="tester"
        )
        await time_zones.set_time_zone(
            conn, "P1", "America/New_York", datetime(2026, 6, 1, tzinfo=UTC), actor="tester"
        )
        periods = await time_zones.history(conn, "P1")
    assert [p.time_zone for p in periods] == ["Europe/Berlin", "America/New_York"]
    local = f"""
        SELECT to_char(r.time AT TIME ZONE {zones.LOCAL_ZONE}, 'YYYY-MM-DD HH24:MI')
        FROM (VALUES (1, 'P1', %s::timestamptz), (2, 'P1', %s::timestamptz),
                     (3, 'P1', %s::timestamptz), (4, 'P2', %s::timestamptz))
             AS r (n, participant_id, time)
        {zones.ZONE_AT_READING}
        ORDER BY r.n
    """
    times = (
        "2025-12-31T23:30:00Z",  # before the first zone: the first covers it (CET, +1)
        "2026-03-29T01:30:00Z",  # after the spring change (CEST, +2)
        "2026-07-01T12:00:00Z",  # after the move (EDT, -4)
        "2026-07-01T12:00:00Z",  # a participant without a zone: UTC
    )
    assert await rows(trial.url, local, times) == [
        ("2026-01-01 00:30",),
        ("2026-03-29 03:30",),
        ("2026-07-01 08:00",),
        ("2026-07-01 12:00",),
    ]


async def test_bad_zones_and_unknown_participants_are_refused(trial: Trial) -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    async with db.connection(trial.url, autocommit=True) as conn:
        for bad in ("Mars/Olympus", "Europe/Berlin; DROP TABLE x", "", "+05:00"):
            with pytest.raises(time_zones.UnknownTimeZone):
                await time_zones.set_time_zone(conn, "P1", bad, at, actor="tester")
        with pytest.raises(time_zones.UnknownParticipant):
            await time_zones.set_time_zone(conn, "NOPE", "UTC", at, actor="tester")
    assert await rows(trial.url, "SELECT count(*) FROM participant_time_zones") == [(0,)]


async def test_the_command_sets_a_zone_as_a_coordinator_of_the_site(
    trial: Trial, tmp_path: Path
) -> None:
    async with db.connection(trial.url, autocommit=True) as conn:
        await registry.create_site(conn, "SITE-B", "S1", "Site B")
    await add_operators(
        trial.url,
        ("cora", Role.SITE_COORDINATOR, ["SITE-A"]),
        ("otto", Role.SITE_COORDINATOR, ["SITE-B"]),
    )
    env = {PASSWORD_FILE_ENV: str(password_file(tmp_path))}
    base = ("site", "time-zone", "--database-url", trial.url, "--participant", "P1")
    done = trialstream(
        *base, "--zone", "Europe/Berlin", "--from", "2026-03-01T00:00:00+00:00", "--as", "cora",
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "P1: Europe/Berlin from 2026-03-01T00:00:00+00:00" in done.stdout
    other = trialstream(*base, "--zone", "UTC", "--as", "otto", env=env)
    assert other.returncode != 0
    unknown = trialstream(*base, "--zone", "Nowhere/City", "--as", "cora", env=env)
    assert unknown.returncode != 0
    assert "not an IANA time zone name" in unknown.stderr
    assert await rows(
        trial.url,
        "SELECT actor, action, detail->>'time_zone' FROM audit_log"
        " WHERE action = 'participant.time_zone_set'",
    ) == [("cora", "participant.time_zone_set", "Europe/Berlin")]


async def test_a_zone_given_at_registration_is_the_participants_from_then(
    trial: Trial, tmp_path: Path
) -> None:
    await add_operators(trial.url, ("cora", Role.SITE_COORDINATOR, ["SITE-A"]))
    env = {PASSWORD_FILE_ENV: str(password_file(tmp_path))}
    base = ("site", "add-participant", "--database-url", trial.url, "--site", "SITE-A")
    done = trialstream(
        *base, "--participant", "P5", "--time-zone", "Asia/Kolkata", "--as", "cora", env=env
    )
    assert done.returncode == 0, done.stderr
    assert "P5 registered at SITE-A (S1), time zone Asia/Kolkata" in done.stdout
    bad = trialstream(
        *base, "--participant", "P6", "--time-zone", "Nowhere/City", "--as", "cora", env=env
    )
    assert bad.returncode != 0
    assert "not an IANA time zone name" in bad.stderr
    async with db.connection(trial.url) as conn:
        assert [p.time_zone for p in await time_zones.history(conn, "P5")] == ["Asia/Kolkata"]
    # The participant with a zone that is not one was not registered either.
    assert await rows(
        trial.url, "SELECT count(*) FROM participants WHERE participant_id = 'P6'"
    ) == [(0,)]
