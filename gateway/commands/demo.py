"""`trialstream demo`: the whole trial on one machine, nothing to configure."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from gateway.commands.common import Subparsers, run
from gateway.errors import ConfigError
from gateway.settings import Settings


def register(sub: Subparsers) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole trial on embedded defaults",
        description="Start an embedded PostgreSQL (or a database of its own on the"
        " --database-url server), a private broker "
        "(Mosquitto with TLS, or amqtt when Mosquitto is missing), the gateway and a cohort of "
        "virtual participants with hubs and wearables, then play a scenario: an abnormal "
        "episode, a consent withdrawal, a hub offline and back. Ctrl-C stops and cleans up.",
    )
    p.add_argument("--participants", type=int, default=5, help="virtual participants (default: 5)")
    p.add_argument(
        "--duration", type=float, help="stop after this many seconds (default: until Ctrl-C)"
    )
    p.add_argument("--keep", action="store_true", help="keep the demo's files (database, hubs)")
    p.add_argument(
        "--database-url",
        help="use this PostgreSQL server instead of an embedded one: the demo creates a"
        " database of its own there (CREATEDB needed) and drops it at the end unless --keep",
    )
    p.add_argument(
        "--into-database",
        action="store_true",
        help="write into the --database-url database itself instead; the demo creates"
        " accounts there whose password it prints, so give it an empty database",
    )
    p.add_argument(
        "--broker",
        choices=["auto", "mosquitto", "amqtt"],
        default="auto",
        help="auto: Mosquitto when installed, else amqtt (default: auto)",
    )
    p.add_argument("--http-port", type=int, default=8080, help="gateway HTTP port (default: 8080)")
    p.add_argument("--data-dir", help="where to keep the demo's files (default: a temporary dir)")
    p.add_argument(
        "--episode-after",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds until P-001's abnormal episode (default: 60)",
    )
    p.add_argument(
        "--withdraw-after",
        type=float,
        default=45.0,
        metavar="S",
        help="seconds until P-002 withdraws consent (default: 45)",
    )
    p.add_argument(
        "--offline-after",
        type=float,
        default=20.0,
        metavar="S",
        help="seconds until P-003's hub goes offline (default: 20)",
    )
    p.add_argument(
        "--offline-for",
        type=float,
        default=30.0,
        metavar="S",
        help="how long P-003's hub stays offline (default: 30)",
    )
    p.add_argument("--report", help="write a JSON report of the run to this file")
    p.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.demo import DemoOptions, run_demo

    if not 1 <= args.participants <= 50:
        raise ConfigError("--participants must be 1..50")
    if args.into_database and not args.database_url:
        raise ConfigError("--into-database needs --database-url")
    options = DemoOptions(
        participants=args.participants,
        duration_s=args.duration,
        keep=args.keep,
        database_url=args.database_url or settings.database_url,
        into_database=args.into_database,
        broker=args.broker,
        http_port=args.http_port,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        episode_after_s=args.episode_after,
        withdraw_after_s=args.withdraw_after,
        offline_after_s=args.offline_after,
        offline_for_s=args.offline_for,
        report_path=Path(args.report) if args.report else None,
    )
    with contextlib.suppress(KeyboardInterrupt):
        run(run_demo(options, sys.stdout))
    return 0
