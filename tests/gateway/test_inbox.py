"""The consumer's hand-off from paho's thread to the event loop: every item arrives, in order,
and an item put while the loop goes to sleep wakes it (a lost wake-up would leave a message
unprocessed until the next one came: here the deadline fails the test instead)."""

from __future__ import annotations

import asyncio
import random
import threading
import time

from gateway.flow import Inbox


async def test_items_from_several_threads_all_arrive_in_each_threads_order() -> None:
    inbox: Inbox[tuple[int, int]] = Inbox()
    threads, each = 4, 5_000

    def produce(t: int) -> None:
        rng = random.Random(t)
        for i in range(each):
            inbox.put((t, i))
            if rng.random() < 0.01:  # bursts and pauses, so the loop both sleeps and drains
                time.sleep(rng.random() / 1000)

    producers = [threading.Thread(target=produce, args=(t,)) for t in range(threads)]
    for p in producers:
        p.start()
    got: list[tuple[int, int]] = []
    async with asyncio.timeout(30):
        while len(got) < threads * each:
            assert await inbox.wait(None)
            got.extend(inbox.take(random.randint(1, 500)))
    for p in producers:
        p.join()
    for t in range(threads):
        assert [i for u, i in got if u == t] == list(range(each))
    assert inbox.take(10) == []


async def test_wait_gives_up_after_its_time_with_nothing_put() -> None:
    inbox: Inbox[int] = Inbox()
    assert not await inbox.wait(0.05)
    assert not await inbox.wait(0)
    inbox.put(1)
    assert await inbox.wait(0)
    assert inbox.take(5) == [1]


async def test_a_put_from_another_thread_wakes_a_waiting_loop() -> None:
    inbox: Inbox[str] = Inbox()
    for round_ in range(200):
        waiting = asyncio.create_task(inbox.wait(None))
        await asyncio.sleep(0)  # the loop is now waiting
        threading.Thread(target=inbox.put, args=(f"m{round_}",)).start()
        async with asyncio.timeout(5):
            assert await waiting
        assert inbox.take(10) == [f"m{round_}"]


async def test_a_stale_wake_up_does_not_end_a_wait_with_nothing_queued() -> None:
    inbox: Inbox[int] = Inbox()
    waiting = asyncio.create_task(inbox.wait(None))
    await asyncio.sleep(0)
    inbox.put(1)  # schedules a wake-up
    assert inbox.take(1) == [1]  # gone before the wake-up runs
    await asyncio.sleep(0.05)
    assert not waiting.done()  # woken, found nothing, waits again
    inbox.put(2)
    async with asyncio.timeout(5):
        assert await waiting
    assert inbox.take(5) == [2]
