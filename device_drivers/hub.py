"""The hub: wearable sessions feed the durable outbox; the relay drains it to the gateway.

Each wearable runs as its own supervised task: an exception in one session is logged and
the session restarted after a pause, and the other wearables and the relay go on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from device_drivers.clock import HubClock
from device_drivers.credentials import CertificateKeeper
from device_drivers.disk import on_disk
from device_drivers.driver import ReadingSink, SensorInfo, WearableSession
from device_drivers.identity import write_whole
from device_drivers.outbox import Outbox, OutboxError, OutboxFull
from device_drivers.relay import Relay
from device_drivers.state import HubState, PairedWearable, StateError
from ingest.model import Gap, Reading, SensorReport

log = logging.getLogger(__name__)

# A session that crashed (a bug, not a lost wearable: those are handled inside the session)
# is restarted after this pause, so a fault that repeats does not spin the hub's CPU.
RESTART_PAUSE_S = 5.0
STATUS_INTERVAL_S = 2.0
# How often the hub looks at its time zone (a participant who travels with a phone hub, or a
# daylight-saving zone set by hand): a change reaches the gateway with the next envelope.
TIME_ZONE_INTERVAL_S = 60.0
# How often the hub reads its state file again for wearables paired or unpaired meanwhile.
PAIRINGS_INTERVAL_S = 10.0
OUTBOX_FULL = "outbox_full"
# The outbox's writes are grouped: readings handed over within this long of each other are
# made durable in one transaction (a fsync each is most of a busy hub's CPU). Readings are
# in memory for at most this long more before they are on disk.
COMMIT_LINGER_S = 0.2
# Readings handed to the sink and the future their caller awaits (the write's outcome).
_Waiting = tuple[Sequence[Reading], "asyncio.Future[OutboxError | None]"]


@dataclass
class OutboxSink(ReadingSink):
    """Makes readings durable in the outbox; provenance is kept for the hub's status.

    ``clock`` is the hub's wall clock: the sessions that feed this sink stamp readings with
    it (``WearableSession(..., clock=sink.clock)``), and the backward jumps it notices are
    recorded here as ``clock_jump`` gaps, ahead of the readings that follow them.
    """

    outbox: Outbox
    clock: HubClock = field(default_factory=HubClock)
    sensors: dict[str, SensorInfo] = field(default_factory=dict)
    refused_full: int = 0
    # The hub's time zone as last noted (None: none known).
    time_zone: str | None = None
    # (time, value) of the newest reading per metric: the participant's own hub shows it.
    latest: dict[str, tuple[int, float]] = field(default_factory=dict)
    # An outbox_full span not yet recorded (the gap itself found no room): kept, widened by
    # later refusals, and recorded as soon as the outbox takes a gap again.
    _unrecorded_full: Gap | None = field(default=None, init=False, repr=False)
    # How long the first of several readings calls waits for others to share its write.
    commit_linger_s: float = COMMIT_LINGER_S
    _waiting: list[_Waiting] = field(default_factory=list, init=False, repr=False)
    _committer: asyncio.Task[None] | None = field(default=None, init=False, repr=False)

    async def readings(self, readings: Sequence[Reading]) -> None:
        """Returns once ``readings`` are durable. Calls made within ``COMMIT_LINGER_S`` of
        each other (every wearable's) share one outbox transaction: one fsync, not one each."""
        await self._record_pending()
        done: asyncio.Future[OutboxError | None] = asyncio.get_running_loop().create_future()
        self._waiting.append((readings, done))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_waiting(), name="hub-outbox")
        try:
            exc = await asyncio.shield(done)
        except asyncio.CancelledError:
            # The caller stops (its wearable's session ends): what it handed over is on disk
            # first, written here if the committer has not taken it yet.
            self._write_waiting_now()
            if not done.done():
                await done
            raise
        if isinstance(exc, OutboxFull):
            # The bound (or the disk) is reached: the readings cannot be kept; the span says so.
            self.refused_full += len(readings)
            times = [r.t_ms for r in readings]
            span = Gap(min(times), max(times), OUTBOX_FULL)
            if self._unrecorded_full is not None:
                span = _widen(self._unrecorded_full, span)
            self._unrecorded_full = span
            log.error(
                "outbox full: readings not kept count=%d used_bytes=%d max_bytes=%d",
                len(readings),
                exc.used_bytes,
                exc.max_bytes,
            )
            await self._record_pending()
            return
        if exc is not None:
            raise exc
        for r in readings:
            if r.t_ms >= self.latest.get(r.metric, (-1, 0.0))[0]:
                self.latest[r.metric] = (r.t_ms, r.value)

    async def _commit_waiting(self) -> None:
        """Write what waits, after a short linger that lets other wearables' readings join,
        until nothing waits. Cancelled (the hub stopping), it still writes what it was handed."""
        while self._waiting:
            try:
                await asyncio.sleep(self.commit_linger_s)
            except asyncio.CancelledError:
                self._write_waiting_now()
                raise
            parts, self._waiting = self._waiting, []
            try:
                outcomes = await on_disk(self._write_parts, [r for r, _ in parts])
            except Exception as exc:  # noqa: BLE001 - not a refusal: every caller is told
                for _, done in parts:
                    if not done.done():
                        done.set_exception(exc)
                continue
            _settle(parts, outcomes)

    def _write_waiting_now(self) -> None:
        """Write what waits in this thread (the loop's), when there is no time to linger."""
        parts, self._waiting = self._waiting, []
        _settle(parts, self._write_parts([r for r, _ in parts]))

    def _write_parts(self, parts: list[Sequence[Reading]]) -> list[OutboxError | None]:
        """One transaction for every part; if it is refused, each part on its own, so that a
        part that does not fit or is invalid fails alone and the others are kept."""
        try:
            self.outbox.add_readings([r for part in parts for r in part])
        except OutboxError as exc:
            if len(parts) == 1:
                return [exc]
            return [self._write_one(part) for part in parts]
        return [None] * len(parts)

    def _write_one(self, part: Sequence[Reading]) -> OutboxError | None:
        try:
            self.outbox.add_readings(part)
        except OutboxError as exc:
            return exc
        return None

    async def gap(self, gap: Gap) -> None:
        await self._record_pending()
        await on_disk(self.outbox.add_gap, gap)

    async def sensor(self, info: SensorInfo) -> None:
        """Record what the wearable says about itself; it travels with the next envelope."""
        await self._record_pending()
        self.sensors[info.sensor] = info
        report = SensorReport(
            info.sensor,
            info.manufacturer,
            info.model,
            info.serial,
            info.firmware,
            info.hardware,
            info.battery_level,
            info.paired_user,
        )
        await on_disk(self.outbox.add_sensor, report)

    async def note_time_zone(self, zone: str) -> None:
        """The hub's zone now; a change is kept in the outbox for the next envelope."""
        now_ms = int(self.clock() * 1000)
        if await on_disk(self.outbox.note_time_zone, zone, now_ms):
            log.info("time zone %s from now on; the gateway is told with the next envelope", zone)
        self.time_zone = zone

    async def _record_pending(self) -> None:
        """Record the clock jumps noticed so far, and an outbox_full span still unrecorded.

        Either kind that finds the outbox full stays pending (nothing is lost) and is tried
        again on the next call.
        """
        self.clock()  # a jump is noticed here too, even if no session read the clock since
        jumps = self.clock.take_jumps()
        for i, jump in enumerate(jumps):
            try:
                await on_disk(self.outbox.add_gap, jump)
            except OutboxFull:
                self.clock.give_back(jumps[i:])
                log.error("outbox full: clock jump gap kept in memory count=%d", len(jumps) - i)
                break
            log.warning("clock jump recorded as a gap span_ms=%d", jump.to_ms - jump.from_ms)
        if self._unrecorded_full is not None:
            try:
                await on_disk(self.outbox.add_gap, self._unrecorded_full)
            except OutboxFull:
                log.error("outbox full: the gap saying so is kept in memory until it fits")
            else:
                self._unrecorded_full = None


