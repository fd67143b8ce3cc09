"""The outbox sink groups the writes of readings handed over at nearly the same time (every
wearable's) into one transaction, and still answers each caller for its own readings: a
part that is invalid or does not fit fails alone, and a caller that stops finds its readings
on disk. A session hands over what waits in its queue together."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from device_drivers import driver as driver_module
from device_drivers.driver import BATTERY_LEVEL, Arrival, WearableSession, WearableSpec
from device_drivers.hub import OUTBOX_FULL, OutboxSink
from device_drivers.outbox import MIN_MAX_BYTES, InvalidReading, Outbox
from ingest.envelope import open_envelope
from ingest.model import Reading

DEV = "hub-0001"
T0 = 1_700_000_000_000
HEART_RATE_MEASUREMENT = 0x2A37


def readings(start: int, n: int, sensor: str = "strap") -> list[Reading]:
    return [Reading(T0 + start + i, "heart_rate", 70.0, "/min", sensor) for i in range(n)]


class CountingOutbox(Outbox):
    """An outbox that counts its ``add_readings`` calls (one call, one transaction)."""

    calls: int = 0

    def add_readings(self, readings: Sequence[Reading]) -> None:
        type(self).calls += 1
        super().add_readings(readings)


@pytest.fixture
def counting(tmp_path: Path) -> Iterator[Outbox]:
    CountingOutbox.calls = 0
    outbox = CountingOutbox.open(tmp_path / "o.sqlite", DEV)
    yield outbox
    outbox.close()


def pending(outbox: Outbox) -> int:
    return outbox.stats().pending_readings


async def test_readings_handed_over_together_share_one_write_and_are_durable_on_return(
    counting: Outbox,
) -> None:
    sink = OutboxSink(counting)
    await asyncio.gather(*(sink.readings(readings(100 * i, 3, f"s{i}")) for i in range(20)))
    assert CountingOutbox.calls == 1
    assert pending(counting) == 60
    assert set(sink.latest) == {"heart_rate"}
    # Calls further apart than the linger are written apart.
    await sink.readings(readings(5000, 1))
    assert CountingOutbox.calls == 2
    assert pending(counting) == 61


async def test_an_invalid_part_fails_alone(counting: Outbox) -> None:
    sink = OutboxSink(counting)
    bad = [Reading(T0, "heart_rate", 70.0, "/min", "x" * 10_000)]  # no envelope carries it
    outcomes = await asyncio.gather(
        sink.readings(readings(0, 2, "a")),
        sink.readings(bad),
        sink.readings(readings(10, 2, "b")),
        return_exceptions=True,
    )
    assert outcomes[0] is None
    assert isinstance(outcomes[1], InvalidReading)
    assert outcomes[2] is None
    assert pending(counting) == 4


async def test_a_part_that_does_not_fit_is_refused_alone_with_its_gap(tmp_path: Path) -> None:
    with Outbox.open(tmp_path / "o.sqlite", DEV, max_bytes=MIN_MAX_BYTES) as outbox:
        sink = OutboxSink(outbox)
        big = readings(1000, 5000, "big")
        await asyncio.gather(sink.readings(readings(0, 3, "small")), sink.readings(big))
        assert pending(outbox) == 3
        assert sink.refused_full == 5000
        await sink.readings(readings(9000, 1, "small"))  # the refused span is recorded now
        key = ec.generate_private_key(ec.SECP256R1())
        sealed = outbox.seal_pending(key, T0 + 10_000)
        gaps = [g for e in sealed for g in open_envelope(e.data).payload.gaps]
        assert [(g.from_ms, g.to_ms, g.reason) for g in gaps] == [
            (T0 + 1000, T0 + 5999, OUTBOX_FULL)
        ]


async def test_a_caller_that_stops_before_the_write_finds_its_readings_on_disk(
    counting: Outbox,
) -> None:
    sink = OutboxSink(counting, commit_linger_s=30.0)
    task = asyncio.create_task(sink.readings(readings(0, 4)))
    await asyncio.sleep(0.05)
    assert pending(counting) == 0  # still lingering
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert pending(counting) == 4
    assert sink._committer is not None
    sink._committer.cancel()


async def test_a_fault_of_the_write_itself_reaches_every_caller(
    counting: Outbox, tmp_path: Path
) -> None:
    sink = OutboxSink(counting)
    counting.close()  # the file is gone from under the sink: not a refusal of the outbox's
    outcomes = await asyncio.gather(
        sink.readings(readings(0, 1, "a")),
        sink.readings(readings(5, 1, "b")),
        return_exceptions=True,
    )
    assert all(isinstance(o, Exception) for o in outcomes)
    # The sink is not stuck: with an outbox that works behind it, it takes readings again.
    with Outbox.open(tmp_path / "again.sqlite", DEV) as again:
        sink.outbox = again
        await sink.readings(readings(10, 2))
        assert pending(again) == 2


# --- a session hands over what waits in its queue together --------------------------------


class ListSink:
    def __init__(self) -> None:
        self.calls: list[list[Reading]] = []
        self.gaps: list[object] = []
        self.infos: list[object] = []

    async def readings(self, readings: Sequence[Reading]) -> None:
        self.calls.append(list(readings))

    async def gap(self, gap: object) -> None:
        self.gaps.append(gap)

    async def sensor(self, info: object) -> None:
        self.infos.append(info)


def hr(t_ms: int, bpm: int) -> Arrival:
    return Arrival(HEART_RATE_MEASUREMENT, t_ms, bytes([0x00, bpm]))


async def test_a_session_stores_queued_measurements_together_and_keeps_their_order() -> None:
    sink = ListSink()
    session = WearableSession(WearableSpec("AA:BB:CC:DD:EE:FF", "strap"), sink)
    queue: asyncio.Queue[Arrival] = asyncio.Queue()
    for arrival in [
        hr(T0 + 2, 61),
        hr(T0 + 3, 62),
        Arrival(BATTERY_LEVEL, T0 + 4, bytes([80])),
        hr(T0 + 5, 63),
        Arrival(HEART_RATE_MEASUREMENT, T0 + 6, b"\xff"),  # malformed
        hr(T0 + 7, 64),
    ]:
        queue.put_nowait(arrival)
    await session._handle_all(session._drained(hr(T0 + 1, 60), queue))
    assert [[r.value for r in call] for call in sink.calls] == [[60, 61, 62], [63], [64]]
    assert len(sink.infos) == 1  # the battery, between the first two writes
    assert [g.reason for g in sink.gaps] == [f"malformed_0x{HEART_RATE_MEASUREMENT:04X}"]  # type: ignore[attr-defined]
    assert session.stats.malformed == 1


async def test_a_session_takes_at_most_a_batch_from_its_queue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(driver_module, "HANDLE_BATCH", 3)
    queue: asyncio.Queue[Arrival] = asyncio.Queue()
    for i in range(5):
        queue.put_nowait(hr(T0 + i, 60))
    taken = WearableSession._drained(hr(T0 - 1, 60), queue)
    assert len(taken) == 3
    assert queue.qsize() == 3
