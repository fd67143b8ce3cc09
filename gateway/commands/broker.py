"""`trialstream broker`: a private Mosquitto from deploy/mosquitto/."""

from __future__ import annotations

import argparse

from gateway.commands.common import Subparsers
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
