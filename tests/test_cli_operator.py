"""Audited commands run as an authenticated user (``--as``) and record the operating-system
user: refused without the right password, role or site (exit 2, nothing changed, a
``cli.refused`` record), and with them every audit record of the act names the user and
carries ``os_user``, ``host`` and ``via: "cli"``."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from gateway.cli import main
from gateway.commands import operator
from storage import db, registry, users
from tests.fixtures.signers import CHEAP_HASHER, PASSWORD
from tests.fixtures.trial import Trial
from tests.test_cli import trialstream

OS_USER, HOST = operator.os_identity()


async def add_user(
    url: str,
    username: str,
    role: users.Role,
    *,
    sites: Sequence[str] = (),
    participant_id: str | None = None,
) -> None:
    async with db.connection(url, autocommit=True) as conn:
        await users.create_user(
            conn,
            actor="setup",
            username=username,
            display_name=username.title(),
            role=role,
            password=PASSWORD,
            participant_id=participant_id,
            sites=sites,
            hasher=CHEAP_HASHER,
        )


async def cli(monkeypatch: pytest.MonkeyPatch, argv: Sequence[str], stdin: str = "") -> int:
    """``trialstream ARGV`` in this process, with ``stdin`` (not a terminal) as its input."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return await asyncio.to_thread(main, list(argv))


def rows(url: str, sql: str, *params: object) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


