"""The hub's command line: ``trialstream-hub`` (enroll, run, status, pair, wearables,
unpair), installed with the hub alone (``pip install 'trialstream[hub]'``).

The server's ``trialstream hub ...`` is the same parser and the same handlers, registered
under its own command line (``gateway/commands/hub.py``): one implementation. Nothing here
imports the server (gateway, storage, consent) or its dependencies, which a hub installed
alone does not have; tests/test_hub_footprint.py holds that.

Every failure the participant's technician can fix ends as one line starting with
``error:`` and exit status 2; a hub the site withdrew exits with ``EXIT_WITHDRAWN`` (4),
which its service manager does not restart on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from device_drivers import cli_pairing
from device_drivers.cli_common import HubCliError as HubCliError
from device_drivers.cli_common import run, state_of
from device_drivers.local_zone import ENV_VARIABLE
from device_drivers.settings import LOG_LEVELS, HubSettings

HubHandler = Callable[[argparse.Namespace, HubSettings], int]

if TYPE_CHECKING:
    from device_drivers.identity import EnrollmentTicket

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

PROG: Final = "trialstream-hub"
EXIT_USER_ERROR: Final = 2
EXIT_INTERRUPTED: Final = 130
DESCRIPTION: Final = (
    "The hub reads the participant's wearables, keeps every reading in a durable "
    "outbox and relays signed envelopes to the gateway until each is receipted."
)

# A relay away from its broker longer than this is shown as OFFLINE: longer than a Wi-Fi
# blip or a router's restart (minutes), long before the outbox fills (days of readings).
OFFLINE_ALERT_S: Final = 15 * 60


def build_parser() -> argparse.ArgumentParser:
    """``trialstream-hub``'s parser: the hub's actions at the top level."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog="Settings also come from TRIALSTREAM_HUB_DIR, TRIALSTREAM_DATA_DIR and "
        "TRIALSTREAM_LOG_LEVEL; flags win.",
    )
    parser.add_argument(
        "--log-level",
        choices=list(LOG_LEVELS),
        help="logging level (default: INFO, or $TRIALSTREAM_LOG_LEVEL)",
    )
    add_actions(parser, PROG)
    return parser


def register(
    sub: Subparsers, name: str = "hub", *, prog: str = "trialstream hub"
) -> argparse.ArgumentParser:
    """Add the hub's actions as ``name`` under another command line (the server's);
    returns that group's parser, whose handler the caller sets. Each action's own handler
    is ``args.hub_handler``, called with the ``HubSettings`` of ``settings_for``."""
    hub = sub.add_parser(
        name, help="the participant's hub: enroll, run, status", description=DESCRIPTION
    )
    add_actions(hub, prog)
    return hub


def settings_for(args: argparse.Namespace, env: Any = None, **overrides: Any) -> HubSettings:
    """The hub's settings for parsed ``args``: ``overrides``, their flags, then the
    environment."""
    flags: dict[str, Any] = {
        "hub_dir": getattr(args, "hub_dir", None),
        "log_level": getattr(args, "log_level", None),
    }
    return HubSettings.from_env(os.environ if env is None else env, **(flags | overrides))


