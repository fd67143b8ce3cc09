"""device_drivers.pairing on the virtual radio, in one process: what a pairing reads and
sets, how each way it fails is told apart, and that a failed or cancelled one leaves the
hub's state as it was. (The command line around it: test_pairing_cli.py.)"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from bumble.pairing import PairingDelegate
from hypothesis import given
from hypothesis import strategies as st

from device_drivers.gatt.current_time import CurrentTime
from device_drivers.pairing import (
    BadPasskey,
    BleBackends,
    PairingFailed,
    PasskeyNotGiven,
    PasskeyRejected,
    PromptPairingAgent,
    SensorNameTaken,
    WearableDetails,
    discover,
    pair_and_set_up,
    parse_passkey,
)
from device_drivers.sim import (
    SimAdapter,
    VirtualBloodPressureCuff,
    VirtualHeartRateStrap,
    VirtualRadio,
    VirtualThermometer,
)
from device_drivers.state import HubState, PairedWearable

PASSKEY = 271_828
FAST_SCAN_S = 1.0
DEADLINE_S = 15.0
HUB_NOW = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)


class Answers:
    """Plays the participant: answers each question with what it was given, and counts."""

    def __init__(self, passkey: int | None = None, *, same_number: bool = True) -> None:
        self.passkey_to_give = passkey
        self.same_number = same_number
        self.asked: list[tuple[str, str]] = []
        self.shown: list[int] = []

    async def passkey(self, sensor: str) -> int | None:
        self.asked.append(("passkey", sensor))
        return self.passkey_to_give

    async def confirm(self, sensor: str, number: int) -> bool:
        self.asked.append(("confirm", sensor))
        self.shown.append(number)
        return self.same_number


class NobodyAnswers:
    """A question nobody answers (the participant walked away)."""

    def __init__(self) -> None:
        self.waiting = asyncio.Event()

    async def passkey(self, sensor: str) -> int | None:
        self.waiting.set()
        await asyncio.Event().wait()
        return None

    async def confirm(self, sensor: str, number: int) -> bool:
        self.waiting.set()
        await asyncio.Event().wait()
        return False


def passkey_cuff(name: str = "TS-BPM-PIN", **options: object) -> VirtualBloodPressureCuff:
    return VirtualBloodPressureCuff(
        name,
        interval_s=None,
        passkey=PASSKEY,
        io_capability=PairingDelegate.IoCapability.DISPLAY_OUTPUT_ONLY,
        require_authentication=True,
        clock_offset_s=-30 * 86_400.0,
        **options,  # type: ignore[arg-type]
    )


@pytest.fixture
async def radio() -> AsyncIterator[VirtualRadio]:
    async with VirtualRadio() as radio:
        yield radio


@pytest.fixture
def state(tmp_path: Path) -> HubState:
    return HubState.open(tmp_path / "state.json")


@contextlib.asynccontextmanager
async def hub_adapter(
    radio: VirtualRadio, state: HubState, answers: object | None
) -> AsyncIterator[tuple[BleBackends, PromptPairingAgent | None]]:
    agent = None if answers is None else PromptPairingAgent(answers, state)  # type: ignore[arg-type]
    adapter = await SimAdapter.create(radio, agent=agent)
    try:
        yield BleBackends(adapter.scanner_backend, adapter.client_backend), agent
    finally:
        await adapter.close()


async def test_a_passkey_pairing_bonds_reads_the_cuff_and_sets_its_clock(
    radio: VirtualRadio, state: HubState, tmp_path: Path
) -> None:
    answers = Answers(PASSKEY)
    async with passkey_cuff().running(radio) as cuff, hub_adapter(radio, state, answers) as hub:
        backends, agent = hub
        done = await pair_and_set_up(
            cuff.address,
            "bp-cuff",
            state,
            backends,
            agent=agent,
            user=2,
            clock=HUB_NOW.timestamp,
            scan_timeout_s=FAST_SCAN_S,
        )
        assert cuff.displayed_passkey == PASSKEY
        assert cuff.pairings == 1
    assert answers.asked == [("passkey", "bp-cuff")]
    expected = PairedWearable(cuff.address, "bp-cuff", "blood_pressure", bonded=True, user=2)
    assert done.wearable == expected
    assert done.details == WearableDetails(
        manufacturer="Trialstream Simulated Devices",
        model="TS-BPM-1",
        serial="BPM-00000000",
        firmware="2.1.0",
        hardware="rev A",
        battery_level=100,
        clock_set=True,
    )
    assert cuff.clock_writes == [CurrentTime.from_datetime(HUB_NOW)]
    assert abs(cuff.device_time() - HUB_NOW) < timedelta(hours=1)
    assert HubState.open(tmp_path / "state.json").wearables == (expected,)


async def test_a_wrong_passkey_is_told_apart_and_leaves_the_state_as_it_was(
    radio: VirtualRadio, state: HubState, tmp_path: Path
) -> None:
    earlier = PairedWearable("C0:5E:00:00:99:99", "strap", "heart_rate", bonded=True)
    state.remember(earlier)
    async with passkey_cuff().running(radio) as cuff:
        async with hub_adapter(radio, state, Answers(PASSKEY + 1)) as (backends, agent):
            with pytest.raises(PasskeyRejected, match="bp-cuff refused the passkey"):
                async with asyncio.timeout(DEADLINE_S):
                    await pair_and_set_up(
                        cuff.address,
                        "bp-cuff",
                        state,
                        backends,
                        agent=agent,
                        scan_timeout_s=FAST_SCAN_S,
                    )
        assert cuff.clock_writes == []
    assert state.wearables == (earlier,)
    assert HubState.open(tmp_path / "state.json").wearables == (earlier,)


async def test_no_passkey_given_is_not_a_wrong_one(radio: VirtualRadio, state: HubState) -> None:
    async with (
        passkey_cuff().running(radio) as cuff,
        hub_adapter(radio, state, Answers(None)) as (backends, agent),
    ):
        with pytest.raises(PasskeyNotGiven, match="asked for the passkey it shows"):
            await pair_and_set_up(
                cuff.address,
                "bp-cuff",
                state,
                backends,
                agent=agent,
                scan_timeout_s=FAST_SCAN_S,
            )
    assert state.wearables == ()


async def test_a_wearable_that_insists_on_a_passkey_refuses_just_works(
    radio: VirtualRadio, state: HubState
) -> None:
    async with (
        passkey_cuff().running(radio) as cuff,
        hub_adapter(radio, state, None) as (backends, agent),  # a headless hub
    ):
        with pytest.raises(PairingFailed) as info:
            await pair_and_set_up(
                cuff.address,
                "bp-cuff",
                state,
                backends,
                agent=agent,
                scan_timeout_s=FAST_SCAN_S,
            )
    assert type(info.value) is PairingFailed  # no passkey was asked, none refused
    assert state.wearables == ()


async def test_just_works_asks_nothing_and_still_reads_and_sets_the_clock(
    radio: VirtualRadio, state: HubState
) -> None:
    answers = Answers(PASSKEY)
    thermometer = VirtualThermometer("TS-THERMO-JW", interval_s=None, require_encryption=True)
    async with thermometer.running(radio) as t, hub_adapter(radio, state, answers) as hub:
        done = await pair_and_set_up(
            t.address,
            "thermo",
            state,
            hub[0],
            agent=hub[1],
            clock=HUB_NOW.timestamp,
            scan_timeout_s=FAST_SCAN_S,
        )
    assert answers.asked == []
    assert done.wearable == PairedWearable(t.address, "thermo", "thermometer", bonded=True)
    assert done.details.model == "TS-THERMO-1"
    assert done.details.clock_set
    assert t.clock_writes == [CurrentTime.from_datetime(HUB_NOW)]


@pytest.mark.parametrize("same", [True, False])
async def test_numeric_comparison_pairs_only_when_the_numbers_match(
    radio: VirtualRadio, state: HubState, same: bool
) -> None:
    answers = Answers(same_number=same)
    strap = VirtualHeartRateStrap(
        "TS-HRM-NC",
        io_capability=PairingDelegate.IoCapability.DISPLAY_OUTPUT_AND_YES_NO_INPUT,
        require_authentication=True,
    )
    async with strap.running(radio), hub_adapter(radio, state, answers) as (backends, agent):
        pairing = pair_and_set_up(
            strap.address, "hr", state, backends, agent=agent, scan_timeout_s=FAST_SCAN_S
        )
        if same:
            done = await pairing
            assert done.wearable.bonded
            assert not done.details.clock_set  # the strap has no Current Time
        else:
            with pytest.raises(PasskeyNotGiven):
                await pairing
            assert state.wearables == ()
    assert answers.asked == [("confirm", "hr")]
    assert answers.shown == [strap.displayed_passkey]


async def test_a_taken_sensor_name_is_refused_before_anything_is_sent(
    radio: VirtualRadio, state: HubState
) -> None:
    state.remember(PairedWearable("C0:5E:00:00:99:99", "bp-cuff", "blood_pressure", True))
    answers = Answers(PASSKEY)
    async with passkey_cuff().running(radio) as cuff:
        async with hub_adapter(radio, state, answers) as (backends, agent):
            with pytest.raises(SensorNameTaken, match="taken by C0:5E:00:00:99:99"):
                await pair_and_set_up(cuff.address, "bp-cuff", state, backends, agent=agent)
        assert not cuff.is_connected
        assert cuff.pairings == 0
    assert answers.asked == []
    assert [w.sensor for w in state.wearables] == ["bp-cuff"]


async def test_a_pairing_cancelled_while_the_passkey_is_asked_records_nothing(
    radio: VirtualRadio, state: HubState, tmp_path: Path
) -> None:
    nobody = NobodyAnswers()
    async with (
        passkey_cuff().running(radio) as cuff,
        hub_adapter(radio, state, nobody) as (backends, agent),
    ):
        pairing = asyncio.create_task(
            pair_and_set_up(
                cuff.address,
                "bp-cuff",
                state,
                backends,
                agent=agent,
                scan_timeout_s=FAST_SCAN_S,
            ),
            name="test-pairing",
        )
        async with asyncio.timeout(DEADLINE_S):
            await nobody.waiting.wait()
        assert [w.bonded for w in state.wearables] == [False]  # while it is asked
        pairing.cancel()  # Ctrl-C
        with pytest.raises(asyncio.CancelledError):
            await pairing
    assert state.wearables == ()
    assert HubState.open(tmp_path / "state.json").wearables == ()


async def test_the_scan_lists_name_signal_and_advertised_services(
    radio: VirtualRadio, state: HubState
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        cuff = await stack.enter_async_context(passkey_cuff("TS-BPM-SCAN").running(radio))
        strap = await stack.enter_async_context(VirtualHeartRateStrap("TS-HRM-SCAN").running(radio))
        backends, _agent = await stack.enter_async_context(hub_adapter(radio, state, None))
        found = {w.address: w for w in await discover(backends, timeout_s=0.5)}
    assert (found[cuff.address].name, found[cuff.address].services) == (
        "TS-BPM-SCAN",
        ("Blood Pressure",),
    )
    assert (found[strap.address].name, found[strap.address].services) == (
        "TS-HRM-SCAN",
        ("Heart Rate",),
    )
    assert all(-127 <= w.rssi <= 20 for w in found.values())


@pytest.mark.parametrize("number", [0, 7, 123_456, 999_999])
def test_a_passkey_is_six_digits_leading_zeros_included(number: int) -> None:
    assert parse_passkey(f"{number:06d}") == number


@given(st.text())
def test_any_text_is_a_passkey_or_refused(text: str) -> None:
    try:
        passkey = parse_passkey(text)
    except BadPasskey:
        return
    assert 0 <= passkey <= 999_999
    assert text == f"{passkey:06d}"
