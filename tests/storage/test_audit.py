"""The audit trail: one hash chain under concurrent writers, append-only for the application,
and every alteration a superuser makes found by `audit verify`, which names the row."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime

import psycopg
import pytest
from psycopg import errors as pg_errors

from gateway.cli import main
from storage import audit, db


async def append_n(url: str, n: int, tag: str) -> list[int]:
    async with db.connection(url, autocommit=True) as conn:
        return [
            await audit.append(
                conn,
                actor=f"user-{tag}",
                action="test.event",
                entity="participant",
                entity_id="P1",
                detail={"participant_id": "P1", "i": i, "tag": tag},
            )
            for i in range(n)
        ]


async def test_concurrent_writers_extend_one_valid_chain(database_url: str) -> None:
    batches = await asyncio.gather(*(append_n(database_url, 10, t) for t in "abcd"))
    assert len({i for b in batches for i in b}) == 40
    async with db.connection(database_url, autocommit=True) as conn:
        report = await audit.verify(conn)
        cur = await conn.execute("SELECT hash FROM audit_log ORDER BY audit_id DESC LIMIT 1")
        head = await cur.fetchone()
    assert report.ok
    assert report.rows_checked == 40
    assert head is not None
    assert report.head_hash == bytes(head[0])


async def test_append_joins_the_callers_transaction(database_url: str) -> None:
    async with db.connection(database_url) as conn:
        async with conn.transaction():
            await audit.append(conn, actor="a", action="kept", entity="e", entity_id="1")

        async def failing_change() -> None:
            async with conn.transaction():
                await audit.append(conn, actor="a", action="lost", entity="e", entity_id="2")
                raise RuntimeError("the audited change failed")

        with pytest.raises(RuntimeError):
            await failing_change()
        await audit.append(conn, actor="a", action="after", entity="e", entity_id="3")
        await conn.commit()
        cur = await conn.execute("SELECT action FROM audit_log ORDER BY audit_id")
        assert await cur.fetchall() == [("kept",), ("after",)]
        assert (await audit.verify(conn)).ok


async def test_detail_is_verified_as_stored(database_url: str) -> None:
    detail: dict[str, object] = {
        "participant_id": "P1",
        "big": 1e20,
        "small": 0.1,
        "neg_zero": -0.0,
        "text": 'Zoë \u2603 "quoted"',
        "nested": {"b": [1, 2.5, None, True], "a": {}},
        "when": datetime(2025, 1, 2, 3, 4, 5, 123456, tzinfo=UTC),
        "scopes": frozenset({"spo2", "heart_rate"}),
    }
    async with db.connection(database_url, autocommit=True) as conn:
        await audit.append(
            conn, actor="a", action="x", entity="e", entity_id="1", detail=detail, reason="why"
        )
        assert (await audit.verify(conn)).ok
        rows = await audit.participant_history(conn, "P1")
    assert rows[0].detail["scopes"] == ["heart_rate", "spo2"]
    assert rows[0].reason == "why"


@pytest.mark.parametrize(
    ("fields", "detail"),
    [
        ({"actor": ""}, None),
        ({"entity_id": "a\x00b"}, None),
        ({}, {"v": math.nan}),
        ({}, {"v": math.inf}),
        ({}, {"v": object()}),
        ({}, {"v": "nul \x00 inside"}),
        ({"reason": "nul \x00"}, None),
    ],
)
async def test_bad_input_is_a_typed_error(
    database_url: str, fields: dict[str, str], detail: dict[str, object] | None
) -> None:
    args = {"actor": "a", "action": "x", "entity": "e", "entity_id": "1", **fields}
    async with db.connection(database_url, autocommit=True) as conn:
        with pytest.raises(audit.AuditError):
            await audit.append(conn, detail=detail, **args)
        cur = await conn.execute("SELECT count(*) FROM audit_log")
        assert await cur.fetchone() == (0,)


@pytest.mark.parametrize(
    "statement",
    ["UPDATE audit_log SET actor = 'x'", "DELETE FROM audit_log", "TRUNCATE audit_log"],
)
async def test_changes_are_refused_even_for_the_owner(database_url: str, statement: str) -> None:
    await append_n(database_url, 2, "a")
    async with db.connection(database_url, autocommit=True) as conn:
        with pytest.raises(pg_errors.InsufficientPrivilege, match="append-only"):
            await conn.execute(statement.encode())


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_log SET actor = 'x'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
        "ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only",
        "DROP TRIGGER audit_log_append_only ON audit_log",
        "SET session_replication_role = replica",
        "UPDATE consents SET scopes = '{}'",
    ],
)
async def test_the_application_role_cannot_bypass_it(database_url: str, statement: str) -> None:
    async with db.connection(database_url, autocommit=True) as conn:
        await conn.execute("SET ROLE trialstream_app")
        await audit.append(conn, actor="app", action="x", entity="e", entity_id="1")
        with pytest.raises(pg_errors.InsufficientPrivilege):
            await conn.execute(statement.encode())
        assert (await audit.verify(conn)).ok


def superuser(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for s in statements:
            conn.execute(s.encode())


def test_a_row_altered_by_a_superuser_is_named_by_audit_verify(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = asyncio.run(append_n(database_url, 5, "a"))
    assert main(["audit", "verify", "--database-url", database_url]) == 0
    assert capsys.readouterr().out.startswith("ok: 5 rows, head ")
    superuser(
        database_url,
        "ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only",
        f"UPDATE audit_log SET reason = 'nothing happened' WHERE audit_id = {ids[2]}",
        "ALTER TABLE audit_log ENABLE TRIGGER audit_log_append_only",
    )
    assert main(["audit", "verify", "--database-url", database_url]) == 1
    err = capsys.readouterr().err
    assert f"audit row {ids[2]}: its content does not match its hash" in err
    assert "2 rows before it verified" in err


async def test_a_removed_or_forged_row_breaks_the_link_after_it(database_url: str) -> None:
    ids = await append_n(database_url, 5, "a")
    superuser(
        database_url,
        "ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only",
        f"DELETE FROM audit_log WHERE audit_id = {ids[1]}",
    )
    async with db.connection(database_url, autocommit=True) as conn:
        report = await audit.verify(conn)
    assert report.broken is not None
    assert (report.broken.audit_id, report.broken.problem) == (ids[2], "chain_broken")
    # Rehashing the altered row alone does not help: the next row still points at the old hash.
    superuser(
        database_url,
        f"INSERT INTO audit_log (audit_id, actor, action, entity, entity_id, prev_hash, hash)"
        f" OVERRIDING SYSTEM VALUE SELECT {ids[1]}, 'forger', 'x', 'e', '1', hash,"
        f" sha256(hash) FROM audit_log WHERE audit_id = {ids[0]}",
    )
    async with db.connection(database_url, autocommit=True) as conn:
        report = await audit.verify(conn)
    assert report.broken is not None
    assert report.broken.audit_id == ids[1]
    assert report.broken.problem == "content_changed"


def test_audit_show_prints_a_participants_history(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(append_n(database_url, 2, "a"))
    assert main(["audit", "show", "--participant", "P1", "--database-url", database_url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert "user-a  test.event  participant P1" in lines[0]
    assert "i=1" in lines[1]
    assert main(["audit", "show", "--participant", "P9", "--database-url", database_url]) == 0
    assert capsys.readouterr().out.strip() == "no audit records about P9"
