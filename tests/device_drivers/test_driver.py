"""WearableSession and pairing against virtual wearables on bumble, through plain bleak."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from bumble.pairing import PairingDelegate

from device_drivers.driver import (
    HUB_STOPPED,
    OUT_OF_RANGE,
    ReadingSink,
    SensorInfo,
    WearableSession,
    WearableSpec,
)
from device_drivers.gatt import racp
from device_drivers.gatt.current_time import CurrentTime
from device_drivers.glucose_records import GLUCOSE_CURSOR
from device_drivers.pairing import (
    BleBackends,
    PairingFailed,
    PromptPairingAgent,
    WearableNotFound,
    discover,
    pair_wearable,
)
from device_drivers.sim import (
    Faults,
    SimAdapter,
    VirtualBloodPressureCuff,
    VirtualGlucoseMeter,
    VirtualHeartRateStrap,
    VirtualPulseOximeter,
    VirtualRadio,
    VirtualThermometer,
    VirtualWearable,
    VirtualWeightScale,
)
from device_drivers.state import HubState, LinkMark, PairedWearable
from ingest.model import Gap, Reading
from tests.fixtures.waiting import wait_until

DEADLINE_S = 15.0
FAST_SCAN_S = 1.0


@dataclass
class MemorySink(ReadingSink):
    """Keeps everything in memory; ``gate`` (when cleared) holds readings back, as a slow
    disk would (``held`` counts the calls it held); ``fail_for`` makes readings of those
    sensors raise, as a broken sink would."""

    readings_in: list[Reading] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    sensors: list[SensorInfo] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    fail_for: frozenset[str] = frozenset()
    held: int = 0

    def __post_init__(self) -> None:
        self.gate.set()

    async def readings(self, readings: Sequence[Reading]) -> None:
        if {r.sensor for r in readings} & self.fail_for:
            raise RuntimeError("sink refused")
        if not self.gate.is_set():
            self.held += 1
        await self.gate.wait()
        self.readings_in.extend(readings)

    async def gap(self, gap: Gap) -> None:
        self.gaps.append(gap)

    async def sensor(self, info: SensorInfo) -> None:
        self.sensors.append(info)

    def of(self, sensor: str, metric: str | None = None) -> list[Reading]:
        return [
            r
            for r in self.readings_in
            if r.sensor == sensor and (metric is None or r.metric == metric)
        ]


class Participant:
    """Plays the person pairing: reads the wearable's display and types what it shows."""

    def __init__(self, wearable: VirtualWearable, *, typo: bool = False) -> None:
        self.wearable = wearable
        self.typo = typo
        self.asked: list[str] = []

    async def passkey(self, sensor: str) -> int | None:
        self.asked.append(sensor)
        shown = await self.wearable.wait_for_displayed_passkey()
        return (shown + 1) % 1_000_000 if self.typo else shown

    async def confirm(self, sensor: str, number: int) -> bool:
        self.asked.append(sensor)
        return True


@pytest.fixture
async def radio() -> AsyncIterator[VirtualRadio]:
    async with VirtualRadio() as radio:
        yield radio


@pytest.fixture
async def adapter(radio: VirtualRadio) -> AsyncIterator[SimAdapter]:
    adapter = await SimAdapter.create(radio)
    yield adapter
    await adapter.close()


def backends_of(adapter: SimAdapter) -> BleBackends:
    return BleBackends(adapter.scanner_backend, adapter.client_backend)


def session(
    wearable: VirtualWearable,
    sensor: str,
    sink: MemorySink,
    adapter: SimAdapter,
    **kwargs: object,
) -> WearableSession:
    return WearableSession(
        WearableSpec(wearable.address, sensor),
        sink,
        backends_of(adapter),
        scan_timeout_s=FAST_SCAN_S,
        **kwargs,  # type: ignore[arg-type]
    )


@contextlib.asynccontextmanager
async def running(*sessions: WearableSession) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(s.run(), name=f"test-{s.spec.sensor}") for s in sessions]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for task in tasks:
            assert task.cancelled(), "a session ended on its own"


@contextlib.contextmanager
def no_errors(*sessions: WearableSession) -> Iterator[None]:
    yield
    for s in sessions:
        assert s.stats.errors == 0, s.stats.last_error


