"""The hub: wearable sessions feed the durable outbox; the relay drains it to the gateway.

Each wearable runs as its own supervised task: an exception in one session is logged and
the session restarted after a pause, and the other wearables and the relay go on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from device_drivers.driver import ReadingSink, SensorInfo, WearableSession
from device_drivers.outbox import Outbox, OutboxFull
from device_drivers.relay import Relay
from ingest.model import Gap, Reading

log = logging.getLogger(__name__)

# A session that crashed (a bug, not a lost wearable: those are handled inside the session)
# is restarted after this pause, so a fault that repeats does not spin the hub's CPU.
RESTART_PAUSE_S = 5.0


@dataclass
class OutboxSink(ReadingSink):
    """Makes readings durable in the outbox; provenance is kept for the hub's status."""

    outbox: Outbox
    sensors: dict[str, SensorInfo] = field(default_factory=dict)
    refused_full: int = 0

    async def readings(self, readings: Sequence[Reading]) -> None:
        try:
            await asyncio.to_thread(self.outbox.add_readings, readings)
        except OutboxFull:
            # The bound is reached: the readings cannot be kept, and the span says so.
            self.refused_full += len(readings)
            times = [r.t_ms for r in readings]
            await asyncio.to_thread(self.outbox.add_gap, Gap(min(times), max(times), "outbox_full"))
            log.error("outbox full: %d readings not kept, gap recorded", len(readings))

    async def gap(self, gap: Gap) -> None:
        await asyncio.to_thread(self.outbox.add_gap, gap)

    async def sensor(self, info: SensorInfo) -> None:
        self.sensors[info.sensor] = info


class Hub:
    def __init__(self, relay: Relay, sessions: Sequence[WearableSession]) -> None:
        self.relay = relay
        self.sessions = list(sessions)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.relay.run(), name="hub-relay")
            for session in self.sessions:
                tg.create_task(self._supervise(session), name=f"wearable-{session.spec.sensor}")

    async def _supervise(self, session: WearableSession) -> None:
        while True:
            try:
                await session.run()
            except asyncio.CancelledError:
                raise
            except Exception:  # one wearable's bug must not stop the others
                log.exception("wearable session crashed sensor=%s; restarting", session.spec.sensor)
                session.stats.last_error = "crashed"
                await asyncio.sleep(RESTART_PAUSE_S)
