"""One way to build a hub from its enrolled identity: the outbox, state and status files in
its directory, a certificate keeper, sessions for the named wearables and for every wearable
paired in the state file (so `hub run` after a restart still reads them)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from device_drivers.driver import WearableSpec
from device_drivers.hub_factory import OUTBOX_FILE, STATE_FILE, open_hub
from device_drivers.outbox import OutboxError
from device_drivers.state import HubState, PairedWearable
from tests.fixtures.gateway import RunningGateway
from tests.fixtures.hubs import enrolled_hub
from tests.fixtures.trial import Trial


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
