"""`trialstream hub`: the hub's own command line (``device_drivers.cli``, installed alone as
``trialstream-hub``) registered under the server's. One implementation: the parsers and
handlers are the hub's; this module only hands them the hub's settings, resolved from the
server's data directory, and turns the hub's user errors into the server's."""

from __future__ import annotations

import argparse
import os

from device_drivers import cli as hub_cli
from gateway.commands.common import Subparsers
from gateway.errors import ConfigError
from gateway.settings import Settings


def register(sub: Subparsers) -> None:
    hub = hub_cli.register(sub, "hub", prog="trialstream hub")
    hub.set_defaults(handler=_dispatch)


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    hub_settings = hub_cli.settings_for(
        args, os.environ, data_dir=settings.data_dir, log_level=settings.log_level
    )
    handler: hub_cli.HubHandler = args.hub_handler
    try:
        return handler(args, hub_settings)
    except hub_cli.HubCliError as exc:
        raise ConfigError(str(exc)) from exc
