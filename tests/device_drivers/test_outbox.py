"""The hub's outbox: durable, seq never repeats, receipts delete, bounded, refuses bad files."""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from device_drivers.errors import DeviceDriverError
from device_drivers.outbox import (
    GAP_RESERVE_BYTES,
    MIN_MAX_BYTES,
    InvalidReading,
    Outbox,
    OutboxError,
    OutboxFull,
)
from ingest.envelope import open_envelope, verify
from ingest.keys import save_private_key
from ingest.model import Gap, Reading, Receipt, SensorReport

DEV = "hub-0001"
REPO = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000_000


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "outbox.sqlite"


def readings(n: int, start: int = 0) -> list[Reading]:
    return [
        Reading(T0 + (start + i) * 1000, "heart_rate", 60.0 + (start + i) % 40, "/min", "hrm-1")
        for i in range(n)
    ]


def accepted(seq: int) -> Receipt:
    return Receipt(DEV, seq, "accepted", stored=1, refused=0, at_ms=T0)


def sealed_readings(outbox: Outbox) -> list[Reading]:
    out: list[Reading] = []
    for envelope in outbox.due(T0, 0, 10_000):
        out.extend(open_envelope(envelope.data).payload.readings)
    return out


def test_round_trip_through_envelopes(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    with Outbox.open(path, DEV) as outbox:
        outbox.add_readings(readings(5))
        outbox.add_gap(Gap(T0 - 60_000, T0 - 1, "out_of_range"))
        (envelope,) = outbox.seal_pending(key, now_ms=T0 + 10_000)
        opened = open_envelope(envelope.data)
        verify(opened, key.public_key())
        assert opened.payload.seq == envelope.seq == 1
        assert opened.payload.sent_ms == T0 + 10_000
        assert opened.payload.readings == tuple(readings(5))
        assert opened.payload.gaps == (Gap(T0 - 60_000, T0 - 1, "out_of_range"),)
        assert (envelope.readings, envelope.gaps) == (5, 1)
        stats = outbox.stats()
        assert (stats.pending_readings, stats.pending_gaps) == (0, 0)
        assert stats.unreceipted_envelopes == 1
        assert stats.oldest_unreceipted_t_ms == T0


def test_values_are_stored_exactly(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    values = [math.nan, math.inf, -0.0, 5e-324, 1.7976931348623157e308, 72]
    with Outbox.open(path, DEV) as outbox:
        outbox.add_readings([Reading(T0 + i, "m", v, "u", "s") for i, v in enumerate(values)])
        outbox.seal_pending(key, T0)
        got = [r.value for r in sealed_readings(outbox)]
    assert math.isnan(got[0])
    assert got[1:] == values[1:]
    assert math.copysign(1.0, got[2]) == -1.0


def test_seq_continues_across_close_and_reopen(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    with Outbox.open(path, DEV) as outbox:
        outbox.add_readings(readings(25))
        first = outbox.seal_pending(key, T0, max_readings=10)
        assert [e.seq for e in first] == [1, 2, 3]
        for envelope in first:
            outbox.receipt(accepted(envelope.seq))
    with Outbox.open(path, DEV) as outbox:
        assert outbox.stats().next_seq == 4
        outbox.add_readings(readings(1))
        assert [e.seq for e in outbox.seal_pending(key, T0)] == [4]


def test_nothing_is_sealed_twice(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    with Outbox.open(path, DEV) as outbox:
        outbox.add_readings(readings(30))
        a = outbox.seal_pending(key, T0, max_readings=7)
        assert outbox.seal_pending(key, T0) == []
        outbox.add_readings(readings(3, start=30))
        b = outbox.seal_pending(key, T0)
        assert [e.seq for e in a + b] == list(range(1, len(a) + len(b) + 1))
        assert sealed_readings(outbox) == readings(33)


def test_gaps_fill_envelopes_first_and_count_as_items(
    path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    with Outbox.open(path, DEV) as outbox:
        for i in range(3):
            outbox.add_gap(Gap(i, i + 1, "clock_jump"))
        outbox.add_readings(readings(4))
        envelopes = outbox.seal_pending(key, T0, max_readings=2)
        assert [(e.gaps, e.readings) for e in envelopes] == [(2, 0), (1, 1), (0, 2), (0, 1)]


def test_max_envelopes_bounds_one_call(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    with Outbox.open(path, DEV) as outbox:
        outbox.add_readings(readings(10))
        assert len(outbox.seal_pending(key, T0, max_readings=2, max_envelopes=3)) == 3
        assert outbox.stats().pending_readings == 4
        assert [e.seq for e in outbox.seal_pending(key, T0, max_readings=2)] == [4, 5]


def test_seal_arguments_are_checked(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    with Outbox.open(path, DEV) as outbox:
        with pytest.raises(ValueError):
            outbox.seal_pending(key, T0, max_readings=0)
        with pytest.raises(ValueError):
            outbox.seal_pending(key, T0, max_readings=1001)


def test_failed_seal_changes_nothing(path: Path) -> None:
    with Outbox.open(path, DEV) as outbox:
        outbox.add_readings(readings(3))
        with pytest.raises(TypeError):
            outbox.seal_pending(ec.generate_private_key(ec.SECP384R1()), T0)
        stats = outbox.stats()
        assert (stats.pending_readings, stats.unreceipted_envelopes, stats.next_seq) == (3, 0, 1)


def test_due_resend_and_receipt(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    with Outbox.open(path, DEV) as outbox:
        outbox.add_readings(readings(6))
        outbox.seal_pending(key, T0, max_readings=2)
        assert [e.seq for e in outbox.due(T0, 30_000, limit=2)] == [1, 2]
        assert outbox.mark_sent(1, T0)
        assert outbox.mark_sent(2, T0)
        assert [e.seq for e in outbox.due(T0 + 1, 30_000, limit=10)] == [3]
        resend = outbox.due(T0 + 30_000, 30_000, limit=10)
        assert [(e.seq, e.attempts, e.last_sent_ms) for e in resend] == [
            (1, 1, T0),
            (2, 1, T0),
            (3, 0, None),
        ]
        assert outbox.receipt(accepted(1))
        assert not outbox.receipt(accepted(1)), "a repeated receipt changes nothing"
        assert not outbox.mark_sent(1, T0 + 1), "the receipt may overtake mark_sent"
        assert [e.seq for e in outbox.due(T0 + 60_000, 30_000, limit=10)] == [2, 3]
        stats = outbox.stats()
        assert stats.unreceipted_envelopes == 2
        assert (stats.last_receipt_seq, stats.last_receipt_status) == (1, "accepted")


def test_sent_after_now_is_due_after_the_clock_went_back(
    path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    with Outbox.open(path, DEV) as outbox:
        outbox.add_readings(readings(4))
        outbox.seal_pending(key, T0, max_readings=2)
        assert outbox.mark_sent(1, T0)
        assert outbox.mark_sent(2, T0 - 3_600_000 + 1)
        hour_back = T0 - 3_600_000 + 5_000
        # 1 was sent "in the future" of the new clock: how long ago is unknown, so it is due;
        # 2 was sent on the new clock 4 s ago: not yet.
        assert [e.seq for e in outbox.due(hour_back, 30_000, limit=10)] == [1]
        assert [e.seq for e in outbox.due(T0, 30_000, limit=10)] == [2]


def test_rejected_stops_resending_and_is_recorded(
    path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    with Outbox.open(path, DEV) as outbox:
        outbox.add_readings(readings(4))
        outbox.seal_pending(key, T0, max_readings=2)
        assert outbox.receipt(Receipt(DEV, 1, "rejected", 0, 2, T0 + 5, reason="no_consent"))
        assert [e.seq for e in outbox.due(T0 + 10**9, 0, 10)] == [2]
        (record,) = outbox.rejected()
        assert (record.seq, record.reason, record.readings, record.refused) == (
            1,
            "no_consent",
            2,
            2,
        )
        assert record.receipt_at_ms == T0 + 5
        assert outbox.stats().rejected_envelopes == 1
    with Outbox.open(path, DEV) as outbox:
        assert [e.seq for e in outbox.due(T0 + 10**9, 0, 10)] == [2]


def test_receipt_for_another_device_is_refused(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    with Outbox.open(path, DEV) as outbox:
        outbox.add_readings(readings(1))
        outbox.seal_pending(key, T0)
        with pytest.raises(OutboxError):
            outbox.receipt(Receipt("hub-0002", 1, "accepted", 1, 0, T0))
        with pytest.raises(OutboxError):
            outbox.receipt(Receipt(DEV, 1, "lost", 1, 0, T0))
        assert outbox.stats().unreceipted_envelopes == 1


def test_invalid_readings_are_refused_whole(path: Path) -> None:
    with Outbox.open(path, DEV) as outbox:
        bad = Reading(T0, "m" * 65, 1.0, "u", "s")
        with pytest.raises(InvalidReading):
            outbox.add_readings([*readings(3), bad])
        with pytest.raises(InvalidReading):
            outbox.add_gap(Gap(0, 1, ""))
        assert outbox.stats().pending_readings == 0


# --- the file ---------------------------------------------------------------------------------


def test_new_file_is_private(path: Path) -> None:
    Outbox.open(path, DEV).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_garbage_file_is_refused(path: Path) -> None:
    path.write_bytes(b"this is not a database " * 500)
    with pytest.raises(OutboxError, match="not a usable outbox"):
        Outbox.open(path, DEV)


def test_truncated_outbox_is_refused(path: Path, tmp_path: Path) -> None:
    with Outbox.open(path, DEV) as outbox:
        for i in range(20):
            outbox.add_readings(readings(200, start=i * 200))
    data = path.read_bytes()
    assert len(data) > 64 * 1024
    broken = tmp_path / "broken.sqlite"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(OutboxError) as info:
        Outbox.open(broken, DEV)
    assert isinstance(info.value, DeviceDriverError)


def test_outbox_of_another_device_is_refused(path: Path) -> None:
    Outbox.open(path, DEV).close()
    with pytest.raises(OutboxError, match="belongs to device 'hub-0001'"):
        Outbox.open(path, "hub-0002")


def test_another_applications_database_is_refused(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    with pytest.raises(OutboxError, match="another application"):
        Outbox.open(path, DEV)


def test_invalid_device_id_is_refused(path: Path) -> None:
    with pytest.raises(OutboxError):
        Outbox.open(path, "dev/+/#")


def test_closed_outbox_raises(path: Path) -> None:
    outbox = Outbox.open(path, DEV)
    outbox.close()
    outbox.close()
    with pytest.raises(OutboxError, match="closed"):
        outbox.add_readings(readings(1))


# --- the bound ----------------------------------------------------------------------------


def test_outbox_full_at_the_bound(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    with Outbox.open(path, DEV, max_bytes=MIN_MAX_BYTES) as outbox:
        added = 0
        near_full_seen = False
        full: OutboxFull | None = None
        for i in range(1000):
            try:
                outbox.add_readings(readings(50, start=i * 50))
            except OutboxFull as exc:
                full = exc
                break
            added += 50
            near_full_seen |= outbox.stats().near_full
        assert full is not None
        assert full.max_bytes == MIN_MAX_BYTES
        assert near_full_seen
        stats = outbox.stats()
        assert stats.pending_readings == added, "a refused batch leaves nothing behind"
        assert stats.near_full
        assert stats.bytes_used <= MIN_MAX_BYTES
        # The gap recording the refusal still fits, in the reserve beyond the bound.
        outbox.add_gap(Gap(T0 + added * 1000, T0 + (added + 50) * 1000, "outbox_full"))
        assert outbox.stats().bytes_used <= MIN_MAX_BYTES + GAP_RESERVE_BYTES
        # Receipts free the space again.
        for envelope in outbox.seal_pending(key, T0):
            outbox.receipt(accepted(envelope.seq))
        assert not outbox.stats().near_full
        outbox.add_readings(readings(50, start=added))


def test_max_bytes_has_a_floor(path: Path) -> None:
    with pytest.raises(ValueError):
        Outbox.open(path, DEV, max_bytes=MIN_MAX_BYTES - 1)


# --- crash safety ---------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from device_drivers.outbox import Outbox
    from ingest.keys import load_private_key
    from ingest.model import Reading

    path, mode, key_path = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    outbox = Outbox.open(path, "hub-0001")
    key = load_private_key(key_path)
    for batch in range(1000):
        outbox.add_readings(
            [Reading(batch * 100 + i, "heart_rate", 60.0, "/min", "s") for i in range(100)]
        )
        if batch % 3 == 2:
            outbox.seal_pending(key, batch, max_readings=70)
        if mode == "exit" and batch == 4:
            os._exit(0)  # no close, no commit hook, no atexit
        print(batch, flush=True)
    """
)


def run_child(path: Path, key_path: Path, mode: str, kill_after: int) -> int:
    """Run the writer; return how many batches it reported durable before it died."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), mode, str(key_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    ) as child:
        assert child.stdout is not None
        reported = 0
        for line in child.stdout:
            reported = int(line) + 1
            if mode == "kill" and reported == kill_after:
                child.send_signal(signal.SIGKILL)
                break
        child.wait()
    return reported


@pytest.fixture
def key_path(tmp_path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    target = tmp_path / "hub.key"
    save_private_key(key, target)
    return target


def check_after_crash(path: Path, key: ec.EllipticCurvePrivateKey, at_least: int) -> None:
    with Outbox.open(path, DEV) as outbox:
        stats = outbox.stats()
        envelopes = outbox.due(0, 0, 10_000)
        in_envelopes = [r.t_ms for e in envelopes for r in open_envelope(e.data).payload.readings]
        assert [e.seq for e in envelopes] == list(range(1, stats.next_seq))
        total = len(in_envelopes) + stats.pending_readings
        assert total >= at_least * 100
        assert total % 100 == 0, "batches are all or nothing"
        # Sealing after the crash continues the sequence; no reading is lost or doubled.
        outbox.seal_pending(key, 0)
        envelopes = outbox.due(0, 0, 10_000)
        assert [e.seq for e in envelopes] == list(range(1, outbox.stats().next_seq))
        after = [r.t_ms for e in envelopes for r in open_envelope(e.data).payload.readings]
        assert sorted(after) == list(range(total))


@pytest.mark.slow
def test_os_exit_right_after_add_keeps_everything(
    path: Path, key: ec.EllipticCurvePrivateKey, key_path: Path
) -> None:
    run_child(path, key_path, "exit", 0)
    check_after_crash(path, key, at_least=5)
    with Outbox.open(path, DEV) as outbox:
        assert outbox.stats().pending_readings == 0


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("kill_after", [1, 3, 7])
def test_kill_9_after_add_keeps_everything(
    path: Path, key: ec.EllipticCurvePrivateKey, key_path: Path, kill_after: int
) -> None:
    reported = run_child(path, key_path, "kill", kill_after)
    assert reported == kill_after
    check_after_crash(path, key, at_least=reported)


def test_sensor_reports_travel_with_the_next_envelope(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with Outbox.open(tmp_path / "s.sqlite", "hub-1") as outbox:
        outbox.add_sensor(SensorReport("hr-1", model="OLD", battery_level=90))
        outbox.add_sensor(SensorReport("hr-1", model="HRM-2", battery_level=80))  # newest wins
        (only_sensor,) = outbox.seal_pending(key, 1_000)  # no readings: still sealed
        assert open_envelope(only_sensor.data).payload.sensors == (
            SensorReport("hr-1", model="HRM-2", battery_level=80),
        )
        assert outbox.seal_pending(key, 2_000) == []  # sent once, not again
