"""`trialstream consent ...`: the same functions through the command line."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest

from gateway.cli import main
from storage import db, registry, users
from tests.consent.conftest import CHEAP_HASHER, PASSWORD


async def setup(url: str) -> None:
    async with db.connection(url, autocommit=True) as conn:
        await registry.create_study(conn, "S1", "Study")
        await registry.create_site(conn, "SITE-A", "S1", "Site A")
        await registry.create_participant(conn, "P1", "S1", "SITE-A")
        for name, role, pid, sites in (
            ("admin", users.Role.ADMIN, None, ()),
            ("coord", users.Role.SITE_COORDINATOR, None, ("SITE-A",)),
            ("user-P1", users.Role.PARTICIPANT, "P1", ()),
        ):
            await users.create_user(
                conn,
                actor="setup",
                username=name,
                display_name=name,
                role=role,
                password=PASSWORD,
                participant_id=pid,
                sites=sites,
                hasher=CHEAP_HASHER,
            )


def test_document_sign_pending_withdraw_history(
    database_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asyncio.run(setup(database_url))
    url = ["--database-url", database_url]
    text = tmp_path / "icf.txt"
    text.write_text("I agree.", encoding="utf-8")
    assert (
        main(
            [
                "consent", "document", *url, "--actor", "admin", "--study", "S1",
                "--title", "ICF", "--version", "1.0", "--text-file", str(text),
                "--scopes", "heart_rate,spo2", "--optional-scopes", "spo2",
                "--effective-at", "2024-01-01T00:00:00+00:00",
            ]
        )
        == 0
    )  # fmt: skip
    out = capsys.readouterr().out
    assert out.startswith("document ")
    doc_id = out.split()[1].rstrip(":")

    # The argon2 parameters of the stored hash are used to verify: the CLI's default hasher
    # verifies the cheap test hash.
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    sign = [
        "consent", "sign", *url, "--actor", "user-P1", "--participant", "P1",
        "--document-id", doc_id, "--scopes", "heart_rate", "--name", "Pat One",
        "--username", "user-P1", "--password-stdin",
    ]  # fmt: skip
    assert main(sign) == 0
    assert "P1 signed version 1.0" in capsys.readouterr().out

    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert main(sign) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: AlreadySigned:")

    assert main(["consent", "pending", *url, "--actor", "coord"]) == 0
    assert capsys.readouterr().out.strip() == "no re-consents pending"

    withdraw = [
        "consent", "withdraw", *url, "--actor", "coord", "--participant", "P1",
        "--initiated-by", "site", "--reason", "moved", "--password-stdin",
    ]  # fmt: skip
    # A withdrawal is signed with the actor's own password.
    monkeypatch.setattr("sys.stdin", io.StringIO("not the password\n"))
    assert main(withdraw) == 2
    assert capsys.readouterr().err.startswith("error: ReauthenticationFailed:")
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert main(withdraw) == 0
    assert "withdrawn P1: all consent" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert main(withdraw) == 2
    assert capsys.readouterr().err.startswith("error: NotConsented:")

    assert main(["consent", "history", *url, "--actor", "coord", "--participant", "P1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["consent", "withdraw"]
    assert "signed by 'Pat One'" in lines[0]


def test_unknown_actor_is_one_clear_line(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(setup(database_url))
    code = main(["consent", "pending", "--database-url", database_url, "--actor", "ghost"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error: no user 'ghost' (--actor names a user account)"
    )
