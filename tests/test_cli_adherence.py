"""`trialstream adherence`: the schedule (admins), arms (the site's coordinators) and a
participant's days (staff of the site), each refused outside its role or site and with a
one-line error on input that cannot be."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.commands.operator import PASSWORD_FILE_ENV
from storage import db, registry
from storage.users import Role
from tests.alerts.test_engine import rows
from tests.fixtures.signers import add_operators, password_file
from tests.fixtures.trial import Trial
from tests.test_cli import trialstream


@pytest.fixture
async def env(trial: Trial, tmp_path: Path) -> dict[str, str]:
    async with db.connection(trial.url, autocommit=True) as conn:
        await registry.create_site(conn, "SITE-B", "S1", "Site B")
    await add_operators(
        trial.url,
        ("ada", Role.ADMIN, []),
        ("cora", Role.SITE_COORDINATOR, ["SITE-A"]),
        ("otto", Role.SITE_COORDINATOR, ["SITE-B"]),
        ("mona", Role.MONITOR, ["SITE-A"]),
    )
    return {PASSWORD_FILE_ENV: str(password_file(tmp_path))}


async def test_an_admin_sets_the_schedule_and_staff_list_it(
    trial: Trial, env: dict[str, str]
) -> None:
    db_flag = ("--database-url", trial.url)
    base = ("adherence", "schedule", *db_flag, "--study", "S1")
    done = trialstream(
        *base, "--metric", "heart_rate", "--continuous", "--rate-hz", "1", "--wear-hours", "12",
        "--from", "2026-03-01", "--as", "ada", env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "heart_rate continuous at 1 Hz, worn 12 h a day for the study from 2026-03-01" in (
        done.stdout
    )
    done = trialstream(
        *base, "--metric", "glucose", "--spot", "--per-day", "4", "--as", "ada", env=env
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    refused = trialstream(
        *base, "--metric", "glucose", "--spot", "--per-day", "4", "--as", "cora", env=env
    )  # fmt: skip
    assert refused.returncode == 2
    listed = trialstream(
        "adherence", "schedules", *db_flag, "--study", "S1", "--json", "--as", "mona", env=env
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)
    assert [(e["metric"], e["kind"], e["scope"]) for e in entries] == [
        ("glucose", "spot", "study"),
        ("heart_rate", "continuous", "study"),
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--metric", "heart_rate", "--continuous", "--rate-hz", "1"), "wear_hours is required"),
        (("--metric", "heart_rate", "--continuous", "--rate-hz", "nan", "--wear-hours", "8"),
         "rate_hz must be a finite number"),
        (("--metric", "glucose", "--spot", "--per-day", "1000"), "per_day must be 1 to 96"),
        (("--metric", "steps", "--none"), "unknown metric"),
        (("--metric", "glucose", "--none", "--arm", "x;y"), "not an arm name"),
        (("--metric", "glucose", "--none", "--from", "2026-02-30"), "not a day"),
        (("--metric", "glucose", "--none", "--from", "9" * 5000), "not a day"),
        (("--metric", "glucose", "--none", "--from", "0001-01-01"), "a day from 2000-01-01"),
    ],
)  # fmt: skip
async def test_a_schedule_that_cannot_be_is_one_line_and_nothing_stored(
    trial: Trial, env: dict[str, str], args: tuple[str, ...], message: str
) -> None:
    done = trialstream(
        "adherence", "schedule", "--database-url", trial.url, "--study", "S1", *args,
        "--as", "ada", env=env,
    )  # fmt: skip
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert await rows(trial.url, "SELECT count(*) FROM collection_schedules") == [(0,)]


async def test_arms_are_set_by_the_sites_coordinator_and_shown_days_by_its_staff(
    trial: Trial, env: dict[str, str]
) -> None:
    db_flag = ("--database-url", trial.url)
    arm = ("adherence", "arm", *db_flag, "--participant", "P1")
    assert trialstream(*arm, "--arm", "B", "--as", "otto", env=env).returncode == 2
    done = trialstream(*arm, "--arm", "B", "--as", "cora", env=env)
    assert done.returncode == 0, done.stderr
    assert await rows(trial.url, "SELECT arm FROM participants WHERE participant_id = 'P1'") == [
        ("B",)
    ]
    show = ("adherence", "show", *db_flag, "--participant", "P1")
    done = trialstream(*show, "--from", "2026-03-01", "--to", "2026-03-02", "--as", "mona", env=env)
    assert done.returncode == 0, done.stderr
    assert "participant P1, 2026-03-01 to 2026-03-02" in done.stdout
    assert trialstream(*show, "--as", "otto", env=env).returncode == 2
    too_long = trialstream(
        *show, "--from", "2025-01-01", "--to", "2026-01-01", "--as", "mona", env=env
    )  # fmt: skip
    assert too_long.returncode == 2
    assert "at most 92 days" in too_long.stderr
