"""`trialstream queries`: the data queries of docs/queries.md on the command line. A monitor
opens a query on a reading, a range or a gap; the site answers; the monitor closes and
reopens; every step a message and an audit record stamped ``via: cli``. Each step in the
roles the API asks for it and for the operator's sites only; a step that does not fit the
query's state, an unknown query and input that cannot be are one ``error:`` line, exit 2, and
nothing stored."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from psycopg_pool import AsyncConnectionPool

from gateway.cli import main
from gateway.commands import operator
from storage import db, queries, registry
from storage.migrate import StorageMode
from storage.timeconv import from_ms
from storage.users import Role
from tests.alerts.test_engine import rows
from tests.fixtures.signers import add_operators, password_file
from tests.fixtures.trial import Trial
from tests.test_cli import trialstream
from tests.web.test_queries_api import iso, stored

STORED = (
    "SELECT (SELECT count(*) FROM data_queries), (SELECT count(*) FROM data_query_messages),"
    " (SELECT count(*) FROM audit_log WHERE starts_with(action, 'query.'))"
)


@pytest.fixture
async def env(trial: Trial, tmp_path: Path) -> dict[str, str]:
    async with db.connection(trial.url, autocommit=True) as conn:
        await registry.create_site(conn, "SITE-B", "S1", "Site B")
    await add_operators(
        trial.url,
        ("ada", Role.ADMIN, []),
        ("cora", Role.SITE_COORDINATOR, ["SITE-A"]),
        ("cleo", Role.CLINICIAN, ["SITE-A"]),
        ("mona", Role.MONITOR, ["SITE-A"]),
        ("omar", Role.MONITOR, ["SITE-B"]),
    )
    return {operator.PASSWORD_FILE_ENV: str(password_file(tmp_path))}


def run_cli(url: str, env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """``trialstream queries ARGS`` as a subprocess: the real command line."""
    done = trialstream("queries", args[0], "--database-url", url, *args[1:], env=env)
    assert "Traceback" not in done.stderr
    return done.returncode, done.stdout, done.stderr


async def in_process(
    url: str, capsys: pytest.CaptureFixture[str], argv: Sequence[str]
) -> tuple[int, str, str]:
    """``trialstream queries ARGV`` in this process (the password file from the environment
    the test set): its status, whether argparse or the command ends it, and its output."""
    capsys.readouterr()
    full = ["queries", argv[0], "--database-url", url, *argv[1:]]
    try:
        code = await asyncio.to_thread(main, full)
    except SystemExit as exc:  # argparse refuses before anything runs
        code = exc.code if isinstance(exc.code, int) else -1
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.fixture
def here(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The password file for commands run in this process."""
    monkeypatch.setenv(operator.PASSWORD_FILE_ENV, env[operator.PASSWORD_FILE_ENV])


def one_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], err


