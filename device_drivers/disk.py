"""The hub's disk work on one thread of its own.

The outbox (SQLite), the state file and the status file are opened, read and written from
the event loop's coroutines through :func:`on_disk`, which runs each call on a single worker
thread kept for the process, in the order the calls were made. Why not
``asyncio.to_thread``: its pool grows to several threads as calls overlap (six on a
two-core hub), each with glibc's own arena and per-thread caches of freed memory, and the
hub's memory rose for over ten minutes, twice as far, as those filled; the outbox takes one
lock for each call anyway, so the extra threads never wrote faster (measured:
docs/performance.md). Slow or rare calls (certificate renewal and its files, enrollment,
stopping the MQTT client) stay on the loop's default pool, so they never hold up a
reading's write.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

THREAD_NAME: Final = "hub-disk"

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def _disk_executor() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_NAME)
        return _executor


async def on_disk(func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """``func(*args, **kwargs)`` on the hub's disk thread, as ``asyncio.to_thread`` runs it
    on the default pool (the caller's context variables go with it; cancelling the caller
    does not stop a call already running)."""
    loop = asyncio.get_running_loop()
    call = functools.partial(contextvars.copy_context().run, func, *args, **kwargs)
    return await loop.run_in_executor(_disk_executor(), call)
