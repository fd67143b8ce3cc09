"""One way to build a hub from its enrolled identity: the outbox, state and status files in
its directory, a certificate keeper, sessions for the named wearables and for every wearable
paired in the state file (so `hub run` after a restart still reads them)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from device_drivers import hub as hub_module
from device_drivers.driver import WearableSpec
from device_drivers.hub_factory import OUTBOX_FILE, STATE_FILE, open_hub
from device_drivers.outbox import OutboxError
from device_drivers.sim import VirtualHeartRateStrap, VirtualRadio
from device_drivers.state import HubState, PairedWearable
from tests.fixtures.gateway import RunningGateway
from tests.fixtures.hubs import enrolled_hub, open_simulated_hub
from tests.fixtures.trial import Trial
from tests.fixtures.waiting import wait_until


async def test_a_hub_has_its_files_keeper_and_every_paired_wearable(
    trial: Trial, gateway: RunningGateway, tmp_path: Path
) -> None:
    identity = await enrolled_hub(trial, gateway, tmp_path / "hub")
    state = HubState.open(identity.directory / STATE_FILE)
    state.remember(PairedWearable("AA:00:00:00:00:01", "bp-cuff", "blood_pressure", True, user=2))
    state.remember(PairedWearable("AA:00:00:00:00:02", "strap", "heart_rate", True))
    async with contextlib.AsyncExitStack() as stack:
        parts = await open_hub(
            identity, stack, wearables=[WearableSpec("AA:00:00:00:00:02", "strap")]
        )
        assert parts.hub.keeper is not None
        assert parts.outbox.path == identity.directory / OUTBOX_FILE
        by_sensor = {s.spec.sensor: s for s in parts.sessions}
        # The named strap once, the paired cuff with its user, all on the hub's state file.
        assert sorted(by_sensor) == ["bp-cuff", "strap"]
        assert by_sensor["bp-cuff"].spec.user == 2
        assert all(s.state is parts.state for s in parts.sessions)
        assert parts.relay.config.device_id == identity.device_id
    # The stack closed the outbox.
    with pytest.raises(OutboxError, match="closed"):
        parts.outbox.stats()


async def test_a_running_hub_follows_pair_and_unpair(
    trial: Trial, gateway: RunningGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pair` and `unpair` while the service runs: the hub reads the state file again, gives
    the new wearable its session (its readings reach the outbox) and ends the unpaired one's;
    the wearable named on its command line stays whatever the file says."""
    monkeypatch.setattr(hub_module, "PAIRINGS_INTERVAL_S", 0.05)
    identity = await enrolled_hub(trial, gateway, tmp_path / "hub")
    async with VirtualRadio() as radio, contextlib.AsyncExitStack() as stack:
        named = await stack.enter_async_context(
            VirtualHeartRateStrap("TS-HRM-NAMED", seed=1, rate_hz=4.0).running(radio)
        )
        later = await stack.enter_async_context(
            VirtualHeartRateStrap("TS-HRM-LATER", seed=2, rate_hz=4.0).running(radio)
        )
        parts = await open_simulated_hub(
            identity, stack, radio, [WearableSpec(named.address, "strap-named")]
        )
        task = asyncio.create_task(parts.hub.run())
        try:

            def reading(sensor: str) -> bool:
                return any(
                    s.spec.sensor == sensor and s.stats.readings > 0 for s in parts.hub.sessions
                )

            await wait_until(lambda: reading("strap-named"), "the named strap read")
            # `pair` in another process: the state file gains the second strap.
            other = HubState.open(identity.directory / STATE_FILE)
            other.remember(PairedWearable(later.address, "strap-later", "heart_rate", True))
            await wait_until(lambda: reading("strap-later"), "the strap paired meanwhile read")
            # `unpair` of both: the paired one's session ends, the named one's stays.
            other.forget(later.address)
            other.forget(named.address)
            await wait_until(
                lambda: [s.spec.sensor for s in parts.hub.sessions] == ["strap-named"],
                "the unpaired strap's session ended",
            )
            assert HubState.open(identity.directory / STATE_FILE).wearables == ()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