def _last_connected(path: Path, now_ms: int) -> int | None:
    """Since when the previous run's status file says the broker was not reached: its
    ``broker_offline_since_ms``, or its time if it was connected then. A hub restarted while
    offline (a power cut, a crash) so keeps counting from when it lost the broker. A file
    that is missing, unreadable or says nothing plausible gives None."""
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(previous, dict):
        return None
    key = "written_at_ms" if previous.get("broker_connected") is True else "broker_offline_since_ms"
    since = previous.get(key)
    if not isinstance(since, int) or isinstance(since, bool) or not 0 <= since <= now_ms:
        return None
    return since


def _settle(parts: list[_Waiting], outcomes: list[OutboxError | None]) -> None:
    for (_, done), outcome in zip(parts, outcomes, strict=True):
        if not done.done():
            done.set_result(outcome)


def _widen(a: Gap, b: Gap) -> Gap:
    return Gap(min(a.from_ms, b.from_ms), max(a.to_ms, b.to_ms), a.reason)


@dataclass(frozen=True)
class Pairings:
    """What lets a running hub follow ``pair`` and ``unpair``: the state file, how to make a
    paired wearable's session, and the addresses named on the command line (kept whatever
    the file says)."""

    state: HubState
    session: Callable[[PairedWearable], WearableSession]
    named: frozenset[str] = frozenset()