async def test_discover_lists_every_profile_with_its_name(
    radio: VirtualRadio, adapter: SimAdapter
) -> None:
    wearables: list[VirtualWearable] = [
        VirtualHeartRateStrap("TS-HRM-D"),
        VirtualThermometer("TS-THERMO-D", interval_s=None),
        VirtualBloodPressureCuff("TS-BPM-D", interval_s=None),
        VirtualPulseOximeter("TS-OXI-D", spot_check_interval_s=None),
        VirtualGlucoseMeter("TS-GLU-D"),
        VirtualWeightScale("TS-SCALE-D"),
    ]
    async with contextlib.AsyncExitStack() as stack:
        for w in wearables:
            await stack.enter_async_context(w.running(radio))
        found = await discover(backends_of(adapter), timeout_s=0.5)

    by_address = {f.address: f for f in found}
    assert {
        w.address: (by_address[w.address].name, by_address[w.address].profile) for w in wearables
    } == {
        wearables[0].address: ("TS-HRM-D", "heart_rate"),
        wearables[1].address: ("TS-THERMO-D", "thermometer"),
        wearables[2].address: ("TS-BPM-D", "blood_pressure"),
        wearables[3].address: ("TS-OXI-D", "pulse_oximeter"),
        wearables[4].address: ("TS-GLU-D", "glucose"),
        wearables[5].address: ("TS-SCALE-D", "weight_scale"),
    }


async def test_passkey_pairing_bonds_and_reconnects_with_the_bond(
    radio: VirtualRadio, tmp_path: Path
) -> None:
    state = HubState.open(tmp_path / "hub.json")
    strap = VirtualHeartRateStrap(
        "TS-HRM-PIN",
        seed=3,
        rate_hz=5.0,
        passkey=135_790,
        io_capability=PairingDelegate.IoCapability.DISPLAY_OUTPUT_ONLY,
        require_encryption=True,
    )
    async with strap.running(radio):
        participant = Participant(strap)
        adapter = await SimAdapter.create(radio, agent=PromptPairingAgent(participant, state))
        try:
            paired = await pair_wearable(
                strap.address, "hr-chest", state, backends_of(adapter), scan_timeout_s=FAST_SCAN_S
            )
            assert paired == PairedWearable(strap.address, "hr-chest", "heart_rate", bonded=True)
            assert participant.asked == ["hr-chest"]
            assert strap.displayed_passkey == 135_790
            assert HubState.open(tmp_path / "hub.json").wearables == (paired,)
            assert await adapter.is_bonded(strap.address)

            sink = MemorySink()
            s = WearableSession.for_paired(
                paired, sink, state, backends=backends_of(adapter), scan_timeout_s=FAST_SCAN_S
            )
            async with running(s):
                await wait_until(lambda: len(sink.of("hr-chest")) >= 3, "readings over the bond")
                await strap.go_out_of_range(duration=0.3)
                await wait_until(lambda: s.stats.connects >= 2, "reconnected")
                before = len(sink.of("hr-chest"))
                await wait_until(lambda: len(sink.of("hr-chest")) > before + 2, "more readings")
            assert strap.pairings == 1  # reconnections encrypted with the bond, no new pairing
            assert participant.asked == ["hr-chest"]
        finally:
            await adapter.close()


async def test_wrong_passkey_fails_pairing_and_leaves_the_state_as_it_was(
    radio: VirtualRadio, tmp_path: Path
) -> None:
    state = HubState.open(tmp_path / "hub.json")
    strap = VirtualHeartRateStrap(
        "TS-HRM-TYPO",
        io_capability=PairingDelegate.IoCapability.DISPLAY_OUTPUT_ONLY,
        require_encryption=True,
    )
    async with strap.running(radio):
        agent = PromptPairingAgent(Participant(strap, typo=True), state)
        adapter = await SimAdapter.create(radio, agent=agent)
        try:
            with pytest.raises(PairingFailed):
                async with asyncio.timeout(DEADLINE_S):
                    await pair_wearable(
                        strap.address, "hr-typo", state, backends_of(adapter), scan_timeout_s=1
                    )
            assert not await adapter.is_bonded(strap.address)
        finally:
            await adapter.close()
    assert state.wearables == ()
    assert HubState.open(tmp_path / "hub.json").wearables == ()


async def test_just_works_pairing_needs_no_prompt(
    radio: VirtualRadio, adapter: SimAdapter, tmp_path: Path
) -> None:
    state = HubState.open(tmp_path / "hub.json")
    async with VirtualThermometer("TS-THERMO-JW", require_encryption=True).running(radio) as t:
        paired = await pair_wearable(
            t.address, "thermo", state, backends_of(adapter), scan_timeout_s=FAST_SCAN_S
        )
        assert await adapter.is_bonded(t.address)
    assert paired.profile == "thermometer"
    assert paired.bonded


