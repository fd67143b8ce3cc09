"""A hub stopped in the middle of reading a glucose meter's stored records, then started again on
the same state file and outbox: every record the meter holds is stored exactly once, through
the real hub (``open_hub``), the simulated radio, Mosquitto, the gateway and PostgreSQL.

The hub keeps its place in the meter's memory as a cursor in its state file: the last record
whose readings the outbox made durable, written when the meter's Record Access Control Point
response comes and when a connection ends (a stop included), never on the gateway's receipt.
So the moments where a stop could lose or repeat a record are:

- between records: the meter has notified some of the records asked for and not yet indicated
  its response; those records are in the outbox, the cursor is not yet written. The stop
  writes it, and the restarted hub asks only for what follows: nothing is sent twice.
- during a record's outbox write: the record is on disk (and already stored by the gateway),
  but the hub is stopped before the write returns, so the cursor stays one record behind. The
  restarted hub reads that record again and sends it in a new envelope; the gateway refuses
  the copy as ``duplicate_record``.
- after the records were sealed and sent, before their receipt reached the outbox: the cursor
  is written, the envelope is still in the outbox. The restarted hub sends it again byte for
  byte (the gateway stores a replay once) and asks the meter for nothing it already has.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from bumble import gatt

from device_drivers import hub as hub_module
from device_drivers.driver import WearableSpec
from device_drivers.gatt import glucose, racp
from device_drivers.glucose_records import GLUCOSE_CURSOR, record_key
from device_drivers.hub_factory import STATE_FILE, HubParts
from device_drivers.identity import HubIdentity
from device_drivers.sim import VirtualGlucoseMeter, VirtualRadio
from device_drivers.state import HubState
from ingest.model import Reading
from storage import db, registry
from tests.alerts.test_engine import rows
from tests.fixtures.gateway import RunningGateway
from tests.fixtures.hubs import enrolled_hub, open_simulated_hub
from tests.fixtures.trial import ALL_SCOPES, Trial
from tests.fixtures.waiting import wait_until

pytestmark = pytest.mark.slow

T = TypeVar("T")

PARTICIPANT = "P9"
SENSOR = "glucose-1"
RECORDS = 6
# The record after which the first run of the hub is stopped (1-based sequence number).
STOP_AT = 3
DEADLINE_S = 15.0
SEAL_AFTER_S = 0.2
# The restarted hub sends an unreceipted envelope again after this (the relay's default, 10 s,
# counts from the first run's send, by the wall clock the outbox recorded).
RESEND_AFTER_S = 0.5


class PausingMeter(VirtualGlucoseMeter):
    """The simulated glucose meter, able to stop in the middle of an answer: once it has notified
    record ``pause_after`` (its measurement and its context) it waits for ``resume`` before the
    next one, its RACP response not yet indicated. ``answered`` counts the RACP responses it has
    indicated (to a hub, or to nobody once the hub went away); after each it takes a new request.
    """

    def __init__(self, name: str, *, seed: int, pause_after: int | None = None) -> None:
        super().__init__(name, seed=seed, stored_records=RECORDS)
        self.pause_after = pause_after
        self.paused = asyncio.Event()
        self.resume = asyncio.Event()
        self.answered = 0

    async def send_measurement(
        self, characteristic: gatt.Characteristic[bytes], payload: bytes, *, indicate: bool
    ) -> bool:
        sent = await super().send_measurement(characteristic, payload, indicate=indicate)
        if (
            self.pause_after is not None
            and characteristic is self.context_characteristic
            and glucose.decode_context(payload).sequence_number == self.pause_after
        ):
            self.pause_after = None
            self.paused.set()
            await self.resume.wait()
        return sent

    async def indicate(self, characteristic: gatt.Characteristic[bytes], value: bytes) -> None:
        if characteristic is self.racp_characteristic:
            self.answered += 1
        await super().indicate(characteristic, value)


@dataclasses.dataclass
class HeldWrite:
    """Holds the hub's outbox write of the record ``key`` once it is on disk, before the call
    returns to the hub: the hub can then be stopped while it waits for a write that has
    happened. The hold is in the event loop, after the disk thread has finished the write, so
    the hub's other disk work (the relay sealing and sending that record) goes on."""

    key: str
    written: threading.Event = dataclasses.field(default_factory=threading.Event)
    release: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    held: bool = False

    def after_write(self, readings: Sequence[Reading]) -> None:
        """In the disk thread, once the outbox has the readings."""
        if not self.written.is_set() and any(r.record == self.key for r in readings):
            self.written.set()

    def hold_writes(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The sink's disk calls: the one that wrote the record does not return until
        ``release`` (the calls run one after another, so the first to come back once the
        record is written is that one)."""
        on_disk = hub_module.on_disk

        async def held_on_disk(func: Callable[..., T], /, *args: object) -> T:
            result = await on_disk(func, *args)
            if self.written.is_set() and not self.held:
                self.held = True
                await self.release.wait()
            return result

        monkeypatch.setattr(hub_module, "on_disk", held_on_disk)


@contextlib.asynccontextmanager
async def hub_running(
    identity: HubIdentity,
    radio: VirtualRadio,
    meter: VirtualGlucoseMeter,
    copies: Counter[str],
    monkeypatch: pytest.MonkeyPatch,
    *,
    held: HeldWrite | None = None,
    before_start: Callable[[HubParts], None] | None = None,
) -> AsyncIterator[HubParts]:
    """One run of the participant's hub as ``trialstream-hub run`` builds it (``open_hub`` on
    its directory, the meter named, a new Bluetooth adapter), stopped on leaving as a stopped
    process is: its task cancelled, then its outbox closed. ``copies`` counts, by record key,
    the glucose readings this run made durable in the outbox (each is sent to the gateway)."""
    async with contextlib.AsyncExitStack() as stack:
        parts = await open_simulated_hub(
            identity, stack, radio, [WearableSpec(meter.address, SENSOR)], SEAL_AFTER_S
        )
        add_readings = parts.outbox.add_readings

        def counted(readings: Sequence[Reading]) -> None:
            add_readings(readings)
            copies.update(r.record for r in readings if r.metric == "glucose" and r.record)
            if held is not None:
                held.after_write(readings)

        monkeypatch.setattr(parts.outbox, "add_readings", counted)
        if held is not None:
            held.hold_writes(monkeypatch)
        if before_start is not None:
            before_start(parts)
        task = asyncio.create_task(parts.hub.run(), name="test-hub")
        try:
            yield parts
        finally:
            task.cancel()
            try:
                if held is not None:
                    # The held write returns only once the stop has reached the session that
                    # waits for it: to a hub that is going.
                    await wait_until(session_stopping, "the session told to stop", within=5)
                    held.release.set()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            finally:
                if held is not None:
                    held.release.set()


def session_stopping() -> bool:
    """Whether the hub's session of the meter has been told to stop (or has ended)."""
    session = [t for t in asyncio.all_tasks() if t.get_name() == f"wearable-{SENSOR}"]
    return all(t.cancelling() or t.done() for t in session)


