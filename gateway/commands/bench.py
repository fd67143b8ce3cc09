"""`trialstream bench`: benchmarks with JSON results."""

from __future__ import annotations

import argparse
import json
import sys

from gateway.commands.common import Subparsers, add_database_flags, run
from gateway.settings import Settings


def register(sub: Subparsers) -> None:
    bench = sub.add_parser(
        "bench",
        help="benchmarks (JSON results)",
        description="Run a benchmark; every figure is a ratio to a baseline "
        "measured in the same run.",
    )
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    bs = bench_sub.add_parser(
        "storage",
        help="bulk writer vs per-row INSERT",
        description="rows/s of the bulk writer at batch sizes 100, 1k, 10k "
        "against a naive per-row INSERT baseline.",
    )
    add_database_flags(bs)
    bs.add_argument(
        "--rows",
        type=int,
        default=50_000,
        help="readings per measured configuration (default: 50000)",
    )
    bs.add_argument("--out", help="also write the JSON result to this file")
    bs.set_defaults(handler=_cmd_bench_storage)
    bd = bench_sub.add_parser(
        "drivers",
        help="GATT parsers vs struct.unpack; wearable sessions over the virtual radio",
        description="readings/s of every profile's parser against a bare struct.unpack of "
        "the same bytes, and notifications/s with CPU use for N virtual wearables at R Hz "
        "read by wearable sessions, against plain bleak subscriptions.",
    )
    bd.add_argument(
        "--iterations", type=int, default=20_000, help="payloads parsed per profile (20000)"
    )
    bd.add_argument("--wearables", type=int, default=20, help="virtual wearables (default: 20)")
    bd.add_argument("--rate-hz", type=float, default=10.0, help="notifications/s each (10)")
    bd.add_argument("--seconds", type=float, default=10.0, help="measured window (default: 10)")
    bd.add_argument("--out", help="also write the JSON result to this file")
    bd.set_defaults(handler=_cmd_bench_drivers)


def _cmd_bench_storage(args: argparse.Namespace, settings: Settings) -> int:
    from bench import storage as storage_bench

    result = run(
        storage_bench.run(settings.require_database_url(), rows=args.rows, progress=sys.stderr)
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


def _cmd_bench_drivers(args: argparse.Namespace, settings: Settings) -> int:
    from bench import drivers as drivers_bench

    result = run(
        drivers_bench.run(
            iterations=args.iterations,
            wearables=args.wearables,
            rate_hz=args.rate_hz,
            seconds=args.seconds,
            progress=sys.stderr,
        )
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0