def add_actions(parser: argparse.ArgumentParser, prog: str) -> None:
    """The actions (enroll, run, status, pair, wearables, unpair) under ``parser``."""
    parser.set_defaults(hub_prog=prog)
    actions = parser.add_subparsers(dest="hub_command", metavar="ACTION", required=True)

    p = actions.add_parser(
        "enroll",
        help="enroll this hub with a site's code",
        description="Make this hub's key (it never leaves the hub), send a "
        "certificate request with the code, and keep the identity returned. The gateway must "
        "be reached over https (plain http only on this machine), and the study CA it returns "
        "must be the one the code names, or nothing is kept.",
    )
    p.add_argument(
        "ticket",
        nargs="?",
        metavar="'trialstream:enroll?...'",
        help="the site's enrollment code as its QR code or `site enroll-code` gives it"
        " (gateway, code and the study CA's fingerprint)",
    )
    p.add_argument("--gateway", help="instead of the whole code: the gateway's https URL")
    p.add_argument("--code", help="instead of the whole code: the code itself")
    p.add_argument(
        "--ca-sha256",
        help="instead of the whole code: the study CA's SHA-256 fingerprint (hex); needed"
        " unless the gateway is on this machine",
    )
    p.add_argument(
        "--hub-dir",
        help="where the hub keeps its identity"
        " (default: $TRIALSTREAM_HUB_DIR, else <data dir>/hub)",
    )
    p.set_defaults(hub_handler=_enroll)

    p = actions.add_parser(
        "run",
        help="read wearables and relay until Ctrl-C",
        description="Run the hub: one supervised session per wearable, the "
        "outbox, and the relay to the broker.",
    )
    p.add_argument(
        "--hub-dir", help="the hub's directory (default: $TRIALSTREAM_HUB_DIR, else <data dir>/hub)"
    )
    p.add_argument(
        "--wearable",
        action="append",
        default=[],
        metavar="ADDRESS=SENSOR",
        help="a wearable's Bluetooth address and the sensor name its readings carry (repeatable)",
    )
    p.add_argument(
        "--simulate",
        action="append",
        default=[],
        metavar="KIND",
        help=f"add a virtual wearable on a simulated radio ({', '.join(_SIMULATED)}); repeatable",
    )
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument(
        "--simulated-radio",
        type=cli_pairing.simulated_radio,
        metavar="tcp-client:HOST:PORT",
        help="read the paired and named wearables over a simulated radio's controller at this "
        "HCI transport (as `pair --simulated-radio` pairs them) instead of this computer's "
        "Bluetooth; for tests and rehearsals",
    )
    p.set_defaults(hub_handler=_run)

    p = actions.add_parser(
        "status",
        help="wearables, outbox, receipts and gaps",
        description="What the hub holds and how it is doing: paired wearables, "
        "newest reading per metric, outbox depth, oldest unsent reading, last "
        "receipt, rejected envelopes.",
    )
    p.add_argument(
        "--hub-dir", help="the hub's directory (default: $TRIALSTREAM_HUB_DIR, else <data dir>/hub)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(hub_handler=_status)

    p = actions.add_parser(
        "pair",
        help="find a wearable, pair with it and remember it",
        description="Scan for wearables in pairing mode and list them (name, address, "
        "signal, services); pair and bond with the one chosen (or given with --address), read "
        "what it says about itself (Device Information, battery), set its clock, and "
        "remember it in the hub's state file under SENSOR, the name its readings carry; "
        "`run` then reads it. At a terminal, what the flags leave open is asked: which "
        "wearable, its name, the passkey it shows; without a terminal, give --address (and "
        "--passkey if it shows one). With this computer's Bluetooth (BlueZ), a wearable that "
        "shows a passkey is paired through the system's agent (bluetoothctl's), which asks "
        "for it; over --simulated-radio the hub answers itself. A cuff or scale shared in a "
        "household: give the participant's user number on it with --user, and the gateway "
        "refuses the readings of the other users.",
    )
    p.add_argument(
        "--hub-dir", help="the hub's directory (default: $TRIALSTREAM_HUB_DIR, else <data dir>/hub)"
    )
    p.add_argument(
        "--address", help="the wearable's Bluetooth address (default: choose from the scan)"
    )
    p.add_argument(
        "--sensor",
        type=cli_pairing.sensor_name,
        help="the name its readings carry, e.g. bp-cuff (default: asked at a terminal, "
        "else its profile's name, e.g. blood_pressure)",
    )
    p.add_argument(
        "--passkey",
        type=cli_pairing.passkey,
        metavar="NNNNNN",
        help="the 6 digits the wearable shows when pairing asks for them"
        " (default: asked at the terminal)",
    )
    p.add_argument(
        "--user", type=cli_pairing.user_index, help="the participant's user number (0-254)"
    )
    p.add_argument(
        "--list", action="store_true", help="only scan, list the wearables found, and stop"
    )
    p.add_argument(
        "--scan-seconds",
        type=cli_pairing.scan_seconds,
        default=cli_pairing.PAIR_SCAN_S,
        metavar="S",
        help=f"how long to scan for wearables (default: {cli_pairing.PAIR_SCAN_S:g})",
    )
    p.add_argument(
        "--simulated-radio",
        type=cli_pairing.simulated_radio,
        metavar="tcp-client:HOST:PORT",
        help="pair over a simulated radio's controller at this HCI transport (as "
        "device_drivers.sim.RadioProcess serves one) instead of this computer's Bluetooth; "
        "the hub's own host stack then pairs and answers the passkey. For tests and "
        "rehearsals: the bond lasts only as long as the command.",
    )
    p.set_defaults(hub_handler=cli_pairing.pair)

    p = actions.add_parser(
        "wearables",
        help="the wearables this hub has paired",
        description="The wearables remembered in the hub's state file: address, sensor "
        "name, profile, bonded, the participant's user number on a shared one.",
    )
    p.add_argument(
        "--hub-dir", help="the hub's directory (default: $TRIALSTREAM_HUB_DIR, else <data dir>/hub)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(hub_handler=cli_pairing.wearables)

    p = actions.add_parser(
        "unpair",
        help="forget a paired wearable",
        description="Forget the wearable at ADDRESS (and its cursors) in the hub's state "
        "file; `run` no longer reads it (a running hub within 10 s). Its readings already in "
        "the outbox still go. A bonded wearable's bond is also removed from this computer's "
        "Bluetooth (BlueZ), unless --keep-bond; if that fails, a warning says how to remove "
        "it by hand.",
    )
    p.add_argument(
        "--hub-dir", help="the hub's directory (default: $TRIALSTREAM_HUB_DIR, else <data dir>/hub)"
    )
    p.add_argument("--address", required=True, help="the wearable's Bluetooth address")
    p.add_argument(
        "--keep-bond",
        action="store_true",
        help="keep this computer's Bluetooth bond with it (only the hub forgets it)",
    )
    p.set_defaults(hub_handler=cli_pairing.unpair)


def _enroll(args: argparse.Namespace, settings: HubSettings) -> int:
    from device_drivers.identity import HubIdentityError, enroll

    directory = settings.hub_dir
    try:
        identity = run(enroll(directory, _ticket(args)))
    except HubIdentityError as exc:
        raise HubCliError(str(exc)) from exc
    print(
        f"enrolled as {identity.device_id} for participant {identity.participant_id} "
        f"({identity.study_id}); broker {identity.broker_host}:{identity.broker_port}"
        f"{' with TLS' if identity.broker_tls else ''}; identity in {directory}"
    )
    return 0


def _ticket(args: argparse.Namespace) -> EnrollmentTicket:
    from device_drivers.identity import HubIdentityError, checked_ticket, parse_enrollment

    if args.ticket is not None:
        if args.gateway or args.code or args.ca_sha256:
            raise HubIdentityError("give the whole code, or --gateway and --code, not both")
        return parse_enrollment(args.ticket)
    if args.gateway and args.code:
        return checked_ticket(args.gateway, args.code, args.ca_sha256)
    raise HubIdentityError("give the site's whole code, or --gateway and --code")


def _run(args: argparse.Namespace, settings: HubSettings) -> int:
    from device_drivers.credentials import EXIT_WITHDRAWN, HubWithdrawn, check_not_withdrawn
    from device_drivers.identity import HubIdentity, HubIdentityError

    directory = settings.hub_dir
    try:
        identity = HubIdentity.load(directory)
        check_not_withdrawn(directory)
    except HubWithdrawn as exc:
        print(f"hub {directory}: {exc}", file=sys.stderr)
        return EXIT_WITHDRAWN
    except HubIdentityError as exc:
        raise HubCliError(str(exc)) from exc
    wearables: list[tuple[str, str]] = []
    for item in args.wearable:
        address, _, sensor = item.partition("=")
        if not address or not sensor:
            raise HubCliError(f"--wearable {item!r}: expected ADDRESS=SENSOR")
        wearables.append((address, sensor))
    unknown = [k for k in args.simulate if k not in _SIMULATED]
    if unknown:
        raise HubCliError(f"--simulate {unknown[0]!r}: known kinds are {', '.join(_SIMULATED)}")
    if args.simulate and args.simulated_radio:
        raise HubCliError("--simulate brings its own radio: give it or --simulated-radio, not both")
    paired = {w.address for w in state_of(directory).wearables} - {a for a, _ in wearables}
    if not wearables and not args.simulate and not paired:
        raise HubCliError(
            f"no wearables: pair one with `{args.hub_prog} pair`, or give --wearable ADDRESS=SENSOR"
            " or --simulate hr"
        )
    count = len(wearables) + len(args.simulate) + len(paired)
    print(
        f"hub {identity.device_id}: {count} wearable(s), "
        f"broker {identity.broker_host}:{identity.broker_port}; Ctrl-C stops",
        flush=True,
    )
    try:
        with contextlib.suppress(KeyboardInterrupt):
            run(_run_hub(identity, wearables, args.simulate, args.duration, args.simulated_radio))
    except HubWithdrawn as exc:
        print(f"hub {identity.device_id} stopped: {exc}", file=sys.stderr)
        return EXIT_WITHDRAWN
    return 0


_SIMULATED = {
    "hr": "VirtualHeartRateStrap",
    "oxi": "VirtualPulseOximeter",
    "bp": "VirtualBloodPressureCuff",
    "temp": "VirtualThermometer",
    "glucose": "VirtualGlucoseMeter",
    "scale": "VirtualWeightScale",
}


async def _run_hub(
    identity: Any,
    wearables: list[tuple[str, str]],
    simulate: list[str],
    duration: float | None,
    simulated_radio: str | None = None,
) -> None:
    from device_drivers.credentials import HubWithdrawn
    from device_drivers.driver import WearableSpec
    from device_drivers.hub_factory import open_hub
    from device_drivers.pairing import BleBackends

    async with contextlib.AsyncExitStack() as stack:
        specs = [WearableSpec(a, s) for a, s in wearables]
        backends = None
        if simulate:
            from device_drivers import sim

            radio = await stack.enter_async_context(sim.VirtualRadio())
            adapter = await sim.SimAdapter.create(radio)
            stack.push_async_callback(adapter.close)
            backends = BleBackends(adapter.scanner_backend, adapter.client_backend)
            for i, kind in enumerate(simulate):
                wearable = getattr(sim, _SIMULATED[kind])(f"TS-{kind.upper()}-{i:04d}", seed=i)
                await stack.enter_async_context(wearable.running(radio))
                specs.append(WearableSpec(wearable.address, f"{kind}-{i}"))
        elif simulated_radio is not None:
            from device_drivers import sim

            try:
                adapter = await sim.SimAdapter.connect_hci(simulated_radio)
            except OSError as exc:
                raise HubCliError(
                    f"cannot reach the simulated radio at {simulated_radio}: {exc}"
                ) from exc
            stack.push_async_callback(adapter.close)
            backends = BleBackends(adapter.scanner_backend, adapter.client_backend)
        parts = await open_hub(identity, stack, wearables=specs, backends=backends)
        try:
            async with asyncio.timeout(duration):
                await parts.hub.run()
        except* TimeoutError:
            pass
        except* HubWithdrawn as group:
            raise group.exceptions[0] from None


def _status(args: argparse.Namespace, settings: HubSettings) -> int:
    from dataclasses import asdict

    from device_drivers.credentials import certificate_window, recorded_standing
    from device_drivers.identity import HubIdentity, HubIdentityError
    from device_drivers.outbox import Outbox, OutboxError

    directory = settings.hub_dir
    try:
        identity = HubIdentity.load(directory)
        window = certificate_window(identity) if identity.broker_tls else None
        with Outbox.open(directory / "outbox.sqlite", identity.device_id) as outbox:
            stats = asdict(outbox.stats())
            rejected = [asdict(r) for r in outbox.rejected(10)]
    except (HubIdentityError, OutboxError) as exc:
        raise HubCliError(str(exc)) from exc
    try:
        running: dict[str, Any] | None = json.loads((directory / "status.json").read_text())
    except (OSError, json.JSONDecodeError):
        running = None
    standing = recorded_standing(directory)
    report = {
        "device_id": identity.device_id,
        "participant_id": identity.participant_id,
        "standing": standing or {"status": "active"},
        "certificate": None
        if window is None
        else {
            "serial": window.serial,
            "not_after": window.not_after.isoformat(),
            "renew_from": window.renew_at().isoformat(),
        },
        "outbox": stats,
        "rejected": rejected,
        "running": running,
    }
    now_ms = int(time.time() * 1000)
    report["offline"] = offline = _offline(running, now_ms)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"hub {identity.device_id} (participant {identity.participant_id})")
    if standing is not None:
        print(
            f"  WITHDRAWN ({standing.get('status')}): this hub no longer relays; "
            "contact the study site for a new enrollment code"
        )
    if window is not None:
        print(
            f"  certificate valid until {window.not_after:%Y-%m-%d %H:%M} UTC"
            f" (renewed from {window.renew_at():%Y-%m-%d} on, while the gateway can be reached)"
        )
    if running is None:
        print("  not running (no status written yet)")
    else:
        age = (now_ms - running["written_at_ms"]) / 1000
        state = "connected" if running["broker_connected"] else "NOT connected"
        print(f"  broker: {state}; status {age:.0f} s old")
        zone = running.get("time_zone")
        print(
            f"  time zone: {zone}"
            if zone
            else f"  time zone: not known (set {ENV_VARIABLE}, e.g. Europe/Berlin)"
        )
        if offline is not None and offline["too_long"]:
            since = datetime.fromtimestamp(offline["since_ms"] / 1000, UTC)
            print(
                f"  OFFLINE for {_hours_minutes(offline['for_s'])} (since {since:%Y-%m-%d %H:%M}"
                " UTC): readings wait in the outbox; check the hub's network"
            )
        for w in running["wearables"]:
            info = w["info"] or {}
            print(
                f"  wearable {w['sensor']} ({info.get('model') or '?'}, battery "
                f"{info.get('battery_level', '?')}%): "
                f"{'connected' if w['connected'] else 'not connected'}, {w['readings']} readings, "
                f"{w['gaps']} gaps{', last error ' + w['last_error'] if w['last_error'] else ''}"
            )
        for metric, latest in sorted(running["latest"].items()):
            ago = (now_ms - latest["t_ms"]) / 1000
            print(f"  latest {metric}: {latest['value']:g} ({ago:.0f} s ago)")
    oldest = stats["oldest_unreceipted_t_ms"]
    print(
        f"  outbox: {stats['pending_readings']} readings pending, "
        f"{stats['unreceipted_envelopes']} envelopes awaiting receipt"
        + (f", oldest from {(now_ms - oldest) / 1000:.0f} s ago" if oldest else "")
        + f"; {stats['bytes_used'] / 2**20:.1f} of {stats['max_bytes'] / 2**20:.0f} MiB"
        + (" (NEARLY FULL: the hub has been offline too long)" if stats["near_full"] else "")
    )
    if stats["last_receipt_seq"] is not None:
        print(
            f"  last receipt: envelope {stats['last_receipt_seq']} {stats['last_receipt_status']}"
        )
    for r in rejected:
        print(f"  rejected envelope {r['seq']}: {r['reason']} ({r['readings']} readings)")
    return 0


def _offline(running: dict[str, Any] | None, now_ms: int) -> dict[str, Any] | None:
    """How long the running hub's relay has been away from its broker, by its status file:
    since when, for how many seconds, and whether that is past ``OFFLINE_ALERT_S``. None
    when it is connected or the file does not say (a hub from before this field)."""
    if running is None or running.get("broker_connected"):
        return None
    since = running.get("broker_offline_since_ms")
    if not isinstance(since, int) or isinstance(since, bool):
        return None
    seconds = max(0, now_ms - since) // 1000
    return {"since_ms": since, "for_s": seconds, "too_long": seconds >= OFFLINE_ALERT_S}


def _hours_minutes(seconds: int) -> str:
    hours, minutes = divmod(seconds // 60, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


def _checked(settings: HubSettings) -> HubSettings:
    if settings.log_level not in LOG_LEVELS:
        raise HubCliError(
            f"TRIALSTREAM_LOG_LEVEL={settings.log_level!r} is not valid:"
            f" expected one of {', '.join(LOG_LEVELS)}"
        )
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _checked(settings_for(args))
        logging.basicConfig(
            level=settings.log_level,
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s %(message)s",
        )
        handler: HubHandler = args.hub_handler
        return handler(args, settings)
    except HubCliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