async def test_absent_wearable_fails_within_its_timeout(
    radio: VirtualRadio, adapter: SimAdapter, tmp_path: Path
) -> None:
    absent = radio.allocate_address().to_string(with_type_qualifier=False)
    state = HubState.open(tmp_path / "hub.json")
    with pytest.raises(WearableNotFound):
        async with asyncio.timeout(DEADLINE_S):
            await pair_wearable(absent, "ghost", state, backends_of(adapter), scan_timeout_s=0.3)
    assert state.wearables == ()

    sink = MemorySink()
    s = WearableSession(
        WearableSpec(absent, "ghost"), sink, backends_of(adapter), scan_timeout_s=0.3
    )
    async with running(s):
        await wait_until(
            lambda: s.stats.connect_failures >= 1, "a failed connect", within=DEADLINE_S
        )
    assert s.stats.connects == 0
    assert s.stats.last_error == "connect: WearableNotFound"
    assert sink.readings_in == []


async def test_three_wearables_stream_at_once_each_under_its_own_sensor(
    radio: VirtualRadio, adapter: SimAdapter
) -> None:
    strap = VirtualHeartRateStrap("TS-HRM-3", seed=1, rate_hz=4.0)
    oximeter = VirtualPulseOximeter("TS-OXI-3", seed=2, rate_hz=2.0, spot_check_interval_s=None)
    cuff = VirtualBloodPressureCuff("TS-BPM-3", seed=3, interval_s=0.5)
    sink = MemorySink()
    async with strap.running(radio), oximeter.running(radio), cuff.running(radio):
        sessions = [
            session(strap, "hr", sink, adapter),
            session(oximeter, "oxi", sink, adapter),
            session(cuff, "bp", sink, adapter),
        ]
        with no_errors(*sessions):
            async with running(*sessions):
                await wait_until(
                    lambda: (
                        len(sink.of("hr")) >= 8
                        and len(sink.of("oxi", "spo2")) >= 4
                        and len(sink.of("bp", "systolic_bp")) >= 2
                    ),
                    "three streams",
                )
    assert {r.metric for r in sink.of("hr")} == {"heart_rate", "rr_interval"}
    assert {r.metric for r in sink.of("oxi")} == {"spo2", "pulse_rate"}
    assert {r.metric for r in sink.of("bp")} == {
        "systolic_bp",
        "diastolic_bp",
        "mean_bp",
        "pulse_rate",
    }
    assert {(i.sensor, i.model) for i in sink.sensors} == {
        ("hr", "TS-HRM-1"),
        ("oxi", "TS-OXI-1"),
        ("bp", "TS-BPM-1"),
    }
    assert sink.gaps == []


async def test_vanishing_wearable_is_reconnected_and_the_gap_recorded(
    radio: VirtualRadio, adapter: SimAdapter
) -> None:
    strap = VirtualHeartRateStrap("TS-HRM-GONE", seed=5, rate_hz=5.0)
    sink = MemorySink()
    async with strap.running(radio):
        s = session(strap, "hr", sink, adapter)
        with no_errors(s):
            async with running(s):
                await wait_until(lambda: len(sink.of("hr", "heart_rate")) >= 3, "streaming")
                await strap.go_out_of_range(duration=0.5)
                await wait_until(lambda: bool(sink.gaps), "gap recorded")
                gap = sink.gaps[0]
                await wait_until(
                    lambda: any(r.t_ms > gap.to_ms for r in sink.of("hr", "heart_rate")),
                    "readings after the gap",
                )
    assert gap.reason == "out_of_range"
    assert gap.from_ms < gap.to_ms
    before = [r.t_ms for r in sink.of("hr", "heart_rate") if r.t_ms <= gap.from_ms]
    assert before, "readings before the gap"
    assert not [r for r in sink.of("hr", "heart_rate") if gap.from_ms < r.t_ms < gap.to_ms]
    assert s.stats.connects >= 2


def cursor(path: Path) -> int | None:
    return HubState.open(path).cursor("glu", GLUCOSE_CURSOR)