async def enrolled_participant_hub(trial: Trial, gw: RunningGateway, tmp_path: Path) -> HubIdentity:
    """A hub enrolled through the API for a participant enrolled and consenting a month ago, so
    the meter's memory (records up to a day and a half old) is inside their data window."""
    since = datetime.now(UTC) - timedelta(days=30)
    async with db.connection(trial.url) as conn, conn.transaction():
        await registry.create_participant(
            conn, PARTICIPANT, trial.study_id, trial.site_id, enrolled_at=since
        )
        await registry.record_consent(
            conn,
            PARTICIPANT,
            trial.document_id,
            "consent",
            ALL_SCOPES,
            effective_at=since,
            recorded_by="test",
            signer_name=f"Participant {PARTICIPANT}",
            meaning="consent",
        )
    return await enrolled_hub(trial, gw, tmp_path / "hub")


def keys_of(meter: VirtualGlucoseMeter) -> list[str]:
    """The key the hub gives each record the meter holds, oldest first."""
    return [record_key(glucose.decode(r.measurement())) for r in meter.records]


def time_of(key: str) -> int:
    return int(key.split(":")[2])


def cursor(path: Path) -> int | None:
    return HubState.open(path).cursor(SENSOR, GLUCOSE_CURSOR)


def drained(parts: HubParts) -> bool:
    s = parts.outbox.stats()
    return s.pending_readings == s.pending_gaps == s.unreceipted_envelopes == 0


