"""Running the gateway: one process per worker, all sharing the HTTP port and the broker's
shared subscription.

The parent applies migrations once, then starts the workers and waits; SIGINT or SIGTERM
stops them all. A worker that dies is started again (its MQTT session is taken back by its
stable client id, with the messages it had not acknowledged).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing as mp
import os
import signal
import time
from types import FrameType

from gateway.pki import GATEWAY_IDENTITY, StudyCA
from gateway.settings import Settings
from storage import db
from storage.migrate import migrate

log = logging.getLogger(__name__)

# A worker that keeps dying is restarted at most this often, so a broken setting does not
# spin the machine.
RESTART_MIN_INTERVAL_S = 5.0
# Workers get this long, together, to finish their batch and close after SIGTERM.
STOP_GRACE_S = 15.0
# How often a worker checks that its supervisor is still there.
PARENT_CHECK_S = 1.0
# The worker's collector thresholds (CPython's default: 700, 10, 10); see _settle_heap.
GC_THRESHOLDS = (20_000, 10, 10)


async def serve_worker(settings: Settings, worker: int, stop: asyncio.Event) -> None:
    # Imported here, in the worker: the supervisor never loads the application (about
    # 75 MB of modules it has no use for).
    from aiohttp import web

    from gateway.app import create_app

    app = create_app(settings, worker=worker)
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
        await runner.cleanup()


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


def _worker_main(settings: Settings, worker: int) -> None:
    logging.basicConfig(
        level=settings.log_level, format=f"%(asctime)s %(levelname)s w{worker} %(name)s %(message)s"
    )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        watch = asyncio.create_task(_stop_when_orphaned(os.getppid(), stop))
        try:
            await serve_worker(settings, worker, stop)
        finally:
            watch.cancel()

    asyncio.run(main())


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


def run(settings: Settings, workers: int) -> int:
    asyncio.run(prepare(settings))
    ctx = mp.get_context("spawn")
    procs: dict[int, mp.process.BaseProcess] = {}
    started: dict[int, float] = {}
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def start(i: int) -> None:
        p = ctx.Process(target=_worker_main, args=(settings, i), name=f"gateway-worker-{i}")
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
        time.sleep(0.5)
        for i, p in list(procs.items()):
            if not p.is_alive() and not stopping:
                wait = RESTART_MIN_INTERVAL_S - (time.monotonic() - started[i])
                log.error("worker %d exited with %s; restarting", i, p.exitcode)
                if wait > 0:
                    time.sleep(wait)
                start(i)
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