async def test_glucose_racp_fetches_only_new_records_across_reconnect_and_hub_restart(
    radio: VirtualRadio, adapter: SimAdapter, tmp_path: Path
) -> None:
    path = tmp_path / "hub.json"
    meter = VirtualGlucoseMeter("TS-GLU-R", seed=4, stored_records=5)
    async with meter.running(radio):
        state = HubState.open(path)
        first = MemorySink()
        s = session(meter, "glu", first, adapter, state=state)
        with no_errors(s):
            async with running(s):
                await wait_until(lambda: s.stats.racp_completed >= 1, "first fetch")
                # The cursor is saved once the sink has made the records durable: wait for it.
                await wait_until(lambda: cursor(path) == 5, "cursor 5 saved")
                meter.measure()
                meter.measure()
                await meter.go_out_of_range(duration=0.3)
                await wait_until(lambda: s.stats.racp_completed >= 2, "fetch after reconnect")
                await wait_until(lambda: cursor(path) == 7, "cursor 7 saved")
        assert [r.value for r in first.of("glu")] == [float(r.mg_dl) for r in meter.records]
        # Each record's meal context followed it and is linked to its reading.
        assert [r.flags for r in first.of("glu")] == [
            ("location_finger", "meal_postprandial" if r.after_meal else "meal_preprandial",
             "sample_capillary_whole_blood")
            for r in meter.records
        ]  # fmt: skip
        assert (s.stats.contexts_linked, s.stats.contexts_unmatched) == (7, 0)
        assert s.stats.records_fetched == 7
        assert s.stats.records_already_held == 0
        assert meter.racp_requests[0] == racp.report_all_records()
        # With a cursor: where is the numbering (the newest record), then what follows it.
        assert meter.racp_requests[1:3] == [racp.report_last_record(), racp.report_records_from(6)]
        assert HubState.open(path).cursor("glu", GLUCOSE_CURSOR) == 7

        # The hub restarts: a new state object from the file, a new session and sink.
        meter.measure()
        second = MemorySink()
        restarted = session(meter, "glu", second, adapter, state=HubState.open(path))
        with no_errors(restarted):
            async with running(restarted):
                await wait_until(lambda: restarted.stats.racp_completed >= 1, "fetch after restart")
                await wait_until(lambda: cursor(path) == 8, "cursor 8 saved")
        assert meter.racp_requests[-2:] == [racp.report_last_record(), racp.report_records_from(8)]
        assert [r.value for r in second.of("glu")] == [float(meter.records[-1].mg_dl)]
        assert HubState.open(path).cursor("glu", GLUCOSE_CURSOR) == 8

        # Nothing new: the meter answers "no records found" and nothing moves.
        third = MemorySink()
        again = session(meter, "glu", third, adapter, state=HubState.open(path))
        async with running(again):
            await wait_until(lambda: again.stats.racp_completed >= 1, "empty fetch")
        assert third.readings_in == []
        assert HubState.open(path).cursor("glu", GLUCOSE_CURSOR) == 8


async def test_a_meter_whose_numbering_started_again_is_read_from_the_start(
    radio: VirtualRadio, adapter: SimAdapter, tmp_path: Path
) -> None:
    """A reset meter's new records are numbered below the cursor: asked only for what
    follows the cursor, it would answer "none" forever. The hub notices, records the event
    and reads every record; their keys differ from the old records' of the same numbers."""
    path = tmp_path / "hub.json"
    meter = VirtualGlucoseMeter("TS-GLU-RESET", seed=6, stored_records=5)
    async with meter.running(radio):
        before = MemorySink()
        s = session(meter, "glu", before, adapter, state=HubState.open(path))
        async with running(s):
            await wait_until(lambda: cursor(path) == 5, "cursor 5 saved")
        meter.restart_numbering()
        meter.measure()
        meter.measure()
        after = MemorySink()
        reset = session(meter, "glu", after, adapter, state=HubState.open(path))
        with no_errors(reset):
            async with running(reset):
                await wait_until(lambda: cursor(path) == 2, "cursor 2 saved after the reset")
    assert meter.racp_requests[-2:] == [racp.report_last_record(), racp.report_all_records()]
    assert reset.stats.sequence_resets == 1
    # The span between the two sessions (the hub was stopped), then the event.
    assert [g.reason for g in after.gaps] == [HUB_STOPPED, "record_sequence_reset"]
    assert after.gaps[1].from_ms == after.gaps[1].to_ms
    assert [r.value for r in after.of("glu")] == [float(r.mg_dl) for r in meter.records]
    old_keys = {r.record for r in before.of("glu")}
    new_keys = [r.record for r in after.of("glu")]
    assert [k.split(":")[1] for k in new_keys if k is not None] == ["1", "2"]
    assert not old_keys & set(new_keys)


