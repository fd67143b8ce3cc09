"""Source data verification through the real gateway and the real command: every accepted
envelope's signed original is kept, and `audit verify-readings` finds a stored reading that
was altered, copied or left without its original; retention and withdrawal remove originals."""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path

import pytest

from gateway.commands.operator import PASSWORD_FILE_ENV
from ingest.model import Payload, Reading
from storage import db
from storage.users import Role
from tests.alerts.test_engine import rows
from tests.fixtures.signers import add_operators, password_file
from tests.fixtures.trial import Trial
from tests.fixtures.uplink import Uplink
from tests.test_cli import trialstream

T = int(time.time() * 1000) - 3 * 3_600_000


def beats(start: int, n: int, *, flags: tuple[str, ...] = ()) -> tuple[Reading, ...]:
    return tuple(
        Reading(start + i * 1000, "heart_rate", 60.0 + i, "/min", "strap", flags) for i in range(n)
    )


def verify(trial: Trial, *extra: str) -> tuple[int, dict[str, object]]:
    done = trialstream(
        "audit", "verify-readings", "--database-url", trial.url, "--participant", "P1",
        "--json", *extra,
    )  # fmt: skip
    return done.returncode, json.loads(done.stdout)


@pytest.fixture
async def stored(trial: Trial, uplink: Uplink) -> None:
    await uplink.send(Payload("hub-1", 1, T + 60_000, beats(T, 5)))
    await uplink.send(
        Payload("hub-1", 2, T + 120_000, beats(T + 60_000, 3, flags=("poor_signal",))),
    )


async def test_every_stored_reading_verifies_against_its_signed_original(
    trial: Trial, stored: None
) -> None:
    code, report = verify(trial)
    assert (code, report["readings"], report["verified"], report["unverified"]) == (0, 8, 8, [])
    sizes = await rows(
        trial.url,
        "SELECT seq, codec, size > 0, length(original) FROM envelope_originals ORDER BY seq",
    )
    assert [r[:3] for r in sizes] == [(1, "zlib", True), (2, "zlib", True)]


async def test_an_altered_value_is_found(trial: Trial, stored: None) -> None:
    async with db.connection(trial.url, autocommit=True) as conn:
        await conn.execute(
            "UPDATE readings SET value = 99 WHERE seq = 1 AND time = to_timestamp(%s / 1000.0)",
            (T + 2000,),
        )
    code, report = verify(trial)
    assert code == 1
    assert report["verified"] == 7
    unverified = report["unverified"]
    assert isinstance(unverified, list)
    (bad,) = unverified
    assert (bad["metric"], bad["value"], bad["seq"], bad["finding"]) == (
        "heart_rate",
        99.0,
        1,
        "not_signed",
    )


async def test_a_removed_flag_and_a_copied_reading_are_found(trial: Trial, stored: None) -> None:
    async with db.connection(trial.url, autocommit=True) as conn:
        # A doubted reading made to look clean, and a reading duplicated in the table.
        await conn.execute("UPDATE readings SET flags = NULL WHERE seq = 2 AND value = 60")
        await conn.execute(
            "INSERT INTO readings SELECT * FROM readings WHERE seq = 1 AND value = 63"
        )
    code, report = verify(trial)
    assert code == 1
    assert report["findings"] == {"verified": 7, "not_signed": 2}


async def test_an_altered_original_or_a_missing_one_is_found(trial: Trial, stored: None) -> None:
    async with db.connection(trial.url, autocommit=True) as conn:
        await conn.execute(
            "UPDATE envelope_originals SET original = (SELECT original FROM envelope_originals"
            " WHERE seq = 1), size = (SELECT size FROM envelope_originals WHERE seq = 1)"
            " WHERE seq = 2"
        )
    code, report = verify(trial)
    assert (code, report["findings"]) == (1, {"verified": 5, "original_altered": 3})
    async with db.connection(trial.url, autocommit=True) as conn:
        await conn.execute("DELETE FROM envelope_originals WHERE seq = 1")
    _, report = verify(trial, "--from", "2000-01-01T00:00:00+00:00")
    assert report["findings"] == {"no_original": 5, "original_altered": 3}


async def test_a_time_range_checks_only_its_readings(trial: Trial, stored: None) -> None:
    start = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime((T + 60_000) / 1000))
    code, report = verify(trial, "--from", start)
    assert (code, report["readings"]) == (0, 3)


async def test_retention_prunes_only_a_studys_old_originals(
    trial: Trial, stored: None, tmp_path: Path
) -> None:
    await add_operators(trial.url, ("admin", Role.ADMIN, ()))
    env = {PASSWORD_FILE_ENV: str(password_file(tmp_path))}
    kept = trialstream("audit", "prune-originals", "--database-url", trial.url, env=env)
    assert kept.returncode == 0, kept.stderr
    assert "no originals past retention" in kept.stdout
    setting = trialstream(
        "audit", "originals-retention", "--database-url", trial.url, "--study", "S1",
        "--days", "1", "--as", "admin", env=env,
    )  # fmt: skip
    assert setting.returncode == 0, setting.stderr
    async with db.connection(trial.url, autocommit=True) as conn:
        await conn.execute(
            "UPDATE envelope_originals SET received_at = now() - interval '2 days' WHERE seq = 1"
        )
    pruned = trialstream("audit", "prune-originals", "--database-url", trial.url, env=env)
    assert "study S1: 1 originals past retention deleted" in pruned.stdout
    assert await rows(trial.url, "SELECT seq FROM envelope_originals") == [(2,)]
    assert await rows(
        trial.url, "SELECT action FROM audit_log WHERE entity = 'study' ORDER BY audit_id"
    ) == [("study.originals_retention_set",), ("study.originals_pruned",)]
    unknown = trialstream(
        "audit", "originals-retention", "--database-url", trial.url, "--study", "NOPE",
        "--keep", "--as", "admin", env=env,
    )  # fmt: skip
    assert unknown.returncode != 0
    assert "no study 'NOPE'" in unknown.stderr


def test_an_original_compresses_to_the_same_size_in_a_small_window_and_reads_back() -> None:
    from ingest import keys
    from ingest.envelope import seal
    from ingest.model import Payload, Reading
    from storage import originals

    readings = tuple(
        Reading(1_800_000_000_000 + i * 1000, "heart_rate", 70.0 + i, "/min", "hr-strap-1")
        for i in range(1000)
    )
    for n in (10, 1000):
        data = seal(
            Payload("hub-1", 1, 1_800_000_001_000, readings[:n]), keys.generate_private_key()
        )
        small = originals.compress(data)
        assert small[0] & 0xF0 == 0x40  # CINFO 4: a 2**(4 + 8) = 4 KiB window
        assert originals.decompress(originals.CODEC, small, len(data)) == data
        # Within 5 % of the default window's output, for one envelope and the largest.
        assert len(small) <= 1.05 * len(zlib.compress(data, 6))
