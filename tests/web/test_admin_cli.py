"""`trialstream admin create-user / disable-user / list-users`."""

from __future__ import annotations

import io
import sys

import psycopg
import pytest

from gateway.cli import main


def admin(monkeypatch: pytest.MonkeyPatch, url: str, *args: str, stdin: str = "") -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return main(["admin", *args, "--database-url", url])


def test_create_user_reads_the_password_from_stdin_and_audits(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO studies (study_id, name) VALUES ('S1', 'Study')")
        conn.execute("INSERT INTO sites (site_id, study_id, name) VALUES ('SITE-A', 'S1', 'A')")
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
        "--password-stdin",
        "--by",
        "ops",
        stdin="a long password\n",
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
    code = admin(
        monkeypatch, database_url, "disable-user", "--username", "mona", "--reason", "left"
    )
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
    code = admin(
        monkeypatch,
        database_url,
        "create-user",
        "--username",
        "x",
        *args,
        "--password-stdin",
        stdin=stdin,
    )
    assert code != 0
    assert message in capsys.readouterr().err
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone() == (0,)
