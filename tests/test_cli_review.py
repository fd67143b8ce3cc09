"""`trialstream review`: sign-offs by the site's clinicians and monitors (the --as password is
the e-signature's re-authentication), listed by the site's staff; locks, unlocks and the late
data policy by admins; each refused outside its role or site, and input that cannot be
refused with one line and nothing stored."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from psycopg_pool import AsyncConnectionPool

from gateway.commands.operator import PASSWORD_FILE_ENV
from storage import db, registry
from storage.migrate import StorageMode
from storage.users import Role
from tests.alerts.test_engine import rows
from tests.fixtures.signers import add_operators, password_file
from tests.fixtures.trial import Trial
from tests.storage.test_review_lock import DAY, store
from tests.test_cli import trialstream

START = DAY.isoformat()
END = (DAY + timedelta(days=1)).isoformat()


@pytest.fixture
async def env(trial: Trial, tmp_path: Path) -> dict[str, str]:
    async with db.connection(trial.url, autocommit=True) as conn:
        await registry.create_site(conn, "SITE-B", "S1", "Site B")
        await registry.create_study(conn, "S2", "Another study")
        await registry.create_site(conn, "SITE-C", "S2", "Site C")
    await add_operators(
        trial.url,
        ("ada", Role.ADMIN, []),
        ("cora", Role.SITE_COORDINATOR, ["SITE-A"]),
        ("cleo", Role.CLINICIAN, ["SITE-A"]),
        ("mona", Role.MONITOR, ["SITE-A"]),
        ("omar", Role.MONITOR, ["SITE-B"]),
        ("cleve", Role.CLINICIAN, ["SITE-C"]),
    )
    return {PASSWORD_FILE_ENV: str(password_file(tmp_path))}


def review(url: str, env: dict[str, str], *args: str) -> tuple[int, str, str]:
    done = trialstream("review", args[0], "--database-url", url, *args[1:], env=env)
    assert "Traceback" not in done.stderr
    return done.returncode, done.stdout, done.stderr


async def test_a_sign_off_by_the_sites_monitor_is_outdated_by_later_data(
    trial: Trial, env: dict[str, str], pool: AsyncConnectionPool, storage_mode: StorageMode
) -> None:
    await store(pool, storage_mode, 1, 2, 3)
    sign = ("sign", "--participant", "P1", "--from", START, "--to", END, "--meaning", "Reviewed")
    code, out, err = review(trial.url, env, *sign, "--as", "mona")
    assert code == 0, err
    assert "3 readings, signed by Mona (mona, monitor): Reviewed" in out
    # A coordinator does not sign; another site's monitor does not find the participant.
    for who in ("cora", "omar", "ada"):
        code, _, err = review(trial.url, env, *sign, "--as", who)
        assert code == 2, (who, err)
        assert len(err.strip().splitlines()) == 1
    late = await store(pool, storage_mode, 4)
    code, out, err = review(trial.url, env, "list", "--participant", "P1", "--json", "--as", "cora")
    assert code == 0, err
    (signed,) = json.loads(out)
    assert (signed["signer"], signed["signer_role"], signed["readings"]) == ("mona", "monitor", 3)
    assert signed["outdated_at"] is not None
    assert [(c["seq"], c["readings"]) for c in signed["changes"]] == [(late, 1)]
    code, out, err = review(trial.url, env, "list", "--participant", "P1", "--as", "cleo")
    assert code == 0, err
    assert "OUTDATED since" in out
    assert f"+ 1 readings from hub-1 seq {late}" in out
    assert review(trial.url, env, "list", "--participant", "P1", "--as", "omar")[0] == 2
    assert await rows(
        trial.url,
        "SELECT actor, detail->>'via' FROM audit_log WHERE action = 'review.sign'",
    ) == [("mona", "cli")]
    assert await rows(
        trial.url,
        "SELECT detail->>'user', detail->>'error' FROM audit_log WHERE action = 'cli.refused'"
        " ORDER BY audit_id",
    ) == [
        ("cora", "NotPermitted"),
        ("omar", "NotPermitted"),
        ("ada", "NotPermitted"),
        ("omar", "NotPermitted"),
    ]


async def test_an_admin_locks_holds_and_unlocks(
    trial: Trial, env: dict[str, str], pool: AsyncConnectionPool, storage_mode: StorageMode
) -> None:
    period = ("--from", START, "--to", END)
    lock = ("lock", "--study", "S1", *period, "--reason", "interim analysis")
    assert review(trial.url, env, *lock, "--as", "mona")[0] == 2
    code, out, err = review(trial.url, env, "late-data", "--study", "S1", "--hold", "--as", "ada")
    assert code == 0, err
    assert "held for an unlock" in out
    code, out, err = review(trial.url, env, *lock, "--as", "ada")
    assert code == 0, err
    assert f"lock 1: S1 {START} to {END} is closed to new data" in out
    await store(pool, storage_mode, 2, 3)
    assert await rows(trial.url, "SELECT count(*) FROM readings") == [(0,)]

    code, out, err = review(trial.url, env, "locks", "--study", "S1", "--json", "--as", "omar")
    assert code == 0, err
    listed = json.loads(out)
    assert listed["late_data_policy"] == "hold"
    assert [(x["lock_id"], x["held"], x["unlocked_at"]) for x in listed["locks"]] == [(1, 2, None)]
    code, out, err = review(trial.url, env, "locks", "--study", "S1", "--as", "cora")
    assert code == 0, err
    assert "in force, 2 readings held" in out
    # Staff of another study do not see this one's locks.
    assert review(trial.url, env, "locks", "--study", "S1", "--as", "cleve")[0] == 2

    unlock = ("unlock", "--lock", "1", "--reason", "query answered")
    assert review(trial.url, env, *unlock, "--as", "mona")[0] == 2
    code, out, err = review(trial.url, env, *unlock, "--as", "ada")
    assert code == 0, err
    assert "lock 1 lifted: 2 held readings stored" in out
    assert await rows(trial.url, "SELECT count(*) FROM readings") == [(2,)]
    code, _, err = review(trial.url, env, *unlock, "--as", "ada")
    assert code == 2
    assert err.strip() == "error: no lock 1 in force"
    code, _, err = review(trial.url, env, "late-data", "--study", "S1", "--refuse", "--as", "ada")
    assert code == 0, err
    assert await rows(
        trial.url,
        "SELECT action, actor FROM audit_log WHERE action IN ('period.lock', 'period.unlock',"
        " 'study.late_data_policy_set') ORDER BY audit_id",
    ) == [
        ("study.late_data_policy_set", "ada"),
        ("period.lock", "ada"),
        ("period.unlock", "ada"),
        ("study.late_data_policy_set", "ada"),
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("sign", "--participant", "P1", "--from", END, "--to", START, "--meaning", "ok",
          "--as", "mona"), "the period ends before it starts"),
        (("sign", "--participant", "P1", "--from", START, "--to", END, "--meaning", "x" * 201,
          "--as", "mona"), "meaning in 1 to 200 characters"),
        (("sign", "--participant", "P404", "--from", START, "--to", END, "--meaning", "ok",
          "--as", "mona"), "no participant 'P404'"),
        (("lock", "--study", "S1", "--from", START, "--to", END, "--reason", " ", "--as", "ada"),
         "give a reason of 1 to 500 characters"),
        (("lock", "--study", "NOPE", "--from", START, "--to", END, "--reason", "x",
          "--as", "ada"), "no study 'NOPE'"),
        (("locks", "--study", "NOPE", "--as", "ada"), "no study 'NOPE'"),
        (("late-data", "--study", "NOPE", "--hold", "--as", "ada"), "no study 'NOPE'"),
    ],
)  # fmt: skip
async def test_what_cannot_be_is_one_line_and_nothing_stored(
    trial: Trial, env: dict[str, str], args: tuple[str, ...], message: str
) -> None:
    code, _, err = review(trial.url, env, *args)
    assert code == 2
    assert err.startswith("error: ")
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert await rows(
        trial.url,
        "SELECT (SELECT count(*) FROM review_signoffs), (SELECT count(*) FROM period_locks)",
    ) == [(0, 0)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("sign", "--participant", "P1", "--from", "2026-03-10T00:00", "--to", END,
          "--meaning", "ok"), "give a time zone"),
        (("sign", "--participant", "P1", "--from", "9" * 5000, "--to", END, "--meaning", "ok"),
         "not an ISO 8601 time"),
        (("list", "--participant", "P1;DROP"), "not an id"),
        (("unlock", "--lock", "0", "--reason", "x"), "not a lock id"),
        (("late-data", "--study", "S1"), "one of the arguments --refuse --hold is required"),
    ],
)  # fmt: skip
async def test_malformed_arguments_are_refused_before_a_password_is_read(
    trial: Trial, env: dict[str, str], args: tuple[str, ...], message: str
) -> None:
    audited = await rows(trial.url, "SELECT count(*) FROM audit_log")
    code, _, err = review(trial.url, env, *args, "--as", "ada")
    assert code == 2
    # argparse's usage, then the error on one line, the bad value cut short.
    assert message in err.strip().splitlines()[-1], err
    assert len(err) < 2000
    assert await rows(trial.url, "SELECT count(*) FROM audit_log") == audited
    assert await rows(trial.url, "SELECT sum(failed_logins) FROM users") == [(0,)]


async def test_a_read_on_the_command_line_is_on_the_read_trail_and_a_refused_one_is_not(
    trial: Trial, env: dict[str, str]
) -> None:
    code, _, err = review(trial.url, env, "list", "--participant", "P1", "--as", "cleo")
    assert code == 0, err
    assert review(trial.url, env, "list", "--participant", "P1", "--as", "omar")[0] == 2
    (read,) = await rows(
        trial.url,
        "SELECT actor, entity, entity_id, detail FROM audit_log WHERE action = 'data.read'",
    )
    actor, entity, entity_id, detail = read
    assert (actor, entity, entity_id) == ("cleo", "participant", "P1")
    assert isinstance(detail, dict)
    assert detail["operation"] == "review list"
    assert detail["query"] == {"json": False, "participant": "P1"}
    assert detail["via"] == "cli"
    assert await rows(trial.url, "SELECT actor FROM audit_log WHERE action = 'cli.refused'") == [
        ("omar",)
    ]


def test_every_read_command_is_an_authenticated_one() -> None:
    from gateway.commands import operator

    assert set(operator.ROLES) >= operator.READS
