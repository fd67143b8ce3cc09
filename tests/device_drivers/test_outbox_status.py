"""The outbox keeps what the device said about each reading (protocol v2), upgrades a file
written before that in place, and seals fewer readings when flags make a batch too large."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from device_drivers.outbox import Outbox
from device_drivers.outbox_file import SCHEMA_VERSION
from ingest.envelope import MAX_FLAGS_PER_READING, MAX_ITEMS_PER_ENVELOPE, open_envelope
from ingest.model import Gap, Reading, SensorReport

DEV = "hub-0001"
T0 = 1_700_000_000_000


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def test_flags_user_and_paired_user_survive_the_outbox(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    cuff = Reading(T0, "systolic_bp", 131.0, "mm[Hg]", "cuff", ("body_movement", "cuff_loose"), 2)
    meter = Reading(T0, "glucose", 98.0, "mg/dL", "meter", (), None, "g:3:1700000000000")
    plain = Reading(T0 + 1, "heart_rate", 70.0, "/min", "strap")
    with Outbox.open(tmp_path / "o.sqlite", DEV) as outbox:
        outbox.add_readings([cuff, plain, meter])
        outbox.add_sensor(SensorReport("cuff", "Acme", paired_user=2))
        (sealed,) = outbox.seal_pending(key, T0 + 10)
    payload = open_envelope(sealed.data).payload
    assert payload.v == 3
    assert payload.readings == (cuff, plain, meter)
    assert payload.sensors == (SensorReport("cuff", "Acme", paired_user=2),)


def test_an_outbox_written_before_reading_status_is_upgraded_in_place(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    """A hub updated with readings still pending keeps them: the file gains the columns."""
    path = tmp_path / "o.sqlite"
    Outbox.open(path, DEV).close()
    db = sqlite3.connect(path)
    for statement in (
        "ALTER TABLE pending_readings DROP COLUMN flags",
        "ALTER TABLE pending_readings DROP COLUMN user",
        "ALTER TABLE pending_readings DROP COLUMN record",
        "ALTER TABLE pending_sensors DROP COLUMN paired_user",
        "ALTER TABLE pending_gaps DROP COLUMN sensor",
        "ALTER TABLE meta DROP COLUMN time_zone",
        "ALTER TABLE meta DROP COLUMN time_zone_since_ms",
        "ALTER TABLE meta DROP COLUMN time_zone_pending",
        "INSERT INTO pending_gaps (from_ms, to_ms, reason) VALUES (1, 2, 'out_of_range')",
        "INSERT INTO pending_readings (t_ms, metric, value, unit, sensor)"
        " VALUES (1700000000000, 'heart_rate', x'4051800000000000', '/min', 'strap')",
        "INSERT INTO pending_sensors (sensor, model) VALUES ('strap', 'HRM-2')",
        "PRAGMA user_version = 1",
    ):
        db.execute(statement)
    db.commit()
    db.close()
    with Outbox.open(path, DEV) as outbox:
        (sealed,) = outbox.seal_pending(key, T0 + 10)
    payload = open_envelope(sealed.data).payload
    assert payload.readings == (Reading(T0, "heart_rate", 70.0, "/min", "strap"),)
    assert payload.sensors == (SensorReport("strap", model="HRM-2"),)
    assert payload.gaps == (Gap(1, 2, "out_of_range"),)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


def test_flags_that_make_a_full_batch_too_large_split_it(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    flags = tuple(sorted(chr(97 + i) * 32 for i in range(MAX_FLAGS_PER_READING)))
    big = [
        Reading(T0 + i, "m" * 64, 1.0, "u" * 32, "s" * 128, flags, 255, "r" * 64)
        for i in range(MAX_ITEMS_PER_ENVELOPE)
    ]
    with Outbox.open(tmp_path / "o.sqlite", DEV) as outbox:
        outbox.add_readings(big)
        sealed = outbox.seal_pending(key, T0 + 10)
        assert outbox.stats().pending_readings == 0
    assert len(sealed) > 1
    assert [s.seq for s in sealed] == list(range(1, len(sealed) + 1))
    opened = [r for s in sealed for r in open_envelope(s.data).payload.readings]
    assert opened == big
