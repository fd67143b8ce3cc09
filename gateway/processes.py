"""Running the servers the tools start (brokers, PostgreSQL under Patroni, etcd, gateway
hosts): starting several side by side, waiting for one to be ready with a bound (in a thread,
or in the event loop while other tasks go on), reading why it did not start, and stopping
its whole process group."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not ended: a zombie (ended, not yet reaped by
    its parent) counts as ended; one of another user's counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # "pid (comm) S ...": the state follows the last ")", comm may hold anything
            state = stat.read(4096).rpartition(b")")[2].split()[:1]
    except OSError:
        return True  # no /proc here: the signal said it exists
    return state != [b"Z"]


def attempts(within: float, every: float) -> Iterator[int]:
    """Attempt numbers for a readiness loop: the first at once, each next ``every`` seconds
    after the one before ended, the last the first to end past ``within`` seconds from the
    start. A loop that breaks when its check passes takes its ``else`` as the timeout::

        for _ in attempts(30.0, 0.5):
            if ready():
                break
        else:
            raise TimeoutError(...)
    """
    deadline = time.monotonic() + within
    n = 0
    while True:
        yield n
        if time.monotonic() > deadline:
            return
        time.sleep(every)
        n += 1


async def until(
    ready: Callable[[], bool | Awaitable[bool]], what: str, within: float, every: float = 0.2
) -> None:
    """Return once ``ready()`` is true (awaited, if it gives an awaitable), looking at once
    and then every ``every`` seconds while the event loop runs other tasks; ``TimeoutError``
    naming ``what`` once ``within`` seconds have passed without it. The event loop's twin of
    :func:`attempts`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = ready()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise TimeoutError(f"not within {within:g} s: {what}")
        await asyncio.sleep(every)


def side_by_side(*steps: Callable[[], None]) -> None:
    """Run ``steps`` each in a thread of its own (starting processes that take seconds to be
    ready); once all have ended, raise the first error any of them raised."""
    errors: list[BaseException] = []

    def run(step: Callable[[], None]) -> None:
        try:
            step()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in steps]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def log_tail(path: Path, chars: int = 800) -> str:
    """The end of a process's log file, for an error saying why it did not start."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def signal_group(process: subprocess.Popen[bytes] | None, sig: signal.Signals) -> None:
    """``sig`` to the process group of ``process`` (started with ``start_new_session``), if
    it is still running."""
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


def stop_group(process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM to the process group, and SIGKILL to it if ``process`` is not gone within
    ``timeout``."""
    signal_group(process, signal.SIGTERM)
    if process is None:
        return
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_group(process, signal.SIGKILL)
        process.wait(timeout=10)