async def stored_by_time(url: str) -> Counter[int]:
    """Rows in ``readings`` of the participant's glucose, by time (ms): a record's time is in its
    key, so this counts rows per record."""
    found = await rows(
        url,
        "SELECT (extract(epoch FROM time) * 1000)::bigint, count(*) FROM readings"
        " WHERE participant_id = %s AND sensor = %s AND metric = 'glucose' GROUP BY 1",
        (PARTICIPANT, SENSOR),
    )
    return Counter({int(str(t)): int(str(n)) for t, n in found})


async def check_each_record_stored_once(
    url: str, identity: HubIdentity, meter: VirtualGlucoseMeter, copies: Counter[str]
) -> list[tuple[object, ...]]:
    """Every record of the meter is one row in ``readings`` (no more, none missing), with the
    meter's value, and every copy the hub sent beyond the first is a ``duplicate_record``
    refusal of that record's time. Returns the refusals (metric, count, first ms, last ms)."""
    keys = keys_of(meter)
    by_time = await stored_by_time(url)
    assert {k: by_time[time_of(k)] for k in keys} == dict.fromkeys(keys, 1)
    assert sum(by_time.values()) == RECORDS, by_time
    values = await rows(
        url,
        "SELECT value FROM readings WHERE participant_id = %s AND metric = 'glucose' ORDER BY time",
        (PARTICIPANT,),
    )
    assert [v for (v,) in values] == [float(r.mg_dl) for r in meter.records]
    claimed = await rows(
        url,
        "SELECT record_key FROM device_records WHERE participant_id = %s AND metric = 'glucose'"
        " ORDER BY record_key",
        (PARTICIPANT,),
    )
    assert [k for (k,) in claimed] == sorted(keys)
    # The gateway accounts for what the hub sent again: its only refusals are duplicates, as
    # many as the copies beyond the first, each of a record the hub did send more than once.
    refusals = await rows(
        url,
        "SELECT reason, metric, reading_count, first_ms, last_ms FROM rejections"
        " WHERE device_id = %s ORDER BY rejection_id",
        (identity.device_id,),
    )
    assert set(copies) == set(keys)
    assert {reason for reason, *_ in refusals} <= {"duplicate_record"}, refusals
    refused = sum(int(str(count)) for _, _, count, _, _ in refusals)
    assert refused == copies.total() - RECORDS, (refusals, copies)
    again = {time_of(k) for k, n in copies.items() if n > 1}
    for _, metric, _, first, last in refusals:
        assert metric == "glucose"
        assert {first, last} <= again, (refusals, copies)
    return [tuple(r[1:]) for r in refusals]


