"""`trialstream cluster up|drill`: the whole cluster on one machine (gateway.harness): three
RabbitMQ nodes, gateway hosts on AMQP, Patroni with a synchronous standby and etcd, and
simulated hubs streaming through it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from gateway.commands.common import Subparsers, int_in, seconds_in
from gateway.settings import Settings

if TYPE_CHECKING:
    from gateway.harness import Harness, Shape


def register(sub: Subparsers) -> None:
    cl = sub.add_parser(
        "cluster",
        help="run the whole cluster on this machine, or a fault drill on it (development)",
        description="Start RabbitMQ nodes joined into one cluster, a PostgreSQL primary and "
        "its synchronous standby under Patroni with etcd, gateway hosts (separate processes) "
        "consuming the uplink quorum queue over AMQP, and simulated hubs relaying signed "
        "readings over MQTT 3.1.1. Needs rabbitmq-server, patroni, etcd-server and "
        "PostgreSQL 15's server binaries (scripts/bootstrap installs them as root). Every "
        "process it starts is stopped by its process group at the end, also on Ctrl-C or "
        "SIGTERM. docs/scaling.md describes the design and the measurements.",
    )
    actions = cl.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    up = actions.add_parser(
        "up",
        help="start the cluster and stream from simulated hubs until Ctrl-C",
        description="Start the cluster, print every address and pid as JSON, then stream "
        "from the simulated hubs (100 readings/s each) and print what is produced, receipted "
        "and stored every few seconds, until Ctrl-C or --duration. Kill any part yourself "
        "(the pids are printed) to watch the rest ride through.",
    )
    drill = actions.add_parser(
        "drill",
        help="start the cluster, stream, kill a broker node, a gateway host and the primary",
        description="Start the cluster and stream from the simulated hubs while killing "
        "(-9), one after the other: the RabbitMQ node leading the uplink queue, a gateway "
        "host, and the PostgreSQL primary (Patroni promotes the standby). Then wait until "
        "every hub has its receipts and compare, hub by hub, what it made with what is "
        "stored. Exit status 0 when every reading is stored exactly once and receipted with "
        "nothing refused, 1 otherwise.",
    )
    for p in (up, drill):
        _shape_flags(p)
    up.add_argument("--duration", type=seconds_in(1, 86_400), help="stop after this many seconds")
    up.add_argument(
        "--every", type=seconds_in(1, 3600), default=5.0, help="seconds between status lines"
    )
    up.set_defaults(handler=_cmd_up)
    drill.add_argument(
        "--settle",
        type=seconds_in(1, 120),
        default=4.0,
        help="seconds of streaming before and after each fault (default: 4)",
    )
    drill.add_argument("--report", help="write the drill's JSON report to this file too")
    drill.set_defaults(handler=_cmd_drill)


def _shape_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rabbit-nodes", type=int_in(1, 7), default=3, help="RabbitMQ nodes (default: 3)"
    )
    p.add_argument(
        "--database-nodes",
        type=int_in(2, 5),
        default=2,
        help="PostgreSQL nodes under Patroni: a primary and standbys (default: 2)",
    )
    p.add_argument(
        "--gateway-hosts", type=int_in(1, 8), default=2, help="gateway processes (default: 2)"
    )
    p.add_argument(
        "--workers", type=int_in(1, 8), default=1, help="workers per gateway host (default: 1)"
    )
    p.add_argument("--hubs", type=int_in(1, 50), default=3, help="simulated hubs (default: 3)")
    p.add_argument(
        "--workdir",
        help="where the cluster keeps its files (default: a temporary directory, removed)",
    )


def _say(text: str) -> None:
    print(text, flush=True)


def _prepare_run() -> None:
    """SIGTERM stops the cluster as Ctrl-C does; the schema's migration lines are not news."""
    logging.getLogger("storage.migrate").setLevel(logging.WARNING)
    _interrupt_on_sigterm()


def _interrupt_on_sigterm() -> None:
    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)


@contextlib.contextmanager
def _workdir(given: str | None) -> Iterator[Path]:
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="trialstream-cluster-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _shape(args: argparse.Namespace) -> Shape:
    from gateway.harness import Shape

    return Shape(args.rabbit_nodes, args.database_nodes, args.gateway_hosts, args.workers)


def _harness(args: argparse.Namespace, directory: Path) -> Harness:
    from gateway.harness import Harness

    return Harness(directory, _shape(args))


def _cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.harness import running_hubs, stream

    _prepare_run()
    with _workdir(args.workdir) as directory:
        harness = _harness(args, directory)
        try:
            harness.start(_say)

            async def go() -> None:
                async with running_hubs(harness, args.hubs) as hubs:
                    _say(json.dumps(harness.describe(), indent=2))
                    stop = asyncio.Event()
                    streaming = asyncio.create_task(stream(hubs, stop))
                    t0 = time.monotonic()
                    try:
                        while args.duration is None or time.monotonic() - t0 < args.duration:
                            await asyncio.sleep(args.every)
                            _say(await harness.progress(hubs, time.monotonic() - t0))
                    finally:
                        stop.set()
                        await streaming

            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(go())
        finally:
            _say("stopping every process the cluster started")
            harness.stop()
    return 0


def _cmd_drill(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.errors import ConfigError
    from gateway.harness import drill, running_hubs

    try:
        _shape(args).check_drill()
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    _prepare_run()
    with _workdir(args.workdir) as directory:
        harness = _harness(args, directory)
        try:
            harness.start(_say)

            async def go() -> dict[str, object]:
                async with running_hubs(harness, args.hubs) as hubs:
                    report = await drill(harness, hubs, _say, settle_s=args.settle)
                    return report.as_json()

            result = asyncio.run(go())
        finally:
            _say("stopping every process the cluster started")
            harness.stop()
    text = json.dumps(result, indent=2)
    print(text)
    if args.report:
        Path(args.report).write_text(text + "\n")
    if not result["ok"]:
        print("drill failed: see the hubs whose ok is false", file=sys.stderr)
        return 1
    return 0