def execute(url: str, sql: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


def refusals(url: str) -> list[tuple[object, ...]]:
    return rows(url, "SELECT actor, entity_id, detail FROM audit_log WHERE action = 'cli.refused'")


def assert_stamped(detail: object) -> None:
    assert isinstance(detail, dict)
    assert detail["via"] == "cli"
    assert detail["os_user"] == OS_USER
    assert detail["host"] == HOST == socket.gethostname()


@pytest.fixture(autouse=True)
def _no_password_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(operator.PASSWORD_FILE_ENV, raising=False)


@dataclass(frozen=True)
class Family:
    """One audited command family: who runs what, the audit action it appends, and how to
    see whether it changed anything."""

    user: str
    role: users.Role
    argv: tuple[str, ...]
    action: str
    changed: str  # SQL counting what the act changes


FAMILIES = {
    "site": Family(
        "coord",
        users.Role.SITE_COORDINATOR,
        ("site", "create-study", "--study", "S9", "--name", "Nine"),
        "study.create",
        "SELECT count(*) FROM studies WHERE study_id = 'S9'",
    ),
    "admin": Family(
        "root",
        users.Role.ADMIN,
        ("admin", "disable-user", "--username", "victim", "--reason", "left"),
        "user.disable",
        "SELECT count(*) FROM users WHERE username = 'victim' AND disabled_at IS NOT NULL",
    ),
    "alerts": Family(
        "mon",
        users.Role.MONITOR,
        ("alerts", "escalation", "--study", "S1", "--after-s", "900"),
        "study.alert_escalation_set",
        "SELECT count(*) FROM studies WHERE alert_escalation_s = 900",
    ),
    "consent": Family(
        "coord",
        users.Role.SITE_COORDINATOR,
        ("consent", "withdraw", "--participant", "P1", "--initiated-by", "site", "--reason", "x"),
        "consent.withdraw",
        "SELECT count(*) FROM consents WHERE action = 'withdraw'",
    ),
    "export": Family(
        "mon",
        users.Role.MONITOR,
        ("export", "fhir", "--study", "S1", "--quiet"),
        "export.completed",
        "SELECT count(*) FROM audit_log WHERE action = 'export.started'",
    ),
}


async def family_setup(trial: Trial, family: Family) -> None:
    sites = () if family.role is users.Role.ADMIN else ("SITE-A",)
    await add_user(trial.url, family.user, family.role, sites=sites)
    await add_user(trial.url, "victim", users.Role.MONITOR, sites=("SITE-A",))


def family_argv(trial: Trial, family: Family, tmp_path: Path, *extra: str) -> list[str]:
    argv = [*family.argv, "--database-url", trial.url, *extra]
    if family.argv[0] == "export":
        argv += ["--out", str(tmp_path / "out")]
    return argv


@pytest.mark.parametrize("name", sorted(FAMILIES))
async def test_without_the_right_password_the_action_is_refused_and_audited(
    trial: Trial,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
) -> None:
    family = FAMILIES[name]
    await family_setup(trial, family)
    command = " ".join(family.argv[:2])
    as_user = ("--as", family.user)
    attempts = [
        # A wrong password.
        (family_argv(trial, family, tmp_path, *as_user, "--password-stdin"), "wrong one\n"),
        # No password at all: standard input is not a terminal and nothing else is given.
        (family_argv(trial, family, tmp_path, *as_user), ""),
        # Nobody named.
        (family_argv(trial, family, tmp_path), ""),
    ]
    for argv, stdin in attempts:
        assert await cli(monkeypatch, argv, stdin) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert err[0].startswith("error: ")
        assert "Traceback" not in err[0]
    assert rows(trial.url, family.changed) == [(0,)]
    assert rows(trial.url, "SELECT count(*) FROM audit_log WHERE action = %s", family.action) == [
        (0,)
    ]
    found = refusals(trial.url)
    assert [(actor, entity_id) for actor, entity_id, _ in found] == [
        (family.user, command),
        (family.user, command),
        (f"cli:{OS_USER}", command),
    ]
    errors = []
    for _, _, detail in found:
        assert_stamped(detail)
        assert isinstance(detail, dict)
        assert detail["command"] == command
        errors.append(detail["error"])
    assert errors == ["InvalidCredentials", "NoPassword", "NoUser"]


@pytest.mark.parametrize("name", sorted(FAMILIES))
async def test_with_the_password_the_record_names_the_user_and_the_os_user(
    trial: Trial,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
) -> None:
    family = FAMILIES[name]
    await family_setup(trial, family)
    argv = family_argv(trial, family, tmp_path, "--as", family.user, "--password-stdin")
    assert await cli(monkeypatch, argv, PASSWORD + "\n") == 0, capsys.readouterr().err
    assert rows(trial.url, family.changed) == [(1,)]
    records = rows(
        trial.url, "SELECT actor, detail FROM audit_log WHERE action = %s", family.action
    )
    assert len(records) == 1
    actor, detail = records[0]
    assert actor == family.user
    assert_stamped(detail)
    assert refusals(trial.url) == []


@pytest.mark.parametrize(
    ("flag", "user", "role", "argv", "changed"),
    [
        (
            "--by",
            "coord",
            users.Role.SITE_COORDINATOR,
            ("site", "create-study", "--study", "S9", "--name", "Nine"),
            "SELECT count(*) FROM studies WHERE study_id = 'S9'",
        ),
        (
            "--by",
            "mon",
            users.Role.MONITOR,
            ("alerts", "escalation", "--study", "S1", "--after-s", "900"),
            "SELECT count(*) FROM studies WHERE alert_escalation_s IS NOT NULL",
        ),
        (
            "--actor",
            "admin",
            users.Role.ADMIN,
            (
                "consent",
                "document",
                "--study",
                "S1",
                "--title",
                "ICF2",
                "--version",
                "2",
                "--scopes",
                "heart_rate",
                "--effective-at",
                "2024-01-01T00:00:00+00:00",
            ),
            "SELECT count(*) FROM consent_documents WHERE title = 'ICF2'",
        ),
    ],
)
async def test_the_former_free_text_actor_flags_need_the_password(
    trial: Trial,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    flag: str,
    user: str,
    role: users.Role,
    argv: tuple[str, ...],
    changed: str,
) -> None:
    """``--by`` and ``--actor`` name the operator as ``--as`` does: a name alone is refused."""
    sites = () if role is users.Role.ADMIN else ("SITE-A",)
    await add_user(trial.url, user, role, sites=sites)
    text = tmp_path / "icf.txt"
    text.write_text("I agree.", encoding="utf-8")
    extra = ["--text-file", str(text)] if argv[0] == "consent" else []
    full = [*argv, *extra, "--database-url", trial.url, flag, user]
    assert await cli(monkeypatch, full) == 2
    assert rows(trial.url, changed) == [(0,)]
    assert [(a, e) for a, e, _ in refusals(trial.url)] == [(user, " ".join(argv[:2]))]
    assert await cli(monkeypatch, [*full, "--password-stdin"], PASSWORD + "\n") == 0
    assert rows(trial.url, changed) == [(1,)]


async def test_consent_withdraw_without_authentication_is_refused(
    trial: Trial, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A withdrawal deletes data under the delete policy: naming a user is not enough."""
    await add_user(trial.url, "coord", users.Role.SITE_COORDINATOR, sites=("SITE-A",))
    execute(trial.url, "UPDATE studies SET withdrawal_policy = 'delete'")
    withdraw = [
        "consent", "withdraw", "--database-url", trial.url, "--as", "coord",
        "--participant", "P1", "--initiated-by", "site", "--reason", "moved",
    ]  # fmt: skip
    assert await cli(monkeypatch, withdraw) == 2
    assert "no password for coord" in capsys.readouterr().err
    assert await cli(monkeypatch, [*withdraw, "--password-stdin"], "guess\n") == 2
    assert "authentication failed for 'coord'" in capsys.readouterr().err
    assert rows(trial.url, "SELECT count(*) FROM consents WHERE action = 'withdraw'") == [(0,)]
    assert [(a, e) for a, e, _ in refusals(trial.url)] == [
        ("coord", "consent withdraw"),
        ("coord", "consent withdraw"),
    ]


async def test_a_role_or_site_the_user_lacks_is_refused(
    trial: Trial, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = ["--database-url", trial.url]
    await add_user(trial.url, "mon", users.Role.MONITOR, sites=("SITE-A",))
    async with db.connection(trial.url, autocommit=True) as conn:
        await registry.create_site(conn, "SITE-B", "S1", "Site B")
    await add_user(trial.url, "coord-b", users.Role.SITE_COORDINATOR, sites=("SITE-B",))
    create = ["site", "create-study", *url, "--study", "S9", "--name", "n", "--password-stdin"]
    assert await cli(monkeypatch, [*create, "--as", "mon"], PASSWORD + "\n") == 2
    assert capsys.readouterr().err.strip() == (
        "error: mon (monitor) may not run `site create-study`: it needs admin, site_coordinator"
    )
    code = ["site", "enroll-code", *url, "--participant", "P1", "--no-qr", "--password-stdin"]
    assert await cli(monkeypatch, [*code, "--as", "coord-b"], PASSWORD + "\n") == 2
    assert "coord-b does not work for site 'SITE-A'" in capsys.readouterr().err
    assert rows(trial.url, "SELECT count(*) FROM enrollment_codes") == [(0,)]
    revoke = ["site", "revoke", *url, "--device", "hub-1", "--reason", "x", "--password-stdin"]
    assert await cli(monkeypatch, [*revoke, "--as", "coord-b"], PASSWORD + "\n") == 2
    assert "coord-b does not work for site 'SITE-A'" in capsys.readouterr().err
    assert rows(trial.url, "SELECT revoked_at FROM devices WHERE device_id = 'hub-1'") == [(None,)]
    assert [(d["error"]) for _, _, d in refusals(trial.url)] == [  # type: ignore[index]
        "NotPermitted",
        "NotPermitted",
        "NotPermitted",
    ]


async def test_unknown_disabled_and_locked_accounts_are_refused(
    trial: Trial, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    await add_user(trial.url, "mon", users.Role.MONITOR, sites=("SITE-A",))
    await add_user(trial.url, "gone", users.Role.MONITOR, sites=("SITE-A",))
    execute(trial.url, "UPDATE users SET disabled_at = now() WHERE username = 'gone'")
    base = ["alerts", "ack", "1", "--database-url", trial.url, "--password-stdin", "--as"]
    assert await cli(monkeypatch, [*base, "ghost"], PASSWORD + "\n") == 2
    assert await cli(monkeypatch, [*base, "gone"], PASSWORD + "\n") == 2
    for _ in range(users.MAX_FAILED_LOGINS):
        assert await cli(monkeypatch, [*base, "mon"], "wrong\n") == 2
    capsys.readouterr()
    assert await cli(monkeypatch, [*base, "mon"], PASSWORD + "\n") == 2
    assert "is locked until" in capsys.readouterr().err
    kinds = [d["error"] for _, _, d in refusals(trial.url)]  # type: ignore[index]
    assert kinds == [
        "InvalidCredentials",
        "AccountDisabled",
        *["InvalidCredentials"] * users.MAX_FAILED_LOGINS,
        "AccountLocked",
    ]
    assert rows(trial.url, "SELECT count(*) FROM audit_log WHERE action = 'user.locked'") == [(1,)]


async def test_the_password_file_must_be_the_invoking_users_alone(
    trial: Trial, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await add_user(trial.url, "coord", users.Role.SITE_COORDINATOR, sites=("SITE-A",))
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n", encoding="utf-8")
    env = {"TRIALSTREAM_DATABASE_URL": trial.url, operator.PASSWORD_FILE_ENV: str(secret)}
    args = ("site", "add-participant", "--participant", "P7", "--site", "SITE-A", "--as", "coord")

    secret.chmod(0o644)
    result = await asyncio.to_thread(trialstream, *args, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().endswith(
        f"has mode 0644: others may read or change it; chmod 600 {secret}"
    )
    if os.geteuid() == 0:
        secret.chmod(0o600)
        os.chown(secret, 65534, 65534)
        result = await asyncio.to_thread(trialstream, *args, env=env)
        assert result.returncode == 2
        assert "belongs to another user (uid 65534)" in result.stderr
        os.chown(secret, 0, 0)
    assert rows(trial.url, "SELECT count(*) FROM participants WHERE participant_id = 'P7'") == [
        (0,)
    ]

    secret.chmod(0o600)
    result = await asyncio.to_thread(trialstream, *args, env=env)
    assert result.returncode == 0, result.stderr
    (detail,) = rows(trial.url, "SELECT detail FROM audit_log WHERE action = 'participant.create'")[
        0
    ]
    assert_stamped(detail)
    assert [d["error"] for _, _, d in refusals(trial.url)] == (  # type: ignore[index]
        ["PasswordFile", "PasswordFile"] if os.geteuid() == 0 else ["PasswordFile"]
    )


async def test_a_terminal_is_asked_for_the_password(
    trial: Trial, monkeypatch: pytest.MonkeyPatch
) -> None:
    await add_user(trial.url, "mon", users.Role.MONITOR, sites=("SITE-A",))

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    asked: list[str] = []

    def getpass(prompt: str) -> str:
        asked.append(prompt)
        return PASSWORD

    monkeypatch.setattr(sys, "stdin", Terminal())
    monkeypatch.setattr("getpass.getpass", getpass)
    argv = ["alerts", "escalation", "--database-url", trial.url, "--study", "S1", "--never"]
    assert await asyncio.to_thread(main, [*argv, "--as", "mon"]) == 0
    assert asked == ["password for mon: "]


def test_the_first_admin_needs_no_operator_and_only_the_first(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def admin(*args: str, stdin: str) -> int:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        return main(["admin", "create-user", "--database-url", database_url, *args])

    new = ["--new-password-stdin", "--role"]
    assert admin("--username", "mona", *new, "monitor", stdin=PASSWORD + "\n") == 2
    assert "only the first admin account" in capsys.readouterr().err
    assert admin("--username", "root", *new, "admin", stdin=PASSWORD + "\n") == 0
    assert "user root created: admin (the first admin)" in capsys.readouterr().out
    assert admin("--username", "root2", *new, "admin", stdin=PASSWORD + "\n") == 2
    assert "needs --as USER: your user account (an admin account exists)" in (
        capsys.readouterr().err
    )
    # The first admin makes the next accounts: their own password, then the new account's.
    two_lines = f"{PASSWORD}\nanother long password\n"
    argv = ["--as", "root", "--password-stdin", "--username", "mona", *new, "monitor"]
    assert admin(*argv, stdin=two_lines) == 0
    created = rows(
        database_url,
        "SELECT actor, entity_id, detail FROM audit_log WHERE action = 'user.create'"
        " ORDER BY audit_id",
    )
    assert [(a, e) for a, e, _ in created] == [(f"cli:{OS_USER}", "root"), ("root", "mona")]
    first, second = created[0][2], created[1][2]
    assert_stamped(first)
    assert_stamped(second)
    assert isinstance(first, dict)
    assert first["bootstrap"] is True
    assert isinstance(second, dict)
    assert "bootstrap" not in second
    assert [(a, e) for a, e, _ in refusals(database_url)] == [
        (f"cli:{OS_USER}", "admin create-user"),
        (f"cli:{OS_USER}", "admin create-user"),
    ]


def test_the_cli_requires_the_roles_the_api_requires() -> None:
    from gateway.web.api import ENDPOINTS

    api = {e.operation_id: e.roles for e in ENDPOINTS}
    same_act = {
        "site add-participant": "create_participant",
        "site enroll-code": "create_enrollment_code",
        "admin create-user": "create_user",
        "alerts ack": "acknowledge_alert",
        "alerts resolve": "resolve_alert",
        "consent sign": "sign_consent",
        "consent withdraw": "withdraw_consent",
        "export fhir": "submit_export",
        "adherence show": "get_adherence",
        "review sign": "sign_off_review",
        "review list": "list_reviews",
        "review lock": "lock_period",
        "review unlock": "unlock_period",
        "review locks": "list_locks",
        "review late-data": "set_late_data_policy",
    }
    for command, operation in same_act.items():
        assert operator.ROLES[command] == api[operation], command


def test_audited_commands_all_name_their_operator() -> None:
    """Every command in the table has --as, and its help says how the password comes."""
    for command in operator.ROLES:
        result = trialstream(*command.split(), "--help")
        assert result.returncode == 0, result.stderr
        assert "--as USER" in result.stdout
        assert "--password-stdin" in result.stdout


def test_stamp_is_only_added_while_a_command_runs(database_url: str) -> None:
    from storage import audit

    async def append(actor: str) -> None:
        async with db.connection(database_url, autocommit=True) as conn:
            await audit.append(conn, actor=actor, action="t", entity="t", entity_id="t")

    op = operator.Operator(None, "alice", "box")
    with operator.stamped(op):
        asyncio.run(append("inside"))
    asyncio.run(append("outside"))
    got = rows(database_url, "SELECT actor, detail FROM audit_log ORDER BY audit_id")
    stamp = {"via": "cli", "os_user": "alice", "os_uid": os.getuid(), "host": "box"}
    assert got == [("inside", {**stamp, "bootstrap": True}), ("outside", {})]