async def test_open_answer_close_reopen_through_the_command_line(
    trial: Trial, env: dict[str, str], pool: AsyncConnectionPool, storage_mode: StorageMode
) -> None:
    t, _ = await stored(pool, storage_mode)
    reading = f"heart_rate reading at {iso(t)} (hub-1 seq 7)"
    code, out, err = run_cli(
        trial.url, env, "open", "--participant", "P1", "--target", "reading",
        "--metric", "heart_rate", "--from", iso(t), "--device-id", "hub-1", "--seq", "7",
        "--text", "31/min at rest: artefact or bradycardia?", "--as", "mona",
    )  # fmt: skip
    assert code == 0, err
    assert out.strip() == f"query 1 opened on P1: {reading}"

    code, out, err = run_cli(trial.url, env, "list", "--participant", "P1", "--as", "cora")
    assert code == 0, err
    (line,) = out.splitlines()
    assert line.startswith(f"    1  open      P1  {reading}  opened by mona ")
    assert line.endswith(": 31/min at rest: artefact or bradycardia?")
    assert "; last: open by mona " in line

    code, out, err = run_cli(
        trial.url, env, "answer", "1", "--text", "Strap loose;\nre-fitted at the visit.",
        "--as", "cleo",
    )  # fmt: skip
    assert code == 0, err
    assert out.strip() == "query 1: answer by cleo; now answered"
    code, out, err = run_cli(trial.url, env, "close", "1", "--text", "explained", "--as", "mona")
    assert code == 0, err
    assert out.strip() == "query 1: close by mona; now closed"
    # (A closed query is not answered: it is reopened first; see below.)
    code, out, err = run_cli(
        trial.url, env, "reopen", "1", "--text", "Which strap?", "--json", "--as", "mona"
    )
    assert code == 0, err
    reopened = json.loads(out)
    assert (reopened["query_id"], reopened["state"]) == (1, "open")

    code, out, err = run_cli(trial.url, env, "show", "1", "--as", "cleo")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:3] == [
        "query 1: open",
        "  participant P1 (site SITE-A)",
        f"  about: {reading}",
    ]
    assert lines[3].startswith("  opened by mona ")
    said = [x for x in lines[4:] if not x.startswith("    ")]
    assert [x.split()[:3] for x in said] == [
        ["open", "by", "mona"],
        ["answer", "by", "cleo"],
        ["close", "by", "mona"],
        ["reopen", "by", "mona"],
    ]
    assert "    Strap loose;" in lines
    assert "    re-fitted at the visit." in lines

    code, out, err = run_cli(
        trial.url, env, "list", "--site", "SITE-A", "--state", "open", "--state", "closed",
        "--json", "--as", "ada",
    )  # fmt: skip
    assert code == 0, err
    (listed,) = json.loads(out)["queries"]
    assert listed == reopened
    assert {k: listed[k] for k in ("target", "metric", "from", "to", "device_id", "seq")} == {
        "target": "reading",
        "metric": "heart_rate",
        "from": iso(t),
        "to": iso(t),
        "device_id": "hub-1",
        "seq": 7,
    }
    assert [(m["action"], m["actor"], m["text"]) for m in listed["messages"]] == [
        ("open", "mona", "31/min at rest: artefact or bradycardia?"),
        ("answer", "cleo", "Strap loose;\nre-fitted at the visit."),
        ("close", "mona", "explained"),
        ("reopen", "mona", "Which strap?"),
    ]
    assert await rows(
        trial.url,
        "SELECT action, actor, entity, entity_id, detail->>'via', detail->>'from_state',"
        " detail->>'to_state' FROM audit_log WHERE starts_with(action, 'query.')"
        " ORDER BY audit_id",
    ) == [
        ("query.open", "mona", "participant", "P1", "cli", None, None),
        ("query.answer", "cleo", "query", "1", "cli", "open", "answered"),
        ("query.close", "mona", "query", "1", "cli", "answered", "closed"),
        ("query.reopen", "mona", "query", "1", "cli", "closed", "open"),
    ]
    assert await rows(trial.url, STORED) == [(1, 4, 4)]


