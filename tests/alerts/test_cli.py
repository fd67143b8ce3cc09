"""`trialstream alerts`: rules, escalation, list, ack and resolve through the real command."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from gateway.commands import alerts as cli_alerts
from gateway.commands.operator import PASSWORD_FILE_ENV
from ingest.rules import DAY_S, DEFAULT_MAX_GAP_S, MAX_ADHERENCE_DAYS, RuleKind, Severity
from storage import db, registry
from storage.alerts import AlertState
from storage.users import Role
from tests.alerts.conftest import Ingest, base_ms
from tests.alerts.test_engine import rows, steps
from tests.fixtures.signers import add_operators, password_file
from tests.fixtures.trial import Trial
from tests.test_cli import assert_one_clear_line
from tests.test_cli import trialstream as run_trialstream

# Commands run as these accounts, whose password the file of PASSWORD_FILE_ENV holds.
_ENV: dict[str, str] = {}


@pytest.fixture(autouse=True)
async def _operators(trial: Trial, tmp_path: Path) -> None:
    async with db.connection(trial.url, autocommit=True) as conn:
        await registry.create_site(conn, "SITE-B", "S1", "Site B")
    await add_operators(
        trial.url,
        ("admin", Role.ADMIN, ()),
        ("ann", Role.MONITOR, ["SITE-A"]),
        ("bea", Role.MONITOR, ["SITE-B"]),
    )
    _ENV[PASSWORD_FILE_ENV] = str(password_file(tmp_path))


def trialstream(*args: str) -> subprocess.CompletedProcess[str]:
    return run_trialstream(*args, env=_ENV)


def test_cli_choices_are_the_engines() -> None:
    assert tuple(k.value for k in RuleKind) == cli_alerts.KINDS
    assert tuple(s.value for s in Severity) == cli_alerts.SEVERITIES
    assert cli_alerts.STATES == (AlertState.OPEN, AlertState.ACKNOWLEDGED, AlertState.RESOLVED)
    assert cli_alerts.DEFAULT_MAX_GAP_S == DEFAULT_MAX_GAP_S
    assert (cli_alerts.DAY_S, cli_alerts.MAX_ADHERENCE_DAYS) == (DAY_S, MAX_ADHERENCE_DAYS)


async def test_rules_add_and_list(trial: Trial) -> None:
    db = ("--database-url", trial.url)
    added = trialstream(
        "alerts", "rules", "add", *db, "--study", "S1", "--name", "hr-high",
        "--metric", "heart_rate", "--high", "120", "--sustained-s", "60",
        "--hysteresis", "5", "--severity", "critical", "--as", "admin",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "'hr-high' (study): heart_rate > 120 for 60 s, hysteresis 5 [critical]" in added.stdout
    override = trialstream(
        "alerts", "rules", "add", *db, "--study", "S1", "--name", "hr-high",
        "--metric", "heart_rate", "--high", "140", "--participant", "P1", "--as", "admin",
    )  # fmt: skip
    assert override.returncode == 0, override.stderr
    assert "(participant P1)" in override.stdout
    listed = trialstream("alerts", "rules", "list", *db, "--study", "S1", "--json")
    assert listed.returncode == 0, listed.stderr
    got = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["name"], r["participant_id"], r["high"], r["severity"]) for r in got] == [
        ("hr-high", None, 120.0, "critical"),
        ("hr-high", "P1", 140.0, "warning"),
    ]
    text = trialstream("alerts", "rules", "list", *db)
    assert text.returncode == 0
    assert len(text.stdout.splitlines()) == 2


async def test_bad_rules_get_one_clear_line(trial: Trial) -> None:
    db = ("--database-url", trial.url)
    base = ("alerts", "rules", "add", *db, "--study", "S1", "--name", "r", "--as", "admin")
    no_bounds = trialstream(*base, "--metric", "heart_rate")
    assert_one_clear_line(no_bounds, "needs low, high or both")
    unknown_metric = trialstream(*base, "--metric", "mood", "--high", "3")
    assert_one_clear_line(unknown_metric, "unknown metric 'mood'")
    bad_number = trialstream(*base, "--metric", "heart_rate", "--high", "lots")
    assert bad_number.returncode == 2
    assert "not a number: 'lots'" in bad_number.stderr
    bad_seconds = trialstream(*base, "--metric", "heart_rate", "--high", "1", "--max-gap-s", "0")
    assert bad_seconds.returncode == 2
    assert "seconds > 0" in bad_seconds.stderr
    assert await rows(trial.url, "SELECT count(*) FROM alert_rules") == [(0,)]


async def test_an_adherence_rule_takes_a_percentage_and_whole_days(trial: Trial) -> None:
    db = ("--database-url", trial.url)
    base = ("alerts", "rules", "add", *db, "--study", "S1", "--metric", "glucose",
            "--kind", "adherence", "--as", "admin")  # fmt: skip
    added = trialstream(*base, "--name", "checks", "--low", "50", "--days", "3")
    assert added.returncode == 0, added.stderr
    assert "glucose adherence < 50 % on 3 expected day(s) in a row" in added.stdout
    for days in ("0", "32", "1.5", "-1", "٣", "9" * 40):
        bad = trialstream(*base, "--name", "x", "--low", "50", "--days", days)
        assert bad.returncode == 2, days
        assert "expected whole days from 1 to 31" in bad.stderr, days
    no_percentage = trialstream(*base, "--name", "y", "--low", "150", "--days", "2")
    assert_one_clear_line(no_percentage, "a percentage in (0, 100]")
    assert await rows(trial.url, "SELECT name, kind, low, sustained_s FROM alert_rules") == [
        ("checks", "adherence", 50.0, 3 * 86_400)
    ]


async def test_list_ack_resolve(trial: Trial, ingest: Ingest) -> None:
    db = ("--database-url", trial.url)
    assert trialstream(
        "alerts", "rules", "add", *db, "--study", "S1", "--name", "hr-high",
        "--metric", "heart_rate", "--high", "120", "--as", "admin",
    ).returncode == 0  # fmt: skip
    await ingest(steps(base_ms(), 0, 2, 1, 130.0))
    ((alert_id,),) = await rows(trial.url, "SELECT alert_id FROM alerts")
    listed = trialstream("alerts", "list", *db, "--state", "open", "--json")
    assert listed.returncode == 0, listed.stderr
    (alert,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (alert["alert_id"], alert["state"], alert["participant_id"], alert["rule"]) == (
        alert_id,
        "open",
        "P1",
        "hr-high",
    )
    # Another site's monitor may not act on SITE-A's alert; the refusal is on record.
    for verb in ("ack", "resolve"):
        other = trialstream("alerts", verb, str(alert_id), *db, "--as", "bea")
        assert_one_clear_line(other, "bea does not work for site 'SITE-A'")
    premature = trialstream("alerts", "resolve", str(alert_id), *db, "--as", "ann")
    assert_one_clear_line(premature, "acknowledge it before resolving it")
    ack = trialstream("alerts", "ack", str(alert_id), *db, "--as", "ann", "--note", "on it")
    assert ack.returncode == 0, ack.stderr
    assert f"alert {alert_id} acknowledged by ann" in ack.stdout
    done = trialstream("alerts", "resolve", str(alert_id), *db, "--as", "ann", "--note", "ok")
    assert done.returncode == 0, done.stderr
    assert trialstream("alerts", "list", *db, "--state", "open").stdout == ""
    text = trialstream("alerts", "list", *db).stdout
    assert f"{alert_id}  resolved" in text
    missing = trialstream("alerts", "ack", "999", *db, "--as", "ann")
    assert_one_clear_line(missing, "no alert 999")
    assert await rows(
        trial.url,
        "SELECT actor, action FROM audit_log WHERE entity = 'alert' ORDER BY audit_id",
    ) == [
        ("system:alerts", "alert.opened"),
        ("ann", "alert.acknowledged"),
        ("ann", "alert.resolved"),
    ]
    refused = await rows(
        trial.url,
        "SELECT detail->>'command' FROM audit_log WHERE action = 'cli.refused'"
        " AND actor = 'bea' ORDER BY audit_id",
    )
    assert refused == [("alerts ack",), ("alerts resolve",)]


async def test_escalation_setting(trial: Trial) -> None:
    db = ("--database-url", trial.url)
    on = trialstream(
        "alerts", "escalation", *db, "--study", "S1", "--after-s", "900", "--as", "admin"
    )
    assert on.returncode == 0, on.stderr
    assert await rows(trial.url, "SELECT alert_escalation_s FROM studies") == [(900,)]
    off = trialstream("alerts", "escalation", *db, "--study", "S1", "--never", "--as", "admin")
    assert off.returncode == 0, off.stderr
    assert await rows(trial.url, "SELECT alert_escalation_s FROM studies") == [(None,)]
    unknown = trialstream(
        "alerts", "escalation", *db, "--study", "NOPE", "--never", "--as", "admin"
    )
    assert_one_clear_line(unknown, "no study 'NOPE'")


async def test_doubtful_readings_setting_is_audited_and_refuses_an_unknown_study(
    trial: Trial,
) -> None:
    db_flags = ("--database-url", trial.url)
    judged = trialstream(
        "alerts", "doubtful", *db_flags, "--study", "S1", "--judge", "--as", "admin"
    )
    assert judged.returncode == 0, judged.stderr
    assert "study S1: alert rules judge readings the device doubted" in judged.stdout
    assert await rows(
        trial.url, "SELECT alerts_on_doubtful FROM studies WHERE study_id = 'S1'"
    ) == [(True,)]
    unknown = trialstream(
        "alerts", "doubtful", *db_flags, "--study", "NOPE", "--skip", "--as", "admin"
    )
    assert unknown.returncode != 0
    assert_one_clear_line(unknown, "no study 'NOPE'")
    both = trialstream(
        "alerts", "doubtful", *db_flags, "--study", "S1", "--judge", "--skip", "--as", "admin"
    )
    assert both.returncode == 2
    assert await rows(
        trial.url, "SELECT action FROM audit_log WHERE action = 'study.alerts_on_doubtful_set'"
    ) == [("study.alerts_on_doubtful_set",)]
