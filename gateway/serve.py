"""Running the gateway: one process per worker, all sharing the HTTP port and the broker's
shared subscription.

The parent applies migrations once, then starts the workers and waits; SIGINT or SIGTERM
stops them all. A worker that dies is started again (its MQTT session is taken back by its
stable client id, with the messages it had not acknowledged), after a wait that doubles
with each death in a row: 1 s, 2 s, 4 s ... up to 60 s, and back to 1 s once a worker has
stayed up 60 s (``next_backoff``).

A worker whose consumer (or alert service) dies does not go on serving HTTP without
ingesting: it logs the error, stops, and exits with ``EXIT_CONSUMER_DIED``. Each new worker
is told how many times its slot was started again and how its last process ended; its
``/healthz`` and ``/metrics`` report both.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import gc
import inspect
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, TextIO

from gateway.pki import GATEWAY_IDENTITY, StudyCA
from gateway.settings import Settings
from storage import db
from storage.migrate import migrate

if TYPE_CHECKING:
    from gateway.app import TaskDied

log = logging.getLogger(__name__)

# A worker's exit status when its consumer or alert service ended with an error.
EXIT_CONSUMER_DIED = 3
# A worker that dies is started again after a wait: the first, then doubled with each death
# in a row up to the cap, so a broken setting does not spin the machine and a passing fault
# costs a second. A worker that stayed up RESTART_RESET_AFTER_S starts the series afresh.
RESTART_BACKOFF_MIN_S = 1.0
RESTART_BACKOFF_MAX_S = 60.0
RESTART_RESET_AFTER_S = 60.0
# How often the supervisor looks at its workers (and at SIGINT/SIGTERM, while it waits).
SUPERVISE_POLL_S = 0.1
# Workers get this long, together, to finish their batch and close after SIGTERM.
STOP_GRACE_S = 15.0
# A worker that began to stop and has not ended this long after writes every thread's stack
# to stderr and exits (status 1): its slot is then started again, rather than left holding
# no consumer because a thread never finished (faulthandler.dump_traceback_later).
WORKER_STOP_DEADLINE_S = 10.0
# This long before that deadline, every asyncio task still pending writes its stack to
# stderr: a cleanup that awaits forever leaves the main thread idle in the event loop's
# select, where the threads' stacks alone cannot say what it waits for.
TASK_DUMP_LEAD_S = 1.0
# How often a worker checks that its supervisor is still there.
PARENT_CHECK_S = 1.0
# The worker's collector thresholds (CPython's default: 700, 10, 10); see _settle_heap.
GC_THRESHOLDS = (20_000, 10, 10)


def next_backoff(previous: float | None, uptime: float) -> float:
    """Seconds to wait before starting a worker again, given the wait before its last start
    (None when that was the slot's first start) and how long it then stayed up."""
    if previous is None or uptime >= RESTART_RESET_AFTER_S:
        return RESTART_BACKOFF_MIN_S
    return min(previous * 2, RESTART_BACKOFF_MAX_S)


def describe_exit(code: int | None) -> str:
    if code == EXIT_CONSUMER_DIED:
        return f"{code} (consumer died)"
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"{code} ({signal.Signals(-code).name})"
    return str(code)


async def serve_worker(
    settings: Settings,
    worker: int,
    stop: asyncio.Event,
    *,
    restarts: int = 0,
    last_exit_code: int | None = None,
    on_stopping: Callable[[], None] | None = None,
) -> int:
    """Serve until ``stop`` is set or a background task of the app dies; the exit status:
    0, or ``EXIT_CONSUMER_DIED``. ``on_stopping`` is called as the stop begins."""
    # Imported here, in the worker: the supervisor never loads the application (about
    # 75 MB of modules it has no use for).
    from aiohttp import web

    from gateway.app import create_app

    exit_code = 0

    def on_fatal(died: TaskDied) -> None:
        nonlocal exit_code
        # The error and its traceback are logged by the app; one line here says what follows.
        log.error(
            "worker=%d task %s died; stopping with exit code %d",
            worker,
            died.task,
            died.exit_code,
        )
        exit_code = died.exit_code
        stop.set()

    app = create_app(
        settings,
        worker=worker,
        on_fatal=on_fatal,
        restarts=restarts,
        last_exit_code=last_exit_code,
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.http_host, settings.http_port, reuse_port=True)
    await site.start()
    _settle_heap()
    log.info(
        "gateway worker=%d listening http=%s:%d", worker, settings.http_host, settings.http_port
    )
    try:
        await stop.wait()
    finally:
        if on_stopping is not None:
            on_stopping()
        await runner.cleanup()
    return exit_code


def _settle_heap() -> None:
    """Keep the cyclic garbage collector off the application's own objects, and run it
    less often.

    A worker holds some 66,000 collector-tracked objects from its start-up that live as
    long as it does, and creates and drops tens of objects per message (paho's message and
    publish records, CBOR items, rows). Under load the collector traversed the whole heap
    over and over: 14.5% of the workers' samples at 10 readings per envelope.
    ``gc.freeze()`` moves what exists once the worker is up out of the collector's sight;
    a higher first threshold lets the short-lived objects die by reference count before a
    collection looks at them (docs/performance.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _worker_main(
    settings: Settings, worker: int, restarts: int = 0, last_exit_code: int | None = None
) -> None:
    logging.basicConfig(
        level=settings.log_level, format=f"%(asctime)s %(levelname)s w{worker} %(name)s %(message)s"
    )

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        watch = asyncio.create_task(_stop_when_orphaned(os.getppid(), stop))
        try:
            return await serve_worker(
                settings,
                worker,
                stop,
                restarts=restarts,
                last_exit_code=last_exit_code,
                on_stopping=_exit_unless_stopped_in_time,
            )
        finally:
            watch.cancel()

    from storage import users

    # The password hashing processes are ended with the worker: a process multiprocessing
    # started waits at its exit for children that were not ended.
    try:
        code = asyncio.run(main())
    finally:
        users.stop_hashing()
    if code:
        sys.exit(code)


def _exit_unless_stopped_in_time() -> None:
    """From now on the worker has ``WORKER_STOP_DEADLINE_S`` to end; past it, the stacks of
    all its threads go to stderr and the process exits with status 1, whatever holds it (a
    thread never joined, an executor's task that never returns, a cleanup that waits).
    Shortly before, the pending asyncio tasks' stacks are written too (``dump_tasks``)."""
    loop = asyncio.get_running_loop()
    loop.call_later(max(0.0, WORKER_STOP_DEADLINE_S - TASK_DUMP_LEAD_S), dump_tasks)
    faulthandler.dump_traceback_later(WORKER_STOP_DEADLINE_S, exit=True)


def dump_tasks(out: TextIO | None = None, loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Write every pending task of ``loop`` (the running loop), with the stack it awaits
    in, to ``out`` (stderr)."""
    out = sys.stderr if out is None else out
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    out.write(f"{len(tasks)} asyncio task(s) still pending:\n")
    for task in tasks:
        out.write(f"task {task.get_name()} ({task.get_coro()!r}):\n")
        task.print_stack(file=out)
        # The awaited chain: print_stack shows only the task's own coroutine frame.
        for frame in _awaited_frames(task.get_coro()):
            out.write(f"  awaits {frame}\n")
    out.flush()


def _awaited_frames(coro: object) -> list[str]:
    """Where each coroutine in the chain ``coro`` awaits stands, innermost last.

    An ``async for`` or an async context manager awaits an async generator's ``asend`` or
    ``athrow``, which has no frame: the chain goes on in the generator it refers to."""
    frames: list[str] = []
    for _ in range(64):
        if type(coro).__name__ in ("async_generator_asend", "async_generator_athrow"):
            coro = next((r for r in gc.get_referents(coro) if inspect.isasyncgen(r)), None)
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        if frame is None:
            break
        frames.append(f"{frame.f_code.co_qualname} at {frame.f_code.co_filename}:{frame.f_lineno}")
        nxt = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
        if nxt is None:
            break
        coro = nxt
    return frames


async def _stop_when_orphaned(parent: int, stop: asyncio.Event) -> None:
    """Stop the worker if its supervisor is gone (killed without stopping it): a worker
    left behind would keep consuming beside the next deployment's."""
    while True:
        await asyncio.sleep(PARENT_CHECK_S)
        if os.getppid() != parent:
            break
    log.error("supervisor pid=%d is gone; stopping", parent)
    stop.set()


async def prepare(settings: Settings) -> None:
    async with db.connection(settings.require_database_url(), autocommit=True) as conn:
        report = await migrate(conn, settings.storage_mode)
    log.info("schema ready mode=%s version=%d", report.mode, report.version)
    # Made once here, before the workers start, so they never race to create them: every
    # worker loads the study CA (enrollment issues hub certificates with it). Two workers
    # creating it at once left one refusing to overwrite the other's key, and exiting.
    ca = StudyCA.load_or_create(settings.ca_path)
    if settings.mqtt_tls:
        ca.issue_files(settings.data_dir / "certs", GATEWAY_IDENTITY)
    # The CRL as the database says, whatever the file holds (a restored backup, a CRL near
    # its next update): the broker reads it at its next reload or start.
    from gateway.revocation import publish_crl

    async with db.connection(settings.require_database_url()) as conn:
        crl = await publish_crl(conn, ca)
    log.info("CRL published path=%s revoked=%d", ca.crl_path, len(list(crl)))


def run(settings: Settings, workers: int) -> int:
    asyncio.run(prepare(settings))
    ctx = mp.get_context("spawn")
    procs: dict[int, mp.process.BaseProcess] = {}
    started: dict[int, float] = {}
    # Per worker slot: times started again, how its last process ended, the wait before its
    # last start (None: none yet), and when a dead one is due to start again.
    restarts: dict[int, int] = dict.fromkeys(range(workers), 0)
    last_exit: dict[int, int | None] = dict.fromkeys(range(workers))
    backoff: dict[int, float | None] = dict.fromkeys(range(workers))
    due: dict[int, float] = {}
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def start(i: int) -> None:
        p = ctx.Process(
            target=_worker_main,
            args=(settings, i, restarts[i], last_exit[i]),
            name=f"gateway-worker-{i}",
        )
        p.start()
        procs[i] = p
        started[i] = time.monotonic()

    for i in range(workers):
        start(i)
    print(
        f"gateway: {workers} worker(s), http://{settings.http_host}:{settings.http_port}/healthz, "
        f"broker {settings.mqtt_host}:{settings.mqtt_port}; Ctrl-C stops",
        flush=True,
    )
    while not stopping:
        # Short steps: SIGINT and SIGTERM are seen within one, also while a restart waits.
        time.sleep(SUPERVISE_POLL_S)
        now = time.monotonic()
        for i, p in list(procs.items()):
            if stopping:
                break
            if i in due:
                if now >= due[i]:
                    del due[i]
                    restarts[i] += 1
                    start(i)
            elif not p.is_alive():
                wait = next_backoff(backoff[i], now - started[i])
                backoff[i] = wait
                last_exit[i] = p.exitcode
                due[i] = now + wait
                log.error(
                    "worker %d exited with code %s after %.1f s up; restart %d in %.0f s",
                    i,
                    describe_exit(p.exitcode),
                    now - started[i],
                    restarts[i] + 1,
                    wait,
                )
    for p in procs.values():
        if p.is_alive() and p.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs.values():
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            log.error("worker pid=%s did not stop within %.0f s; killed", p.pid, STOP_GRACE_S)
            p.kill()
    return 0