async def test_ranges_gaps_the_state_filter_and_what_a_terminal_shows(
    trial: Trial,
    env: dict[str, str],
    here: None,
    pool: AsyncConnectionPool,
    storage_mode: StorageMode,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, gap = await stored(pool, storage_mode)
    code, out, err = await in_process(
        trial.url, capsys,
        ["open", "--participant", "P1", "--target", "gap", "--device-id", "hub-1", "--seq", "7",
         "--from", iso(gap.from_ms), "--to", iso(gap.to_ms), "--text", "Strap off?",
         "--as", "ada"],
    )  # fmt: skip
    assert code == 0, err
    assert out.strip() == (
        f"query 1 opened on P1: gap from {iso(gap.from_ms)} to {iso(gap.to_ms)} (hub-1 seq 7)"
    )
    start = iso(gap.from_ms - 3_600_000)
    code, out, err = await in_process(
        trial.url, capsys,
        ["open", "--participant", "P1", "--target", "range", "--metric", "spo2",
         "--from", start, "--to", iso(gap.from_ms), "--text", "No SpO2 for an hour",
         "--json", "--as", "mona"],
    )  # fmt: skip
    assert code == 0, err
    opened = json.loads(out)
    assert (opened["query_id"], opened["target"], opened["device_id"]) == (2, "range", None)
    code, _, err = await in_process(
        trial.url, capsys, ["close", "2", "--text", "explained", "--as", "mona"]
    )
    assert code == 0, err

    async def listed(*argv: str) -> list[int]:
        code, out, err = await in_process(trial.url, capsys, ["list", *argv, "--json"])
        assert code == 0, err
        return [q["query_id"] for q in json.loads(out)["queries"]]

    assert await listed("--participant", "P1", "--as", "cleo") == [1]
    assert await listed("--participant", "P1", "--state", "closed", "--as", "cleo") == [2]
    every = ("--state", "open", "--state", "answered", "--state", "closed")
    assert await listed("--site", "SITE-A", *every, "--as", "cora") == [2, 1]
    assert await listed("--site", "SITE-B", *every, "--as", "ada") == []
    code, out, _ = await in_process(
        trial.url, capsys, ["list", "--site", "SITE-A", "--state", "answered", "--as", "mona"]
    )
    assert (code, out.strip()) == (0, "site SITE-A has no answered queries")
    code, out, _ = await in_process(
        trial.url, capsys, ["list", "--participant", "P1", "--state", "closed", "--as", "ada"]
    )
    assert code == 0
    assert f"spo2 from {start} to {iso(gap.from_ms)}" in out
    assert "last: close by mona" in out

    # Storage refuses control characters whoever calls it; what a row may still hold (written
    # by hand, or before that rule) reaches a terminal without them.
    hostile = "\x1b[2Jsee\r\nnotes"
    async with db.connection(trial.url, autocommit=True) as conn:
        with pytest.raises(queries.QueryError, match="control character"):
            await queries.step(conn, 1, queries.Step.ANSWER, hostile, actor="cora")
        await queries.step(conn, 1, queries.Step.ANSWER, "see notes", actor="cora")
        # Past the append-only trigger (a superuser's session without triggers), as by hand.
        await conn.execute("SET session_replication_role = replica")
        await conn.execute(
            "UPDATE data_query_messages SET text = %s"
            " WHERE message_id = (SELECT max(message_id) FROM data_query_messages)",
            (hostile,),
        )
    code, out, _ = await in_process(trial.url, capsys, ["show", "1", "--as", "ada"])
    assert code == 0
    assert "\x1b" not in out
    assert "\r" not in out
    assert out.splitlines()[-2:] == ["    \ufffd[2Jsee", "    notes"]
    code, out, _ = await in_process(trial.url, capsys, ["list", "--site", "SITE-A", "--as", "ada"])
    assert code == 0
    (line,) = out.splitlines()
    assert "; last: answer by cora " in line
    assert line.endswith(": \ufffd[2Jsee notes")


async def test_other_sites_and_other_roles_are_refused(
    trial: Trial,
    env: dict[str, str],
    here: None,
    pool: AsyncConnectionPool,
    storage_mode: StorageMode,
    capsys: pytest.CaptureFixture[str],
) -> None:
    t, _ = await stored(pool, storage_mode)
    async with db.connection(trial.url, autocommit=True) as conn:
        subject = queries.Subject(queries.Target.RANGE, from_ms(t), from_ms(t), "heart_rate")
        qid = await queries.open_query(conn, "P1", subject, "why?", actor="mona")
    before = await rows(trial.url, STORED)
    opening = ["open", "--participant", "P1", "--target", "range", "--metric", "spo2",
               "--from", iso(t), "--text", "why?"]  # fmt: skip
    refused = [
        # Another site's monitor: not P1's site, not its queries.
        (["list", "--participant", "P1", "--as", "omar"], "omar does not work for site 'SITE-A'"),
        (["list", "--site", "SITE-A", "--as", "omar"], "omar does not work for site 'SITE-A'"),
        (["show", str(qid), "--as", "omar"], "omar does not work for site 'SITE-A'"),
        ([*opening, "--as", "omar"], "omar does not work for site 'SITE-A'"),
        (["close", str(qid), "--text", "x", "--as", "omar"], "does not work for site"),
        (["reopen", str(qid), "--text", "x", "--as", "omar"], "does not work for site"),
        # The site's staff, in a role that may not take the step.
        ([*opening, "--as", "cora"], "cora (site_coordinator) may not run `queries open`"),
        (["answer", str(qid), "--text", "x", "--as", "mona"], "may not run `queries answer`"),
        (["close", str(qid), "--text", "x", "--as", "cleo"], "may not run `queries close`"),
        (["reopen", str(qid), "--text", "x", "--as", "cora"], "may not run `queries reopen`"),
        # No account, or a wrong one.
        (["show", str(qid)], "`queries show` needs --as USER"),
        (["show", str(qid), "--as", "ghost"], "authentication failed for 'ghost'"),
    ]
    for argv, says in refused:
        code, out, err = await in_process(trial.url, capsys, argv)
        assert (code, out) == (2, ""), argv
        one_error(err, says)
    assert await rows(trial.url, STORED) == before
    assert await rows(
        trial.url,
        "SELECT entity_id, detail->>'user', detail->>'error' FROM audit_log"
        " WHERE action = 'cli.refused' ORDER BY audit_id",
    ) == [
        ("queries list", "omar", "NotPermitted"),
        ("queries list", "omar", "NotPermitted"),
        ("queries show", "omar", "NotPermitted"),
        ("queries open", "omar", "NotPermitted"),
        ("queries close", "omar", "NotPermitted"),
        ("queries reopen", "omar", "NotPermitted"),
        ("queries open", "cora", "NotPermitted"),
        ("queries answer", "mona", "NotPermitted"),
        ("queries close", "cleo", "NotPermitted"),
        ("queries reopen", "cora", "NotPermitted"),
        ("queries show", None, "NoUser"),
        ("queries show", "ghost", "InvalidCredentials"),
    ]


async def test_what_cannot_be_is_one_line_and_nothing_stored(
    trial: Trial,
    env: dict[str, str],
    here: None,
    pool: AsyncConnectionPool,
    storage_mode: StorageMode,
    capsys: pytest.CaptureFixture[str],
) -> None:
    t, _ = await stored(pool, storage_mode)
    async with db.connection(trial.url, autocommit=True) as conn:
        subject = queries.Subject(queries.Target.RANGE, from_ms(t), from_ms(t), "heart_rate")
        closed = await queries.open_query(conn, "P1", subject, "why?", actor="mona")
        await queries.step(conn, closed, queries.Step.CLOSE, "done", actor="mona")
    before = await rows(trial.url, STORED)
    day = "2026-03-01T00:00:00+00:00"
    on = ["open", "--participant", "P1", "--text", "why?", "--as", "mona"]
    cases = [
        ([*on, "--target", "range", "--metric", "spo2", "--from", day, "--to",
          "2026-02-28T00:00:00+00:00"], "the range ends before it starts"),
        ([*on, "--target", "range", "--metric", "steps", "--from", day], "unknown metric 'steps'"),
        ([*on, "--target", "reading", "--metric", "heart_rate", "--from", day,
          "--device-id", "hub-1", "--seq", "1"], "participant P1 has no such reading"),
        ([*on, "--target", "reading", "--metric", "heart_rate", "--from", day],
         "a reading is named by its metric, time and envelope"),
        ([*on, "--target", "gap", "--from", day, "--to", day, "--device-id", "hub-1",
          "--seq", "7"], "participant P1 has no such gap"),
        (["open", "--participant", "P404", "--target", "range", "--metric", "spo2",
          "--from", day, "--text", "why?", "--as", "mona"], "no participant 'P404'"),
        (["open", "--participant", "P1", "--target", "range", "--metric", "spo2",
          "--from", day, "--text", " \n\t ", "--as", "mona"], "the text is empty"),
        (["answer", str(closed), "--text", "late", "--as", "cleo"],
         f"query {closed} is closed: it cannot be answered"),
        (["close", str(closed), "--text", "again", "--as", "mona"], "it cannot be closed"),
        (["answer", "999", "--text", "x", "--as", "cleo"], "no query 999"),
        (["show", "999", "--as", "ada"], "no query 999"),
        (["list", "--site", "SITE-Z", "--as", "ada"], "no site 'SITE-Z'"),
    ]  # fmt: skip
    for argv, says in cases:
        code, out, err = await in_process(trial.url, capsys, argv)
        assert (code, out) == (2, ""), argv
        one_error(err, says)
    assert await rows(trial.url, STORED) == before


HUGE = "9" * 5000
# Every one refused by argparse, each with a piece of what it says.
HOSTILE = [
    (["show", "99999999999999999999"], "not a query id: '99999999999999999999'"),
    (["show", str(2**62 + 1)], "not a query id"),
    (["show", HUGE], "not a query id: '999999999999999999999999999999'"),
    (["show", "-1"], "not a query id: '-1'"),
    (["show", "0"], "not a query id: '0'"),
    (["show", "\u0663"], "not a query id"),  # an Arabic-Indic three: a digit, not ASCII
    (["answer", "1;DROP TABLE data_queries", "--text", "x"], "not a query id"),
    (["close", "1 OR 1=1", "--text", "x"], "not a query id"),
    (["reopen", "0x10", "--text", "x"], "not a query id"),
    (["answer", "1", "--text", "x" * 4001], "a text of 1 to 4000 characters, not 4001"),
    (["answer", "1", "--text", "x" * 1_000_000], "a text of 1 to 4000 characters"),
    (["answer", "1", "--text", ""], "a text of 1 to 4000 characters, not 0"),
    (["answer", "1", "--text", "ok\x00"], "control character ('\\x00' at 2)"),
    (["close", "1", "--text", "\x1b[2Jcleared"], "control character ('\\x1b' at 0)"),
    (["reopen", "1", "--text", "bell\x07"], "control character"),
    (["list", "--participant", "P1'; DROP TABLE participants;--"], "not an id"),
    (["list", "--participant", "P" * 65], "not an id"),
    (["list", "--site", "SITE-A\x00"], "not an id"),
    (["list", "--participant", "P1", "--site", "SITE-A"], "not allowed with argument"),
    (["list", "--participant", "P1", "--state", "all"], "invalid choice: 'all'"),
    (["open", "--participant", "P1", "--target", "everything", "--from",
      "2026-03-01T00:00:00+00:00", "--text", "x"], "invalid choice: 'everything'"),
    (["open", "--participant", "P1", "--target", "range", "--metric", "spo2",
      "--from", "2026-03-01T00:00", "--text", "x"], "give a time zone"),
    (["open", "--participant", "P1", "--target", "range", "--metric", "spo2",
      "--from", HUGE, "--text", "x"], "not an ISO 8601 time"),
    (["open", "--participant", "P1", "--target", "range", "--metric", "spo2",
      "--from", "2026-13-01T00:00:00+00:00", "--text", "x"], "not an ISO 8601 time"),
    (["open", "--participant", "P1", "--target", "range", "--metric", "spo2",
      "--from", "0001-01-01T00:00:00+00:00", "--text", "x"], "a time from"),
    (["open", "--participant", "P1", "--target", "range", "--metric", "spo2",
      "--from", "2026-03-01T00:00:00+00:00", "--to", "now", "--text", "x"],
     "not an ISO 8601 time"),
    (["open", "--participant", "P1", "--target", "range", "--metric", "SpO2; --",
      "--from", "2026-03-01T00:00:00+00:00", "--text", "x"], "not a metric name"),
    (["open", "--participant", "P1", "--target", "gap", "--device-id", "../hub-1",
      "--seq", "7", "--from", "2026-03-01T00:00:00+00:00", "--text", "x"], "not an id"),
    (["open", "--participant", "P1", "--target", "gap", "--device-id", "hub-1",
      "--seq", "-1", "--from", "2026-03-01T00:00:00+00:00", "--text", "x"],
     "not a sequence number: '-1'"),
    (["open", "--participant", "P1", "--target", "gap", "--device-id", "hub-1",
      "--seq", str(2**63), "--from", "2026-03-01T00:00:00+00:00", "--text", "x"],
     "not a sequence number"),
]  # fmt: skip


async def test_hostile_arguments_are_refused_before_a_password_is_read(
    trial: Trial, env: dict[str, str], here: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each refused by argparse with one line, before the password is read or the database
    touched (one database for all: each case is a few milliseconds)."""
    audited = await rows(trial.url, "SELECT count(*) FROM audit_log")
    for argv, says in HOSTILE:
        code, out, err = await in_process(trial.url, capsys, [*argv, "--as", "mona"])
        assert (code, out) == (2, ""), argv
        # argparse's usage, then the error on one line, the bad value cut short.
        last = err.strip().splitlines()[-1]
        assert last.startswith("trialstream queries "), err
        assert ": error: " in last, err
        assert says in last, (argv, err)
        assert len(err) < 2000, argv
    assert await rows(trial.url, STORED) == [(0, 0, 0)]
    assert await rows(trial.url, "SELECT count(*) FROM audit_log") == audited
    assert await rows(trial.url, "SELECT sum(failed_logins) FROM users") == [(0,)]


def test_the_roles_are_the_apis() -> None:
    from gateway.web.api import ENDPOINTS

    api = {e.operation_id: e.roles for e in ENDPOINTS}
    same_act = {
        "queries list": ("list_participant_queries", "list_site_queries"),
        "queries show": ("get_query",),
        "queries open": ("open_query",),
        "queries answer": ("answer_query",),
        "queries close": ("close_query",),
        "queries reopen": ("reopen_query",),
    }
    for command, operations in same_act.items():
        for operation in operations:
            assert operator.ROLES[command] == api[operation], (command, operation)
