"""`trialstream broker`: a private Mosquitto from deploy/mosquitto/, and `trialstream broker
publish-crl`, which re-issues the study CA's revocation list and makes the broker load it."""

from __future__ import annotations

import argparse

from gateway.commands.common import Subparsers, add_database_flags, run
from gateway.settings import Settings


def register(sub: Subparsers) -> None:
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
    actions = br.add_subparsers(dest="broker_command", metavar="ACTION", required=False)
    crl = actions.add_parser(
        "publish-crl",
        help="re-issue the study CA's CRL from the database and make the broker reload it",
        description="Re-issue the study CA's certificate revocation list (<CA dir>/crl.pem) "
        "from the revoked devices in the database, reload the broker "
        "(TRIALSTREAM_BROKER_RELOAD or TRIALSTREAM_BROKER_PID_FILE) and check that it "
        "refuses a certificate the new list revokes. Run it daily (the CRL expires "
        "after 30 days, and then the broker refuses every hub) and after restoring the CA.",
    )
    add_database_flags(crl)
    crl.set_defaults(handler=_cmd_publish_crl)
    sync = actions.add_parser(
        "sync-hubs",
        help="make RabbitMQ's hub users match the database's active devices",
        description="On RabbitMQ (TRIALSTREAM_RABBITMQ_ADMIN_URL): create the broker identity "
        "of every active device that has none (a hub enrolled while the broker could not be "
        "reached, or a new cluster), and remove those of devices revoked or unknown, closing "
        "their connections. Users the gateway did not create (not tagged trialstream-hub) "
        "are left alone.",
    )
    add_database_flags(sync)
    sync.set_defaults(handler=_cmd_sync_hubs)


def _cmd_sync_hubs(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.errors import ConfigError
    from gateway.rabbit_admin import RabbitAdmin
    from storage import db, registry

    if not settings.rabbitmq_admin_url:
        raise ConfigError("TRIALSTREAM_RABBITMQ_ADMIN_URL is not set: there is no RabbitMQ to sync")
    admin = RabbitAdmin(settings.rabbitmq_admin_url)

    async def sync() -> tuple[list[str], list[str]]:
        async with db.connection(settings.require_database_url()) as conn:
            active = await registry.active_device_ids(conn)
        report = await admin.sync(set(active))
        return report.created, report.removed

    created, removed = run(sync())
    print(f"hub identities created: {len(created)}{': ' + ', '.join(created) if created else ''}")
    print(f"hub identities removed: {len(removed)}{': ' + ', '.join(removed) if removed else ''}")
    return 0


def _cmd_publish_crl(args: argparse.Namespace, settings: Settings) -> int:
    import sys

    from gateway import revocation

    outcome = run(revocation.refresh(settings))
    ca_crl = settings.ca_path / "crl.pem"
    print(f"CRL published: {ca_crl}")
    if outcome.crl_loaded_after_s is not None:
        print(f"broker reloaded ({outcome.reload}) and refuses revoked certificates")
    for problem in outcome.problems:
        print(f"warning: {problem}", file=sys.stderr)
    return 1 if outcome.problems else 0


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
