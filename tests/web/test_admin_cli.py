"""`trialstream admin create-user / disable-user / list-users`."""

from __future__ import annotations

import asyncio
import io
import sys

import psycopg
import pytest

from gateway.cli import main
from storage import db, users
from tests.fixtures.signers import CHEAP_HASHER, PASSWORD

# The operator's password, as the first line of standard input.
AS_OPS = ("--as", "ops", "--password-stdin")


def admin(monkeypatch: pytest.MonkeyPatch, url: str, *args: str, stdin: str = "") -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return main(["admin", *args, "--database-url", url])


def add_ops(url: str) -> None:
    """The admin ``ops`` who runs the commands, with ``PASSWORD``."""

    async def go() -> None:
        async with db.connection(url, autocommit=True) as conn:
            await users.create_user(
                conn,
                actor="setup",
                username="ops",
                display_name="Ops",
                role=users.Role.ADMIN,
                password=PASSWORD,
                hasher=CHEAP_HASHER,
            )

    asyncio.run(go())


def test_create_user_reads_the_password_from_stdin_and_audits(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO studies (study_id, name) VALUES ('S1', 'Study')")
        conn.execute("INSERT INTO sites (site_id, study_id, name) VALUES ('SITE-A', 'S1', 'A')")
    add_ops(database_url)
    code = admin(
        monkeypatch,
        database_url,
        "create-user",
        "--username",
        "mona",
        "--role",
        "monitor",
        "--site",
        "SITE-A",
        "--new-password-stdin",
        *AS_OPS,
        stdin=f"{PASSWORD}\na long password\n",
    )
    assert code == 0
    assert "user mona created: monitor at SITE-A" in capsys.readouterr().out
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT role, password_hash LIKE '$argon2id$%%' FROM users WHERE username = 'mona'"
        ).fetchone()
        assert row == ("monitor", True)
        assert conn.execute(
            "SELECT actor FROM audit_log WHERE action = 'user.create' AND entity_id = 'mona'"
        ).fetchall() == [("ops",)]
    assert admin(monkeypatch, database_url, "list-users") == 0
    assert "mona\tmonitor\tSITE-A\tactive" in capsys.readouterr().out
    disable = ("disable-user", "--username", "mona", "--reason", "left")
    code = admin(monkeypatch, database_url, *disable, *AS_OPS, stdin=PASSWORD + "\n")
    assert code == 0
    assert admin(monkeypatch, database_url, "list-users") == 0
    assert "mona\tmonitor\tSITE-A\tdisabled" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["--role", "monitor"], "short\n", "at least 10 characters"),
        (["--role", "participant"], "a long password\n", "needs --participant"),
        (["--role", "admin", "--site", "SITE-A"], "a long password\n", "belongs to no site"),
        (
            ["--role", "monitor", "--site", "NOPE"],
            "a long password\n",
            "unknown participant or site",
        ),
    ],
)
def test_create_user_refuses_bad_accounts(
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    stdin: str,
    message: str,
) -> None:
    add_ops(database_url)
    code = admin(
        monkeypatch,
        database_url,
        "create-user",
        "--username",
        "x",
        *args,
        "--new-password-stdin",
        *AS_OPS,
        stdin=PASSWORD + "\n" + stdin,
    )
    assert code != 0
    assert message in capsys.readouterr().err
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone() == (1,)
