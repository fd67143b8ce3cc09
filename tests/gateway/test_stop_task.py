"""A worker's background tasks are stopped within a bound: one that does not end when
cancelled is left behind with where it waits on record, never holding the worker's exit."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.app import Lifecycle, stop_task


async def _deaf(gate: asyncio.Event) -> None:
    """Swallows its cancellation and waits on: what a library that loses a cancel does."""
    while True:
        try:
            await gate.wait()
            return
        except asyncio.CancelledError:
            continue


async def test_a_task_deaf_to_its_cancel_is_left_behind_with_its_awaits_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gate = asyncio.Event()
    task = asyncio.create_task(_deaf(gate), name="alerts-0")
    await asyncio.sleep(0)
    lifecycle = Lifecycle()
    try:
        async with asyncio.timeout(5):  # the bound is 0.2 s
            await stop_task(task, lifecycle=lifecycle, within=0.2)
    finally:
        gate.set()
        await task
    assert lifecycle.stopping
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    said = record.message
    assert "task alerts-0 did not end within 0.2 s of being cancelled; left behind" in said
    assert "awaits _deaf at " in said
    assert "awaits Event.wait at " in said


async def test_a_task_that_ends_on_its_cancel_is_stopped_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    task = asyncio.create_task(asyncio.Event().wait())
    await asyncio.sleep(0)
    await stop_task(task, lifecycle=Lifecycle(), within=5)
    assert task.cancelled()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_an_error_a_task_ends_with_when_cancelled_is_raised() -> None:
    async def fails_on_cancel() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    task = asyncio.create_task(fails_on_cancel())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="cleanup failed"):
        await stop_task(task, lifecycle=Lifecycle(), within=5)


async def test_without_a_bound_the_task_is_awaited_to_its_end() -> None:
    # The consumer's stop: a batch in its commit when cancelled is finished.
    committed: list[bool] = []

    async def commits_before_it_stops() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(0.3)  # longer than the bound the other tasks get here
            committed.append(True)
            raise

    task = asyncio.create_task(commits_before_it_stops())
    await asyncio.sleep(0)
    await stop_task(task, lifecycle=Lifecycle(), within=None)
    assert committed == [True]
    assert task.cancelled()
