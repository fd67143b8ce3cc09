"""Signed checkpoints of the audit chain, kept outside the database: a database owner who
rewrites history and recomputes the whole chain passes the chain check, but not the
checkpoints; forged or removed checkpoints are reported; no checkpoints is a warning."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

import psycopg
import pytest

from gateway.cli import main
from ingest import keys
from storage import audit, audit_checkpoints, db

# What a database owner can do: lift the append-only trigger and recompute every row's
# prev_hash and hash in SQL, exactly as storage.audit.canonical and chain_hash do.
REHASH_WHOLE_CHAIN = r"""
DO $$
DECLARE
    r record;
    prev bytea := decode(repeat('00', 32), 'hex');
    h bytea;
BEGIN
    FOR r IN SELECT * FROM audit_log ORDER BY audit_id LOOP
        h := sha256(prev || convert_to(
            '[1,' || (extract(epoch FROM r.at) * 1000000)::bigint::text
            || ',' || to_json(r.actor)::text || ',' || to_json(r.action)::text
            || ',' || to_json(r.entity)::text || ',' || to_json(r.entity_id)::text
            || ',' || to_json(r.detail::text)::text
            || ',' || coalesce(to_json(r.reason)::text, 'null') || ']', 'UTF8'));
        UPDATE audit_log SET prev_hash = prev, hash = h WHERE audit_id = r.audit_id;
        prev := h;
    END LOOP;
END
$$
"""


def superuser(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for s in statements:
            conn.execute(s.encode())


def append_n(url: str, n: int, tag: str) -> list[int]:
    async def go() -> list[int]:
        async with db.connection(url, autocommit=True) as conn:
            return [
                await audit.append(
                    conn,
                    actor=f"user-{tag}",
                    action="test.event",
                    entity="participant",
                    entity_id="P1",
                    detail={"participant_id": "P1", "i": i, "tag": tag},
                    reason=None if i % 2 else f"reason {i}",
                )
                for i in range(n)
            ]

    return asyncio.run(go())


def chain_only_verify(url: str) -> audit.VerifyReport:
    """The chain check alone: what `audit verify` did before checkpoints."""

    async def go() -> audit.VerifyReport:
        async with db.connection(url, autocommit=True) as conn:
            return await audit.verify(conn)

    return asyncio.run(go())


@pytest.fixture
def files(tmp_path: Path) -> list[str]:
    """Flags putting the checkpoint key and file in a directory of the test's own."""
    return [
        "--key",
        str(tmp_path / "keys" / "audit-checkpoint.key"),
        "--checkpoints",
        str(tmp_path / "audit" / "checkpoints.jsonl"),
    ]


def verify(url: str, files: list[str], *extra: str) -> int:
    return main(["audit", "verify", "--database-url", url, *files, *extra])


def checkpoint(url: str, files: list[str]) -> int:
    return main(["audit", "checkpoint", "--database-url", url, *files])