async def read_all(meter: VirtualGlucoseMeter, adapter: SimAdapter) -> list[str | None]:
    """The record keys of one session's first fetch, without a cursor."""
    sink = MemorySink()
    s = session(meter, "glu", sink, adapter)
    async with running(s):
        await wait_until(lambda: s.stats.racp_completed >= 1, "records fetched")
    return [r.record for r in sink.of("glu")]


async def test_a_meter_read_again_without_a_cursor_gives_the_same_record_keys(
    radio: VirtualRadio, adapter: SimAdapter
) -> None:
    """A hub that lost its cursor (or stopped mid-fetch) reads the records again: each
    carries the key it had the first time, by which the gateway stores it once."""
    meter = VirtualGlucoseMeter("TS-GLU-AGAIN", seed=7, stored_records=4)
    async with meter.running(radio):
        keys = [await read_all(meter, adapter) for _ in range(2)]
    assert keys[0] == keys[1]
    assert len(set(keys[0])) == 4
    assert all(k is not None and k.startswith("g:") for k in keys[0])


async def test_glucose_cursor_moves_only_after_the_sink_made_records_durable(
    radio: VirtualRadio, adapter: SimAdapter, tmp_path: Path
) -> None:
    path = tmp_path / "hub.json"
    sink = MemorySink()
    sink.gate.clear()
    async with VirtualGlucoseMeter("TS-GLU-SLOW", stored_records=3).running(radio) as meter:
        s = session(meter, "glu", sink, adapter, state=HubState.open(path))
        async with running(s):
            await wait_until(lambda: s.stats.notifications >= 4, "records and response arrived")
            assert HubState.open(path).cursor("glu", GLUCOSE_CURSOR) is None
            sink.gate.set()
            await wait_until(
                lambda: HubState.open(path).cursor("glu", GLUCOSE_CURSOR) == 3, "cursor saved"
            )
    assert len(sink.of("glu")) == 3


async def test_clock_write_sets_the_wearable_clock_to_the_hub_time(
    radio: VirtualRadio, adapter: SimAdapter
) -> None:
    hub_now = datetime(2030, 3, 4, 5, 6, 7, 500_000, tzinfo=UTC)
    sink = MemorySink()
    cuff = VirtualBloodPressureCuff("TS-BPM-CLK", interval_s=None, clock_offset_s=-400 * 86_400.0)
    async with cuff.running(radio):
        s = session(cuff, "bp", sink, adapter, clock=hub_now.timestamp)
        async with running(s):
            await wait_until(lambda: s.stats.clock_writes >= 1, "clock written")
        assert cuff.clock_writes == [CurrentTime.from_datetime(hub_now)]
        # The cuff now runs on the hub's (fixed) clock: its next measurement is stamped so.
        assert abs(cuff.device_time() - hub_now) < timedelta(hours=1)
        assert cuff.measure().timestamp is not None


async def test_battery_notifications_update_the_provenance(
    radio: VirtualRadio, adapter: SimAdapter
) -> None:
    sink = MemorySink()
    async with VirtualHeartRateStrap("TS-HRM-BATT", battery_level=90).running(radio) as strap:
        s = session(strap, "hr", sink, adapter)
        async with running(s):
            await wait_until(lambda: s.stats.connects >= 1 and bool(sink.sensors), "described")
            await wait_until(lambda: s.stats.notifications >= 1, "subscribed and streaming")
            await strap.set_battery_level(42)
            await wait_until(lambda: sink.sensors[-1].battery_level == 42, "battery 42 %")
    assert sink.sensors[0].battery_level == 90
    assert sink.sensors[-1].model == "TS-HRM-1"
    assert s.stats.battery_updates >= 1