class Hub:
    def __init__(
        self,
        relay: Relay,
        sessions: Sequence[WearableSession],
        sink: OutboxSink | None = None,
        *,
        status_path: Path | None = None,
        keeper: CertificateKeeper | None = None,
        time_zone: Callable[[], str | None] | None = None,
        pairings: Pairings | None = None,
    ) -> None:
        self.relay = relay
        self.sessions = list(sessions)
        self.sink = sink
        self.status_path = status_path
        self.keeper = keeper
        self.time_zone = time_zone
        self.pairings = pairings
        self._broker_offline_since_ms: int | None = None
        self._session_tasks: dict[str, asyncio.Task[None]] = {}

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.relay.run(), name="hub-relay")
            for session in self.sessions:
                self._start(tg, session)
            if self.pairings is not None:
                tg.create_task(self._follow_pairings(tg, self.pairings), name="hub-pairings")
            if self.status_path is not None:
                tg.create_task(self._write_status(self.status_path), name="hub-status")
            if self.keeper is not None:
                # Ends only by raising HubWithdrawn, which stops every other task too.
                tg.create_task(self.keeper.run(), name="hub-credentials")
            if self.time_zone is not None and self.sink is not None:
                tg.create_task(self.watch_time_zone(self.time_zone, self.sink), name="hub-zone")

    def status(self) -> dict[str, Any]:
        """What ``trialstream hub status`` shows (besides the outbox, which it reads itself)."""
        now_ms = int(time.time() * 1000)
        return {
            "device_id": self.relay.config.device_id,
            "written_at_ms": now_ms,
            "broker_connected": self.relay.stats.connected,
            "broker_offline_since_ms": self._offline_since(now_ms),
            "relay": asdict(self.relay.stats),
            "wearables": [
                {
                    "sensor": s.spec.sensor,
                    "address": s.spec.address,
                    "connected": s.stats.connected,
                    "connects": s.stats.connects,
                    "readings": s.stats.readings,
                    "malformed": s.stats.malformed,
                    "gaps": s.stats.gaps,
                    "last_error": s.stats.last_error,
                    "info": asdict(s.stats.info) if s.stats.info else None,
                }
                for s in self.sessions
            ],
            "latest": {
                metric: {"t_ms": t, "value": v}
                for metric, (t, v) in (self.sink.latest.items() if self.sink else ())
            },
            "refused_outbox_full": self.sink.refused_full if self.sink else 0,
            "certificate": (
                {"renewals": self.keeper.renewals, "last_error": self.keeper.last_error}
                if self.keeper
                else None
            ),
            "clock_jumps": self.sink.clock.jumps_seen if self.sink else 0,
            "time_zone": self.sink.time_zone if self.sink else None,
        }

    def _offline_since(self, now_ms: int) -> int | None:
        """Since when the relay has not been connected to the broker (None: it is), as seen
        at each status write: a hub offline for hours is told apart from a blip."""
        if self.relay.stats.connected:
            self._broker_offline_since_ms = None
        elif self._broker_offline_since_ms is None:
            self._broker_offline_since_ms = now_ms
        return self._broker_offline_since_ms

    async def _write_status(self, path: Path) -> None:
        previous = await on_disk(_last_connected, path, int(time.time() * 1000))
        if self._broker_offline_since_ms is None:
            self._broker_offline_since_ms = previous
        while True:
            text = json.dumps(self.status(), indent=2) + "\n"
            await on_disk(write_whole, path, text)
            await asyncio.sleep(STATUS_INTERVAL_S)

    @staticmethod
    async def watch_time_zone(read: Callable[[], str | None], sink: OutboxSink) -> None:
        """Note the hub's zone in the outbox now and every ``TIME_ZONE_INTERVAL_S``: a new
        one travels with the next envelope (protocol v3). A failure is logged and retried."""
        while True:
            try:
                zone = await on_disk(read)
                if zone is not None:
                    await sink.note_time_zone(zone)
            except OutboxError as exc:
                log.warning("time zone not noted: %s", exc)
            await asyncio.sleep(TIME_ZONE_INTERVAL_S)

    def _start(self, tg: asyncio.TaskGroup, session: WearableSession) -> None:
        task = tg.create_task(self._supervise(session), name=f"wearable-{session.spec.sensor}")
        self._session_tasks[session.spec.address] = task

    async def _follow_pairings(self, tg: asyncio.TaskGroup, pairings: Pairings) -> None:
        """Every ``PAIRINGS_INTERVAL_S``, read the state file again: a wearable paired since
        (``pair`` while the service runs) gets its session, one unpaired loses it."""
        while True:
            await asyncio.sleep(PAIRINGS_INTERVAL_S)
            try:
                await on_disk(pairings.state.reload)
            except StateError as exc:
                log.warning("state file not read again: %s", exc)
                continue
            paired = {w.address: w for w in pairings.state.wearables}
            for address, wearable in paired.items():
                if address not in self._session_tasks:
                    session = pairings.session(wearable)
                    self.sessions.append(session)
                    self._start(tg, session)
                    log.info("wearable paired while running sensor=%s", wearable.sensor)
            for session in list(self.sessions):
                address = session.spec.address
                if address in pairings.named or address in paired:
                    continue
                self._session_tasks.pop(address).cancel()
                self.sessions.remove(session)
                log.info("wearable unpaired while running sensor=%s", session.spec.sensor)

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
