"""What the server-sent event streams (the alert board's and the live views') share: the
head of a stream's response, and the one feed per process that every stream reads from,
run for as long as the application."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Protocol, TypeVar

from aiohttp import web


class Feed(Protocol):
    def close(self) -> None:
        """Wake every stream reading from the feed, so each ends at once."""


F = TypeVar("F", bound=Feed)


async def open_stream(request: web.Request, retry_ms: int) -> web.StreamResponse:
    """An event stream started: never cached, never held back by a buffering proxy, and the
    client told to reconnect after ``retry_ms``."""
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
        }
    )
    await resp.prepare(request)
    await resp.write(f"retry: {retry_ms}\n\n".encode())
    return resp


async def run_feed(
    app: web.Application,
    key: web.AppKey[F],
    feed: F,
    work: Callable[[], Coroutine[Any, Any, None]],
    name: str,
) -> AsyncIterator[None]:
    """A cleanup context: ``feed`` in ``app[key]``, and ``work`` running as the task ``name``
    until the application stops; then the feed is closed and the task ended."""
    app[key] = feed
    task = asyncio.create_task(work(), name=name)
    yield
    feed.close()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