async def test_malformed_payloads_are_counted_as_gaps_and_other_wearables_keep_flowing(
    radio: VirtualRadio, adapter: SimAdapter
) -> None:
    bad = VirtualHeartRateStrap(
        "TS-HRM-BAD", seed=1, rate_hz=5.0, faults=Faults(corrupt_every=3, refuse_reads=True)
    )
    good = VirtualPulseOximeter("TS-OXI-OK", seed=2, rate_hz=5.0, spot_check_interval_s=None)
    sink = MemorySink()
    async with bad.running(radio), good.running(radio):
        sessions = [session(bad, "bad", sink, adapter), session(good, "good", sink, adapter)]
        with no_errors(*sessions):
            async with running(*sessions):
                await wait_until(
                    lambda: sessions[0].stats.malformed >= 3 and len(sink.of("good", "spo2")) >= 10,
                    "malformed seen while the other streams",
                )
    malformed = [g for g in sink.gaps if g.reason == "malformed_0x2A37"]
    assert len(malformed) == sessions[0].stats.malformed
    assert all(g.from_ms == g.to_ms for g in malformed)
    assert sessions[1].stats.malformed == 0
    assert sink.of("bad", "heart_rate"), "the faulty strap's good payloads are still readings"
    bad_info = next(i for i in sink.sensors if i.sensor == "bad")
    assert (bad_info.manufacturer, bad_info.battery_level) == (None, None)
    assert sessions[0].stats.connects == 1  # malformed data does not drop the link


async def test_a_failing_session_recovers_and_does_not_stop_the_others(
    radio: VirtualRadio, adapter: SimAdapter
) -> None:
    sink = MemorySink(fail_for=frozenset({"broken"}))
    one = VirtualHeartRateStrap("TS-HRM-X", seed=1, rate_hz=5.0)
    two = VirtualHeartRateStrap("TS-HRM-Y", seed=2, rate_hz=5.0)
    async with one.running(radio), two.running(radio):
        broken = session(one, "broken", sink, adapter)
        fine = session(two, "fine", sink, adapter)
        async with running(broken, fine):
            await wait_until(lambda: broken.stats.errors >= 2, "the broken session retried")
            count = len(sink.of("fine"))
            await wait_until(lambda: len(sink.of("fine")) > count + 5, "the other keeps flowing")
    assert broken.stats.last_error == "driver: RuntimeError"
    assert fine.stats.errors == 0
    assert any(g.reason == "driver_error" for g in sink.gaps)


def link(path: Path, sensor: str = "hr") -> LinkMark | None:
    return HubState.open(path).link(sensor)


def times(sink: MemorySink, sensor: str = "hr") -> list[int]:
    return [r.t_ms for r in sink.of(sensor, "heart_rate")]


async def restarted(
    strap: VirtualWearable, path: Path, adapter: SimAdapter, *, first_failures: int = 0
) -> MemorySink:
    """A new run of the hub (a new state object from the file, a new session and sink) on
    ``strap`` until the gap of the time it was not watched is recorded and readings follow;
    with ``first_failures``, the strap comes back only after that many failed connects."""
    sink = MemorySink()
    s = session(strap, "hr", sink, adapter, state=HubState.open(path))
    with no_errors(s):
        async with running(s):
            if first_failures:
                await wait_until(lambda: s.stats.connect_failures >= first_failures, "unreached")
                await strap.come_back()
            await wait_until(lambda: bool(sink.gaps), "the gap recorded")
            await wait_until(lambda: len(times(sink)) >= 3, "readings after the restart")
    return sink


async def test_an_outage_open_when_the_hub_stopped_keeps_its_start_and_reason(
    radio: VirtualRadio, adapter: SimAdapter, tmp_path: Path
) -> None:
    path = tmp_path / "hub.json"
    strap = VirtualHeartRateStrap("TS-HRM-AWAY", seed=8, rate_hz=5.0)
    async with strap.running(radio):
        before = MemorySink()
        s = session(strap, "hr", before, adapter, state=HubState.open(path))
        async with running(s):
            await wait_until(lambda: len(times(before)) >= 3, "streaming")
            await strap.go_out_of_range()
            await wait_until(lambda: (link(path) or LinkMark(0)).outage is not None, "loss kept")
        lost = link(path)
        assert lost is not None
        assert lost.outage == OUT_OF_RANGE
        assert before.gaps == []  # the outage was still open when the hub stopped
        assert max(times(before)) <= lost.at_ms

        after = await restarted(strap, path, adapter, first_failures=1)
    (gap,) = after.gaps
    assert gap == Gap(lost.at_ms, gap.to_ms, OUT_OF_RANGE, "hr")
    assert gap.to_ms <= min(times(after))
    resumed = link(path)
    assert resumed is not None
    assert resumed.outage is None  # the gap is recorded: the next restart gives no second one


