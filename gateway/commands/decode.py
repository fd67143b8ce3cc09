"""`trialstream decode`: a captured GATT payload to JSON."""

from __future__ import annotations

import argparse
import sys

from gateway.commands.common import Subparsers
from gateway.settings import Settings


def register(sub: Subparsers) -> None:
    dec = sub.add_parser(
        "decode",
        help="decode a captured GATT payload",
        description="Decode one captured characteristic value and print one JSON object per "
        "reading. Exits 2 with one line for malformed input.",
    )
    dec.add_argument("characteristic", help="characteristic UUID: 0x2A37, 2a37 or the 128-bit form")
    dec.add_argument("payload", help="the value as hex (spaces and colons allowed)")
    dec.set_defaults(handler=_cmd_decode)


def _cmd_decode(args: argparse.Namespace, settings: Settings) -> int:
    from device_drivers.gatt.cli import run_decode

    return run_decode(args.characteristic, args.payload, sys.stdout, sys.stderr)
