"""Flow control between paho's network thread and the event loop: the inbox that hands
messages over, and the byte budget that bounds what is held until acknowledged."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class ByteBudget:
    """Bytes held across threads, bounded: ``take`` waits (up to a timeout) for room, and a
    single item larger than the whole budget is let in when nothing else is held, so it
    cannot wait forever."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.held = 0
        self._room = threading.Condition()

    def take(self, n: int, timeout: float) -> bool:
        """Hold ``n`` more bytes once they fit; False if they did not within ``timeout``."""
        with self._room:
            return self._room.wait_for(
                lambda: self.held == 0 or self.held + n <= self.most, timeout
            ) and self._add(n)

    def _add(self, n: int) -> bool:
        self.held += n
        return True

    def give(self, n: int) -> None:
        with self._room:
            self.held -= n
            self._room.notify_all()


class Inbox(Generic[T]):
    """Items from another thread (paho's network loop) to the event loop, which is woken only
    when it waits for one: a ``call_soon_threadsafe`` per message cost a self-pipe write and
    a loop iteration each (5% of a worker's samples under load), while under a backlog the
    loop finds the next items already queued. The flag and the queue change under one lock,
    so an item put while the loop goes to sleep always wakes it; the loop woken is the one
    that waits."""

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._lock = threading.Lock()
        self._waiting = False
        self._ready = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None  # set whenever _waiting is

    def put(self, item: T) -> None:
        """Any thread."""
        with self._lock:
            self._items.append(item)
            loop = self._loop if self._waiting else None
            self._waiting = False
        if loop is not None:
            loop.call_soon_threadsafe(self._ready.set)

    def take(self, most: int) -> list[T]:
        """Up to ``most`` queued items, oldest first (the loop's thread)."""
        with self._lock:
            return [self._items.popleft() for _ in range(min(most, len(self._items)))]

    async def wait(self, within: float | None) -> bool:
        """Until an item is queued (True) or ``within`` seconds pass (False; None: no limit)."""
        loop = asyncio.get_running_loop()
        deadline = None if within is None else loop.time() + within
        while True:
            with self._lock:
                if self._items:
                    self._waiting = False
                    return True
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    self._waiting = False
                    return False
                self._waiting, self._loop = True, loop
                self._ready.clear()
            # A wake-up scheduled by an earlier put may arrive late: the loop checks again.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), left)
