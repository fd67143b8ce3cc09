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
    url = ["--database-url", database_url, "--password-stdin"]
    text = tmp_path / "icf.txt"
    text.write_text("I agree.", encoding="utf-8")

    def as_(user: str, argv: list[str], stdin: str = PASSWORD + "\n") -> int:
        """The command run as ``user``, whose password is the first line of stdin."""
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        return main([*argv, "--as", user])

    assert (
        as_(
            "admin",
            [
                "consent", "document", *url, "--study", "S1",
                "--title", "ICF", "--version", "1.0", "--text-file", str(text),
                "--scopes", "heart_rate,spo2", "--optional-scopes", "spo2",
                "--effective-at", "2024-01-01T00:00:00+00:00",
            ],
        )
        == 0
    )  # fmt: skip
    out = capsys.readouterr().out
    assert out.startswith("document ")
    doc_id = out.split()[1].rstrip(":")

    # The participant runs it: their password authenticates them and signs. The argon2
    # parameters of the stored hash are used to verify: the CLI's default hasher verifies the
    # cheap test hash.
    sign = [
        "consent", "sign", *url, "--participant", "P1",
        "--document-id", doc_id, "--scopes", "heart_rate", "--name", "Pat One",
        "--username", "user-P1",
    ]  # fmt: skip
    assert as_("user-P1", sign) == 0
    assert "P1 signed version 1.0" in capsys.readouterr().out

    # Staff in clinic: their own password first, then the participant's.
    two = f"{PASSWORD}\n{PASSWORD}\n"
    assert as_("coord", [*sign, "--signer-password-stdin"], two) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: AlreadySigned:")

    assert as_("coord", ["consent", "pending", *url]) == 0
    assert capsys.readouterr().out.strip() == "no re-consents pending"

    withdraw = [
        "consent", "withdraw", *url, "--participant", "P1",
        "--initiated-by", "site", "--reason", "moved",
    ]  # fmt: skip
    # A withdrawal is signed with the password that authenticates the actor.
    assert as_("coord", withdraw, "not the password\n") == 2
    assert capsys.readouterr().err.startswith("error: authentication failed for 'coord'")
    assert as_("coord", withdraw) == 0
    assert "withdrawn P1: all consent" in capsys.readouterr().out
    assert as_("coord", withdraw) == 2
    assert capsys.readouterr().err.startswith("error: NotConsented:")

    assert as_("coord", ["consent", "history", *url, "--participant", "P1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["consent", "withdraw"]
    assert "signed by 'Pat One'" in lines[0]


def test_unknown_actor_is_one_clear_line(
    database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    asyncio.run(setup(database_url))
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    argv = ["consent", "pending", "--database-url", database_url, "--as", "ghost"]
    code = main([*argv, "--password-stdin"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error: authentication failed for 'ghost': invalid user name or password"
    )
