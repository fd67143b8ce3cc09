"""What the writer sends: binary arrays (storage.arrays), the readings' COPY rows and the
deltas folded from a batch (storage.deltas), read back from a real server."""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime

import pytest
from psycopg_pool import AsyncConnectionPool

from ingest.model import AcceptedEnvelope, Batch, Reading
from storage import db, deltas
from storage.arrays import Byteas, Float8s, Int2s, Int4s, Int8s, Texts, TimestamptzMs
from storage.errors import BatchWriteError
from storage.migrate import StorageMode
from storage.writer import BulkWriter

T0 = 1_795_000_000_000  # inside the pre-created partitions' range


async def _echo(url: str, cast: str, value: object) -> object:
    async with db.connection(url) as conn:
        cur = await conn.execute(f"SELECT %b::{cast}", (value,))
        row = await cur.fetchone()
    assert row is not None
    return row[0]


@pytest.mark.parametrize(
    ("cast", "value", "expected"),
    [
        ("int2[]", Int2s([-32768, 0, 32767, None]), [-32768, 0, 32767, None]),
        ("int4[]", Int4s([-(2**31), 2**31 - 1]), [-(2**31), 2**31 - 1]),
        ("int8[]", Int8s([-(2**63), None, 2**63 - 1]), [-(2**63), None, 2**63 - 1]),
        ("float8[]", Float8s([0.1, -1e308, None, math.inf]), [0.1, -1e308, None, math.inf]),
        ("bytea[]", Byteas([b"\x00\xff", b"", None]), [b"\x00\xff", b"", None]),
        ("text[]", Texts(["P-1", "", "é日本🩺", None]), ["P-1", "", "é日本🩺", None]),
        ("int8[]", Int8s([]), []),
        ("text[]", Texts([None]), [None]),
        (
            "timestamptz[]",
            TimestamptzMs([0, T0 + 123, None]),
            [
                datetime(1970, 1, 1, tzinfo=UTC),
                datetime.fromtimestamp((T0 + 123) / 1000, UTC),
                None,
            ],
        ),
    ],
)
async def test_arrays_read_back_as_built(
    database_url: str, cast: str, value: object, expected: list[object]
) -> None:
    assert await _echo(database_url, cast, value) == expected


@pytest.mark.parametrize(
    "build",
    [
        lambda: Int2s([32768]),
        lambda: Int4s([2**31]),
        lambda: Int8s([2**63]),
        lambda: Int8s([1, None, 2**64]),
        lambda: Int4s(["7"]),
        lambda: Float8s(["x"]),
    ],
)
def test_a_value_outside_its_type_is_refused_before_sending(build: object) -> None:
    with pytest.raises(ValueError, match=r"\[\] element refused"):
        build()  # type: ignore[operator]


def test_text_utf8_cannot_carry_is_refused_before_sending() -> None:
    with pytest.raises(UnicodeEncodeError):
        Texts(["P-\udc80"])


def _envelope(dev: str, seq: int, readings: tuple[Reading, ...], consent: int | None = None):
    return AcceptedEnvelope(
        dev=dev,
        seq=seq,
        participant_id=f"P-{dev}",
        sent_ms=T0,
        envelope_sha256=hashlib.sha256(f"{dev}/{seq}".encode()).digest(),
        reading_count=len(readings),
        readings=readings,
        consent_ids=(consent,) * len(readings),
    )


async def test_copy_rows_store_every_field_as_given(
    pool: AsyncConnectionPool, database_url: str, storage_mode: StorageMode
) -> None:
    readings = (
        Reading(
            T0 + 1,
            "blood_pressure_systolic",
            121.5,
            "mmHg",
            "cuff-é",
            ("cuff_loose", "irregular_pulse"),
            3,
        ),
        Reading(T0 + 2, "heart_rate", -0.0, "/min", "strap 日本", (), None, None),
        Reading(T0 + 3, "heart_rate", 1e300, "/min", "strap 日本"),
    )
    await BulkWriter(pool, storage_mode).write(
        Batch((_envelope("W", 9, readings, consent=None),), (), T0 + 5_000)
    )
    async with db.connection(database_url) as conn:
        cur = await conn.execute(
            "SELECT (extract(epoch FROM time) * 1000)::int8, participant_id, metric, value, unit,"
            " device_id, seq, sensor, received_at, consent_id, flags, device_user"
            " FROM readings ORDER BY time"
        )
        rows = await cur.fetchall()
    received = datetime.fromtimestamp((T0 + 5_000) / 1000, UTC)
    flags = ["cuff_loose", "irregular_pulse"]
    assert rows == [
        (T0 + 1, "P-W", "blood_pressure_systolic", 121.5, "mmHg", "W", 9, "cuff-é", received,
         None, flags, 3),
        (T0 + 2, "P-W", "heart_rate", 0.0, "/min", "W", 9, "strap 日本", received,
         None, None, None),
        (T0 + 3, "P-W", "heart_rate", 1e300, "/min", "W", 9, "strap 日本", received,
         None, None, None),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "bad",
    [
        Reading(T0, "heart_rate", 70.0, "/min", "s", (), 40_000),  # user past int2
        Reading(T0, "heart_rate", 70.0, "/min", "s\udc80"),  # not UTF-8
    ],
)
async def test_a_row_that_cannot_be_encoded_refuses_the_batch_naming_its_envelope(
    pool: AsyncConnectionPool, database_url: str, storage_mode: StorageMode, bad: Reading
) -> None:
    good = (Reading(T0, "heart_rate", 70.0, "/min", "s"),)
    writer = BulkWriter(pool, storage_mode)
    with pytest.raises(BatchWriteError) as info:
        await writer.write(
            Batch(
                (_envelope("A", 1, good), _envelope("B", 2, (*good, bad)), _envelope("C", 3, good)),
                (),
                T0,
            )
        )
    assert info.value.envelope == ("B", 2)
    async with db.connection(database_url) as conn:
        cur = await conn.execute(
            "SELECT (SELECT count(*) FROM envelopes) + (SELECT count(*) FROM readings)"
        )
        assert await cur.fetchone() == (0,)


def test_deltas_fold_counts_doubt_as_the_rollups_and_adherence_define_it() -> None:
    hour, slot = 3_600_000, 15 * 60_000
    t = (T0 // hour) * hour
    readings = [
        Reading(t, "heart_rate", 60.0, "/min", "s"),
        Reading(t + 60_000, "heart_rate", 80.0, "/min", "s"),
        Reading(t + 61_000, "heart_rate", 200.0, "/min", "s", ("questionable_measurement",)),
        Reading(t + 120_000, "heart_rate", 10.0, "/min", "s", ("invalid_measurement",)),
        Reading(t + slot, "heart_rate", 70.0, "/min", "s", ("site_armpit",)),
    ]
    by_hour, by_slot = deltas.fold([("P1", readings)], hours=True)
    assert by_hour == {("P1", "heart_rate", t // hour): [3, 210.0, 60.0, 80.0]}
    assert by_slot == {
        ("P1", "heart_rate", t // slot): [4, 1, 0b11],
        ("P1", "heart_rate", t // slot + 1): [1, 0, 0b1],
    }
    assert deltas.fold([("P1", readings)], hours=False)[0] == {}