@pytest.mark.parametrize("stopped", ["between-records", "during-outbox-write"])
async def test_a_hub_stopped_in_the_middle_of_a_racp_exchange_stores_every_record_once(
    stopped: str,
    trial: Trial,
    gateway: RunningGateway,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    identity = await enrolled_participant_hub(trial, gateway, tmp_path)
    state_path = identity.directory / STATE_FILE
    between = stopped == "between-records"
    copies: Counter[str] = Counter()
    async with VirtualRadio() as radio:
        meter = PausingMeter("TS-GLU-STOP", seed=5, pause_after=STOP_AT if between else None)
        keys = keys_of(meter)
        held = None if between else HeldWrite(keys[STOP_AT - 1])
        async with meter.running(radio):
            async with hub_running(identity, radio, meter, copies, monkeypatch, held=held) as first:
                if held is None:
                    # The meter has notified records 1-3 of 6 and waits; the hub has made
                    # them durable (the sink notes a reading once the outbox has it).
                    await wait_until(meter.paused.is_set, "the meter paused", within=DEADLINE_S)
                    await wait_until(
                        lambda: (
                            first.sink.latest.get("glucose", (0, 0.0))[0]
                            == time_of(keys[STOP_AT - 1])
                        ),
                        "records 1-3 in the outbox",
                        within=DEADLINE_S,
                    )
                    assert meter.answered == 0  # the exchange is not over
                else:
                    # Record 3 is on disk and its write has not returned; the relay went on
                    # and the gateway stored it.
                    await wait_until(held.written.is_set, "record 3 written", within=DEADLINE_S)

                    async def three_stored() -> bool:
                        return sum((await stored_by_time(trial.url)).values()) == STOP_AT

                    await wait_until(three_stored, "records 1-3 stored", within=DEADLINE_S)
                # The meter's response has not been handled: no cursor is written yet.
                assert cursor(state_path) is None
                assert first.sessions[0].stats.racp_completed == 0
            # Stopped: the stop wrote the cursor up to the last record the hub knows durable.
            kept = STOP_AT if between else STOP_AT - 1
            assert cursor(state_path) == kept
            assert meter.racp_requests == [racp.report_all_records()]
            meter.resume.set()
            await wait_until(lambda: meter.answered == 1, "the meter's answer over", within=5)

            async with hub_running(identity, radio, meter, copies, monkeypatch) as second:
                await wait_until(
                    lambda: cursor(state_path) == RECORDS, "cursor 6 saved", within=DEADLINE_S
                )
                await wait_until(lambda: drained(second), "outbox drained", within=DEADLINE_S)
            # With its cursor, the restarted hub asked where the numbering is, then for what
            # follows the cursor only.
            assert meter.racp_requests[1:] == [
                racp.report_last_record(),
                racp.report_records_from(kept + 1),
            ]

    refusals = await check_each_record_stored_once(trial.url, identity, meter, copies)
    if between:
        assert copies == Counter(dict.fromkeys(keys, 1))
        assert refusals == []
    else:
        # Record 3 was sent twice (before the stop, and read again after it): stored once,
        # its second copy refused.
        assert copies == Counter({**dict.fromkeys(keys, 1), keys[STOP_AT - 1]: 2})
        t3 = time_of(keys[STOP_AT - 1])
        assert refusals == [("glucose", 1, t3, t3)]


async def test_a_hub_stopped_before_the_receipt_of_its_sealed_records_stores_each_once(
    trial: Trial,
    gateway: RunningGateway,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    identity = await enrolled_participant_hub(trial, gateway, tmp_path)
    state_path = identity.directory / STATE_FILE
    copies: Counter[str] = Counter()
    lost: list[bytes] = []

    def receipts_lost(parts: HubParts) -> None:
        async def lose(data: bytes) -> None:
            lost.append(data)

        monkeypatch.setattr(parts.relay, "apply_receipt", lose)

    def resend_soon(parts: HubParts) -> None:
        parts.relay.config = dataclasses.replace(parts.relay.config, resend_after_s=RESEND_AFTER_S)

    async with VirtualRadio() as radio:
        meter = PausingMeter("TS-GLU-SEALED", seed=6)
        async with meter.running(radio):
            async with hub_running(
                identity, radio, meter, copies, monkeypatch, before_start=receipts_lost
            ) as first:
                await wait_until(
                    lambda: cursor(state_path) == RECORDS, "cursor 6 saved", within=DEADLINE_S
                )

                async def all_stored() -> bool:
                    return sum((await stored_by_time(trial.url)).values()) == RECORDS

                await wait_until(all_stored, "records stored", within=DEADLINE_S)
                await wait_until(lambda: bool(lost), "the gateway's receipt", within=DEADLINE_S)
                # Sealed and sent, the receipt not applied: the envelope is still in the outbox.
                stats = first.outbox.stats()
                assert stats.pending_readings == 0
                assert stats.unreceipted_envelopes >= 1
                assert first.relay.stats.receipts_accepted == 0

            asked = len(meter.racp_requests)
            async with hub_running(
                identity, radio, meter, copies, monkeypatch, before_start=resend_soon
            ) as second:
                await wait_until(
                    lambda: second.sessions[0].stats.racp_completed >= 1,
                    "the meter asked again",
                    within=DEADLINE_S,
                )
                await wait_until(lambda: drained(second), "outbox drained", within=DEADLINE_S)
            assert second.relay.stats.resent >= 1
            assert meter.racp_requests[asked:] == [
                racp.report_last_record(),
                racp.report_records_from(RECORDS + 1),
            ]
            assert cursor(state_path) == RECORDS

    assert await check_each_record_stored_once(trial.url, identity, meter, copies) == []
    assert copies == Counter(dict.fromkeys(keys_of(meter), 1))
