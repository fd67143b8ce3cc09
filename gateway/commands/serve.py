"""`trialstream gateway`: run the gateway workers, or show what they stored."""

from __future__ import annotations

import argparse
import json
import os

from gateway.commands.common import Subparsers, add_database_flags, run
from gateway.errors import ConfigError
from gateway.settings import Settings


def register(sub: Subparsers) -> None:
    gw = sub.add_parser(
        "gateway",
        help="run the gateway (HTTP + MQTT consumer), or show its stats",
        description="Run N gateway worker processes sharing the HTTP port and the broker's "
        "shared subscription (default: one per core). `trialstream gateway stats` prints "
        "what was stored and rejected, by reason.",
    )
    add_database_flags(gw)
    gw.add_argument("--workers", type=int, help="worker processes (default: one per core)")
    gw.add_argument(
        "--mqtt-host", help="broker host (default: $TRIALSTREAM_MQTT_HOST or 127.0.0.1)"
    )
    gw.add_argument("--mqtt-port", type=int, help="broker port (default: 1883)")
    gw.add_argument("--http-port", type=int, help="HTTP port (default: 8080)")
    gw.set_defaults(handler=_cmd_gateway)
    gw_sub = gw.add_subparsers(dest="gateway_command", metavar="ACTION")
    gs = gw_sub.add_parser(
        "stats",
        help="stored and rejected counts by reason",
        description="Envelopes and readings stored, and rejected by reason, from the database "
        "(the durable record across all workers).",
    )
    add_database_flags(gs)
    gs.add_argument(
        "--hours", type=float, default=24.0, help="look back this many hours (default: 24)"
    )
    gs.add_argument("--json", action="store_true", help="print JSON instead of text")
    gs.set_defaults(handler=_cmd_gateway_stats)


def _cmd_gateway(args: argparse.Namespace, settings: Settings) -> int:
    from gateway import serve

    settings.require_database_url()
    workers = args.workers if args.workers is not None else max(1, os.cpu_count() or 1)
    if not 1 <= workers <= 64:
        raise ConfigError(f"--workers {workers} is not valid: expected 1..64")
    return serve.run(settings, workers)


def _cmd_gateway_stats(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.stats import collect

    url = settings.require_database_url()
    stats = run(collect(url, hours=args.hours))
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(
        f"last {args.hours:g} h: {stats['envelopes']:,} envelopes, "
        f"{stats['readings']:,} readings stored"
    )
    if not stats["rejections"]:
        print("rejected: none")
    for row in stats["rejections"]:
        print(f"  {row['reason']:<22} {row['readings']:>10,} readings in {row['rows']:,} rows")
    return 0
