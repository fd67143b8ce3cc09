"""The ``trialstream`` command line: parses flags, builds ``Settings`` once, runs a command.

Every failure the user can fix (unreachable database, wrong URL, missing broker binary)
ends as one line starting with ``error:`` and a non-zero exit status, not a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from gateway import commands
from gateway.commands.common import Handler
from gateway.errors import GatewayError
from gateway.settings import Settings
from storage.errors import StorageError
from storage.migrate import ModeRequest

log = logging.getLogger(__name__)


EXIT_USER_ERROR = 2
EXIT_FAILURE = 1


COMMANDS = (
    commands.demo,
    commands.db,
    commands.serve,
    commands.broker,
    commands.site,
    commands.admin,
    commands.hub,
    commands.consent,
    commands.audit,
    commands.alerts,
    commands.notify,
    commands.adherence,
    commands.review,
    commands.queries,
    commands.export,
    commands.decode,
    commands.bench,
    commands.cluster,
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
    for module in COMMANDS:
        module.register(sub)
    return parser


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