async def test_a_hub_stopped_while_connected_records_the_time_it_did_not_watch(
    radio: VirtualRadio, adapter: SimAdapter, tmp_path: Path
) -> None:
    path = tmp_path / "hub.json"
    strap = VirtualHeartRateStrap("TS-HRM-STOP", seed=9, rate_hz=5.0)
    async with strap.running(radio):
        before = MemorySink()
        s = session(strap, "hr", before, adapter, state=HubState.open(path))
        async with running(s):
            await wait_until(lambda: len(times(before)) >= 3, "streaming")
        stopped = link(path)
        assert stopped is not None
        assert stopped.outage is None
        assert max(times(before)) <= stopped.at_ms  # watched up to the clean stop
        after = await restarted(strap, path, adapter)
    (gap,) = after.gaps
    assert gap == Gap(stopped.at_ms, gap.to_ms, HUB_STOPPED, "hr")
    assert gap.to_ms <= min(times(after))
    assert before.gaps == []


async def watched_for(path: Path, intervals: int, interval_s: float) -> None:
    """Until the wearable's link mark, once written, has been written again at each of the
    next ``intervals`` intervals while connected."""
    await wait_until(lambda: link(path) is not None, "connected, link written")
    first = link(path)
    assert first is not None
    for n in range(1, intervals + 1):
        await wait_until(
            lambda n=n: (link(path) or first).at_ms >= first.at_ms + n * interval_s * 1000,
            f"the link written again ({n})",
        )


async def test_after_a_power_cut_the_gap_starts_at_most_one_interval_before_the_last_reading(
    radio: VirtualRadio, adapter: SimAdapter, tmp_path: Path
) -> None:
    """The state file as a power cut leaves it: the last mark written while connected (no
    clean stop). The cut comes while the sink makes a reading durable, as it may."""
    interval_s = 0.3
    path = tmp_path / "hub.json"
    strap = VirtualHeartRateStrap("TS-HRM-CUT", seed=10, rate_hz=10.0)
    async with strap.running(radio):
        before = MemorySink()
        s = session(
            strap, "hr", before, adapter, state=HubState.open(path), link_interval_s=interval_s
        )
        async with running(s):
            await watched_for(path, 3, interval_s)
            before.gate.clear()
            await wait_until(lambda: before.held >= 1, "a reading on its way to the disk")
            on_disk, last = path.read_bytes(), max(times(before))
        path.write_bytes(on_disk)  # what the clean stop wrote is lost with the power
        cut = link(path)
        assert cut is not None
        assert cut.outage is None
        after = await restarted(strap, path, adapter)
    (gap,) = after.gaps
    assert gap == Gap(cut.at_ms, gap.to_ms, HUB_STOPPED, "hr")
    assert last - gap.from_ms <= interval_s * 1000 + 1  # + 1: times are whole milliseconds


async def test_a_quiet_connected_wearable_is_still_marked_watched_every_interval(
    radio: VirtualRadio, adapter: SimAdapter, tmp_path: Path
) -> None:
    """The session's loop waits on its queue alone; a timer wakes it when the link is due
    to be written, so a wearable that sends nothing for a while is still watched."""
    interval_s = 0.2
    path = tmp_path / "hub.json"
    strap = VirtualHeartRateStrap("TS-HRM-QUIET", seed=12, rate_hz=0.02)  # one per 50 s
    async with strap.running(radio):
        sink = MemorySink()
        s = session(
            strap, "hr", sink, adapter, state=HubState.open(path), link_interval_s=interval_s
        )
        async with running(s):
            await watched_for(path, 5, interval_s)
            assert s.stats.notifications <= 1
            assert s.stats.connected


async def test_a_damaged_link_mark_is_ignored_and_written_anew(
    radio: VirtualRadio, adapter: SimAdapter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "hub.json"
    hostile = {"at_ms": 2**70, "outage": "\u0000" * 500}
    path.write_text(json.dumps({"version": 1, "wearables": [], "links": {"hr": hostile}}))
    sink = MemorySink()
    async with VirtualHeartRateStrap("TS-HRM-JUNK", seed=11, rate_hz=5.0).running(radio) as strap:
        s = session(strap, "hr", sink, adapter, state=HubState.open(path))
        with no_errors(s):
            async with running(s):
                await wait_until(lambda: len(times(sink)) >= 3, "streaming")
    assert "link mark ignored sensor='hr'" in caplog.text
    assert sink.gaps == []
    mark = link(path)
    assert mark is not None
    assert mark.outage is None
