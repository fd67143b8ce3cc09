"""The hub's disk work runs on one thread of its own, in the order it was asked for, and a
running hub writes its outbox and state there, never through the loop's default pool."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from pathlib import Path

import pytest

from device_drivers import disk
from device_drivers.driver import WearableSpec
from device_drivers.outbox import Outbox
from device_drivers.sim import VirtualHeartRateStrap, VirtualRadio
from device_drivers.state import HubState
from tests.fixtures.gateway import RunningGateway
from tests.fixtures.hubs import enrolled_hub, open_simulated_hub
from tests.fixtures.trial import Trial
from tests.fixtures.waiting import wait_until

WHO: contextvars.ContextVar[str] = contextvars.ContextVar("WHO", default="nobody")


async def test_overlapping_calls_run_one_after_another_on_one_thread_in_order() -> None:
    seen: list[tuple[int, str]] = []
    busy = threading.Lock()

    def work(i: int) -> int:
        # Never two at once: a second call finding the lock taken would fail here.
        assert busy.acquire(blocking=False), "two disk calls ran at the same time"
        try:
            threading.Event().wait(0.002)
            seen.append((i, threading.current_thread().name))
        finally:
            busy.release()
        return i * i

    results = await asyncio.gather(*(disk.on_disk(work, i) for i in range(40)))
    assert results == [i * i for i in range(40)]
    assert [i for i, _ in seen] == list(range(40))
    assert {name for _, name in seen} == {f"{disk.THREAD_NAME}_0"}


async def test_the_callers_context_goes_with_the_call_and_its_error_comes_back() -> None:
    WHO.set("session 7")
    assert await disk.on_disk(WHO.get) == "session 7"

    def fails(reason: str) -> None:
        raise OSError(reason)

    with pytest.raises(OSError, match="disk full"):
        await disk.on_disk(fails, "disk full")
    # The thread survives a failing call.
    assert await disk.on_disk(lambda: threading.current_thread().name) == (f"{disk.THREAD_NAME}_0")


async def test_a_running_hub_writes_its_outbox_and_state_on_the_disk_thread(
    trial: Trial, gateway: RunningGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: dict[str, set[str]] = {}

    def recorded(cls: type, name: str) -> None:
        original = getattr(cls, name)

        def wrapper(self: object, *args: object, **kwargs: object) -> object:
            threads.setdefault(name, set()).add(threading.current_thread().name)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, wrapper)

    for name in ("add_readings", "stats", "seal_pending", "due", "mark_sent", "receipt"):
        recorded(Outbox, name)
    for name in ("link", "set_link"):
        recorded(HubState, name)

    identity = await enrolled_hub(trial, gateway, tmp_path / "hub")
    async with VirtualRadio() as radio, contextlib.AsyncExitStack() as stack:
        strap = await stack.enter_async_context(
            VirtualHeartRateStrap("TS-HRM-DISK", seed=3, rate_hz=10.0).running(radio)
        )
        parts = await open_simulated_hub(
            identity, stack, radio, [WearableSpec(strap.address, "strap")], seal_max_age_s=0.2
        )
        task = asyncio.create_task(parts.hub.run())
        try:
            await wait_until(
                lambda: parts.relay.stats.receipts_accepted >= 2, "two envelopes receipted"
            )
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    # Every call the hub made to these while it ran, on the disk thread (the hub's last
    # writes as it stops may run on the loop's own thread: no time to hand them over).
    assert {"add_readings", "stats", "seal_pending", "due", "mark_sent", "receipt"} <= set(threads)
    disk_thread = f"{disk.THREAD_NAME}_0"
    strays = {n: t - {disk_thread, "MainThread"} for n, t in threads.items()}
    assert all(not t for t in strays.values()), strays
    assert disk_thread in threads["add_readings"]