def test_a_rewritten_and_rehashed_history_is_found_by_the_checkpoints(
    database_url: str, files: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    first = append_n(database_url, 5, "a")
    assert checkpoint(database_url, files) == 0
    second = append_n(database_url, 3, "b")
    assert checkpoint(database_url, files) == 0
    assert verify(database_url, files) == 0
    capsys.readouterr()

    superuser(
        database_url,
        "ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only",
        f"UPDATE audit_log SET reason = 'nothing happened' WHERE audit_id = {first[1]}",
        REHASH_WHOLE_CHAIN,
        "ALTER TABLE audit_log ENABLE TRIGGER audit_log_append_only",
    )
    # The rewrite is complete: the chain alone holds, as it did for `audit verify` before.
    assert chain_only_verify(database_url).ok

    assert verify(database_url, files) == 1
    err = capsys.readouterr().err
    assert f"checkpoint #1 ({files[3]} line 1, signed " in err
    assert f"audit row {first[4]} has hash " in err
    assert f"the history up to row {first[4]} was rewritten and rehashed" in err
    assert f"checkpoint #2 ({files[3]} line 2" in err
    assert f"audit row {second[2]} has hash " in err
    # Signing the rewritten head would vouch for it: checkpoint refuses and writes nothing.
    assert checkpoint(database_url, files) == 1
    assert "refused: the audit trail does not verify" in capsys.readouterr().err
    assert len(Path(files[3]).read_text().splitlines()) == 2


def test_rows_cut_off_the_end_are_found_by_the_checkpoint(
    database_url: str, files: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    ids = append_n(database_url, 5, "a")
    assert checkpoint(database_url, files) == 0
    superuser(
        database_url,
        "ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only",
        f"DELETE FROM audit_log WHERE audit_id >= {ids[3]}",
        "ALTER TABLE audit_log ENABLE TRIGGER audit_log_append_only",
    )
    # Removing the newest rows leaves a shorter chain that is still consistent.
    assert chain_only_verify(database_url).ok
    assert verify(database_url, files) == 1
    err = capsys.readouterr().err
    assert f"checkpoint #1 ({files[3]} line 1" in err
    assert f"audit row {ids[4]} is gone from the database" in err


def test_a_forged_altered_or_removed_checkpoint_is_reported(
    database_url: str, files: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for tag in "abc":
        append_n(database_url, 2, tag)
        assert checkpoint(database_url, files) == 0
    assert verify(database_url, files) == 0
    path = Path(files[3])
    good = path.read_text().splitlines()

    # A line whose head was changed after signing: the signature no longer verifies.
    altered = json.loads(good[1])
    altered["hash"] = "00" * 32
    path.write_text("\n".join([good[0], json.dumps(altered), good[2]]) + "\n")
    capsys.readouterr()
    assert verify(database_url, files) == 1
    err = capsys.readouterr().err
    assert f"broken: {path} line 2: checkpoint #2: the signature does not verify" in err

    # A checkpoint signed by another key (one the forger holds) is not taken either.
    other = keys.generate_private_key()
    forged = audit_checkpoints.append(
        tmp_path / "forged.jsonl",
        other,
        audit.ChainHead(1, bytes(32), 1),
    )
    line = json.loads(forged.to_line())
    line["seq"] = 2
    path.write_text("\n".join([good[0], json.dumps(line), good[2]]) + "\n")
    assert verify(database_url, files) == 1
    err = capsys.readouterr().err
    assert f"broken: {path} line 2: checkpoint #2 names key " in err

    # A removed line: the next one is out of sequence.
    path.write_text("\n".join([good[0], good[2]]) + "\n")
    assert verify(database_url, files) == 1
    err = capsys.readouterr().err
    assert "line 2: checkpoint #3 is on line 2: lines were removed" in err

    # Garbage is named by line, not a traceback.
    path.write_text("\n".join([*good, "{not json"]) + "\n")
    assert verify(database_url, files) == 1
    assert f"broken: {path} line 4: not a checkpoint" in capsys.readouterr().err

    path.write_text("\n".join(good) + "\n")
    assert verify(database_url, files) == 0


def test_checkpoints_and_further_appends_verify(
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data_dir = tmp_path / "data"
    monkeypatch.setenv("TRIALSTREAM_DATA_DIR", str(data_dir))
    key_path = data_dir / "keys" / "audit-checkpoint.key"
    cp_path = data_dir / "audit" / "checkpoints.jsonl"

    # The first run creates the key, 0600 from the start, with its public half beside it.
    assert main(["audit", "checkpoint", "--database-url", database_url]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "nothing to checkpoint: the audit trail is empty"
    assert f"created the audit checkpoint key {key_path}" in err
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert audit_checkpoints.public_key_path(key_path).exists()
    assert not cp_path.exists()

    append_n(database_url, 4, "a")
    assert main(["audit", "checkpoint", "--database-url", database_url]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("checkpoint #1: row ")
    assert "created" not in err

    async def concurrent() -> None:
        await asyncio.gather(*(asyncio.to_thread(append_n, database_url, 5, t) for t in "bcd"))

    asyncio.run(concurrent())
    assert main(["audit", "checkpoint", "--database-url", database_url]) == 0
    assert capsys.readouterr().out.startswith("checkpoint #2: row ")
    append_n(database_url, 2, "e")

    assert main(["audit", "verify", "--database-url", database_url]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[0].startswith("ok: 21 rows, head ")
    assert lines[1].startswith("ok: 2 checkpoints hold; the latest, #2 of ")
    assert lines[1].endswith("2 rows after it rest on the hash chain alone")

    # An auditor holding only the public key checks the same file.
    pub = tmp_path / "auditor.pub"
    pub.write_bytes(audit_checkpoints.public_key_path(key_path).read_bytes())
    key_path.rename(tmp_path / "elsewhere.key")
    assert main(["audit", "verify", "--database-url", database_url, "--public-key", str(pub)]) == 0
    assert "ok: 2 checkpoints hold" in capsys.readouterr().out


def test_no_checkpoints_is_a_warning_not_a_silent_ok(
    database_url: str, files: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    append_n(database_url, 3, "a")
    assert verify(database_url, files) == 0
    out, err = capsys.readouterr()
    assert out.startswith("ok: 3 rows, head ")
    assert f"warning: no checkpoints ({files[3]} is absent)" in err
    assert "a database owner could have rewritten and rehashed it" in err
    assert verify(database_url, files, "--require-checkpoints") == 3


def test_checkpoints_without_a_key_to_check_them_are_an_error(
    database_url: str, files: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    append_n(database_url, 2, "a")
    assert checkpoint(database_url, files) == 0
    key = Path(files[1])
    key.unlink()
    audit_checkpoints.public_key_path(key).unlink()
    capsys.readouterr()
    assert verify(database_url, files) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot check the audit checkpoints in ")
    assert "no key to verify them with" in err


def test_an_unprotected_signing_key_is_refused(
    database_url: str, files: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    append_n(database_url, 1, "a")
    assert checkpoint(database_url, files) == 0
    Path(files[1]).chmod(0o644)
    capsys.readouterr()
    assert checkpoint(database_url, files) == 2
    assert "must be 0600" in capsys.readouterr().err
