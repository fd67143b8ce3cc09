"""The ``trialstream`` command line: parses flags, builds ``Settings`` once, runs a command.

Every failure the user can fix (unreachable database, wrong URL, missing broker binary)
ends as one line starting with ``error:`` and a non-zero exit status, not a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from gateway.errors import ConfigError, GatewayError
from gateway.settings import Settings
from storage.errors import StorageError
from storage.migrate import ModeRequest

log = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace, Settings], int]

EXIT_USER_ERROR = 2
EXIT_FAILURE = 1


def _add_database_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--database-url",
        help="PostgreSQL URL (default: $TRIALSTREAM_DATABASE_URL)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trialstream",
        description=(
            "Ingestion backend for decentralized clinical trials: BLE wearables -> signed "
            "envelopes over MQTT -> consent-gated storage in TimescaleDB/PostgreSQL."
        ),
        epilog="Settings also come from TRIALSTREAM_* environment variables; flags win.",
    )
    parser.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default: INFO, or $TRIALSTREAM_LOG_LEVEL)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    db = sub.add_parser(
        "db",
        help="database schema and status",
        description="Apply migrations and inspect the database.",
    )
    db_sub = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    migrate = db_sub.add_parser(
        "migrate",
        help="apply pending migrations (idempotent)",
        description="Apply every migration not yet applied, each in its own transaction. "
        "The storage mode is chosen on the first run and recorded.",
    )
    _add_database_flags(migrate)
    migrate.add_argument(
        "--mode",
        choices=[m.value for m in ModeRequest],
        help="storage mode: auto uses TimescaleDB when CREATE EXTENSION works "
        "(default: auto, or $TRIALSTREAM_STORAGE_MODE)",
    )
    migrate.set_defaults(handler=_cmd_db_migrate)
    st = db_sub.add_parser(
        "status",
        help="storage mode, schema version and row counts",
        description="Print the storage mode, schema version and row counts.",
    )
    _add_database_flags(st)
    st.add_argument("--json", action="store_true", help="print JSON instead of text")
    st.set_defaults(handler=_cmd_db_status)

    dec = sub.add_parser(
        "decode",
        help="decode a captured GATT payload",
        description="Decode one captured characteristic value and print one JSON object per "
        "reading. Exits 2 with one line for malformed input.",
    )
    dec.add_argument("characteristic", help="characteristic UUID: 0x2A37, 2a37 or the 128-bit form")
    dec.add_argument("payload", help="the value as hex (spaces and colons allowed)")
    dec.set_defaults(handler=_cmd_decode)

    gw = sub.add_parser(
        "gateway",
        help="run the gateway (HTTP + MQTT consumer), or show its stats",
        description="Run N gateway worker processes sharing the HTTP port and the broker's "
        "shared subscription (default: one per core). `trialstream gateway stats` prints "
        "what was stored and rejected, by reason.",
    )
    _add_database_flags(gw)
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
    _add_database_flags(gs)
    gs.add_argument(
        "--hours", type=float, default=24.0, help="look back this many hours (default: 24)"
    )
    gs.add_argument("--json", action="store_true", help="print JSON instead of text")
    gs.set_defaults(handler=_cmd_gateway_stats)

    br = sub.add_parser(
        "broker",
        help="run a private Mosquitto from deploy/mosquitto/ (development)",
        description="Start Mosquitto with the project's durable configuration on a loopback "
        "port, in the foreground until Ctrl-C. Without TLS files it runs in the "
        "loopback development mode (no certificates, no ACL).",
    )
    br.add_argument("--port", type=int, help="port (default: $TRIALSTREAM_MQTT_PORT or 1883)")
    br.add_argument("--workdir", help="persistence and log directory (default: <data dir>/broker)")
    br.set_defaults(handler=_cmd_broker)

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
    _add_database_flags(bs)
    bs.add_argument(
        "--rows",
        type=int,
        default=50_000,
        help="readings per measured configuration (default: 50000)",
    )
    bs.add_argument("--out", help="also write the JSON result to this file")
    bs.set_defaults(handler=_cmd_bench_storage)
    return parser


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def _cmd_db_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from storage import db
    from storage.migrate import migrate

    url = settings.require_database_url()

    async def go() -> int:
        async with db.connection(url, autocommit=True) as conn:
            report = await migrate(conn, settings.storage_mode)
        applied = ", ".join(f"{n:04d}" for n in report.applied) or "none (already up to date)"
        print(f"mode: {report.mode}\nschema version: {report.version}\napplied: {applied}")
        return 0

    return int(_run(go()))


def _cmd_db_status(args: argparse.Namespace, settings: Settings) -> int:
    from storage import db
    from storage.status import status

    url = settings.require_database_url()

    async def go() -> int:
        async with db.connection(url, autocommit=True) as conn:
            st = await status(conn)
        if args.json:
            print(
                json.dumps(
                    {
                        "server_version": st.server_version,
                        "mode": st.mode,
                        "schema_version": st.schema_version,
                        "latest_version": st.latest_version,
                        "up_to_date": st.up_to_date,
                        "partitions": st.partitions,
                        "counts": st.counts,
                    },
                    indent=2,
                )
            )
            return 0
        print(f"database: {db.describe(url)} (PostgreSQL {st.server_version})")
        if st.mode is None:
            print("schema: not set up; run `trialstream db migrate`")
            return 1
        behind = (
            "" if st.up_to_date else f" (latest {st.latest_version}: run `trialstream db migrate`)"
        )
        print(f"mode: {st.mode}")
        print(f"schema version: {st.schema_version}{behind}")
        label = "chunks" if st.mode == "timescaledb" else "partitions"
        print(f"readings {label}: {st.partitions}")
        width = max(len(t) for t in st.counts) if st.counts else 0
        for table, n in st.counts.items():
            print(f"  {table:<{width}}  {n:>12,}")
        return 0

    return int(_run(go()))


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
    stats = _run(collect(url, hours=args.hours))
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


def _cmd_broker(args: argparse.Namespace, settings: Settings) -> int:
    import time
    from pathlib import Path

    from gateway.broker import MosquittoBroker

    workdir = Path(args.workdir) if args.workdir else settings.data_dir / "broker"
    broker = MosquittoBroker(
        workdir, port=args.port or settings.mqtt_port, binary=settings.mosquitto
    )
    broker.start()
    print(
        f"mosquitto listening on {broker.host}:{broker.port} (config {broker.config_path}); "
        "Ctrl-C stops it",
        flush=True,
    )
    try:
        while broker.pid is not None:
            time.sleep(0.5)
    finally:
        broker.stop()
    return 1


def _cmd_decode(args: argparse.Namespace, settings: Settings) -> int:
    from device_drivers.gatt.cli import run_decode

    return run_decode(args.characteristic, args.payload, sys.stdout, sys.stderr)


def _cmd_bench_storage(args: argparse.Namespace, settings: Settings) -> int:
    from bench.storage import run

    result = _run(run(settings.require_database_url(), rows=args.rows, progress=sys.stderr))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(
            os.environ,
            database_url=getattr(args, "database_url", None),
            storage_mode=ModeRequest(args.mode) if getattr(args, "mode", None) else None,
            log_level=args.log_level,
            mqtt_host=getattr(args, "mqtt_host", None),
            mqtt_port=getattr(args, "mqtt_port", None),
            http_port=getattr(args, "http_port", None),
        )
        logging.basicConfig(
            level=settings.log_level,
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s %(message)s",
        )
        handler: Handler = args.handler
        return handler(args, settings)
    except (GatewayError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
