"""`trialstream db`: migrations and status."""

from __future__ import annotations

import argparse
import json

from gateway.commands.common import Subparsers, add_database_flags, run
from gateway.settings import Settings
from storage.migrate import ModeRequest


def register(sub: Subparsers) -> None:
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
    add_database_flags(migrate)
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
    add_database_flags(st)
    st.add_argument("--json", action="store_true", help="print JSON instead of text")
    st.set_defaults(handler=_cmd_db_status)


def _cmd_db_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from storage import db
    from storage.migrate import migrate

    url = settings.require_database_url()

    async def go() -> int:
        async with db.connection(url, autocommit=True) as conn:
            report = await migrate(conn, settings.storage_mode)
        applied = ", ".join(f"{n:04d}" for n in report.applied) or "none (already up to date)"
        print(f"mode: {report.mode}\nschema version: {report.version}\napplied: {applied}")
        if report.mode == "plain":
            print(f"partitions created ahead: {report.partitions_created}")
        return 0

    return int(run(go()))


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

    return int(run(go()))
