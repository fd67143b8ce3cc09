"""``trialstream-hub pair``, ``wearables`` and ``unpair``: choosing a wearable from a scan,
its passkey from a flag or the terminal, and the hub's record of what it paired.

Apart from the rest of the command line (device_drivers/cli.py, which registers these
handlers and argument types) because pairing is its own conversation with the user.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Final

from device_drivers.cli_common import HubCliError, run, state_of
from device_drivers.settings import HubSettings

if TYPE_CHECKING:
    from device_drivers.pairing import BleBackends, FoundWearable, Pairing, PromptPairingAgent
    from device_drivers.state import HubState

# `pair`: a scan of 5 s finds a wearable advertising every 20 ms to 1 s
# (device_drivers.pairing.SCAN_TIMEOUT_S); up to 2 minutes for one that advertises slowly.
PAIR_SCAN_S: Final = 5.0
_PAIR_SCAN_RANGE_S: Final = (0.1, 120.0)
# A question at the terminal is asked this many times when the answer is not one: a typo or
# two, then the pairing is given up (the wearable stops waiting after a minute anyway).
_PROMPT_TRIES: Final = 3
# One answer typed at the terminal (a terminal in canonical mode hands over one line a read).
_MAX_ANSWER_BYTES: Final = 256
# Names from the air (advertised, Device Information) are shown cut to this many characters.
_MAX_SHOWN_CHARS: Final = 40


def user_index(text: str) -> int:
    try:
        n = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from exc
    if not 0 <= n <= 254:
        raise argparse.ArgumentTypeError("a user number is 0-254 (255 means unknown user)")
    return n


def passkey(text: str) -> int:
    from device_drivers.pairing import BadPasskey, parse_passkey

    try:
        return parse_passkey(text)
    except BadPasskey as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def sensor_name(text: str) -> str:
    from ingest.envelope import MAX_SENSOR_BYTES

    if not text or text != text.strip() or not text.isprintable():
        raise argparse.ArgumentTypeError(
            "a sensor name is printable text without spaces around it, e.g. bp-cuff"
        )
    if len(text.encode("utf-8")) > MAX_SENSOR_BYTES:
        raise argparse.ArgumentTypeError(f"a sensor name is at most {MAX_SENSOR_BYTES} bytes")
    return text


def scan_seconds(text: str) -> float:
    low, high = _PAIR_SCAN_RANGE_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not low <= seconds <= high:  # also refuses nan
        raise argparse.ArgumentTypeError(f"seconds from {low:g} to {high:g}")
    return seconds


def simulated_radio(text: str) -> str:
    # Only a TCP client: bumble's other transports open files, serial ports and USB devices.
    kind, _, rest = text.partition(":")
    host, _, port = rest.rpartition(":")
    if kind != "tcp-client" or not host or not port.isascii() or not port.isdigit():
        raise argparse.ArgumentTypeError("expected tcp-client:HOST:PORT")
    if not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError("a TCP port is 1-65535")
    return text


def _shown(text: str | None) -> str:
    """Text a wearable sent (its name, its model), safe to print: no control characters,
    which could move the cursor or rewrite the terminal, and cut to a sensible length."""
    if not text:
        return "?"
    shown = "".join(c if c.isprintable() else "?" for c in text[:_MAX_SHOWN_CHARS])
    return shown + ("..." if len(text) > _MAX_SHOWN_CHARS else "")


class _Terminal:
    """Questions on stderr, answers typed on stdin when it is a terminal.

    An answer is read when the event loop sees the terminal readable, not in a thread: a
    pairing that ends while a question waits (the wearable gone, the time up, Ctrl-C)
    stops waiting, and nothing is left blocked on the terminal.
    """

    def __init__(self, fd: int, out: Any) -> None:
        self.fd = fd
        self.out = out

    @classmethod
    def of_stdin(cls) -> _Terminal | None:
        try:
            fd = sys.stdin.fileno()
        except (AttributeError, ValueError, OSError):  # closed, replaced, or no file at all
            return None
        return cls(fd, sys.stderr) if os.isatty(fd) else None

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    async def ask(self, question: str) -> str | None:
        """The line typed, stripped; None at end of input (Ctrl-D)."""
        self.out.write(question)
        self.out.flush()
        loop = asyncio.get_running_loop()
        line: asyncio.Future[bytes] = loop.create_future()

        def readable() -> None:
            if line.done():
                return
            try:
                line.set_result(os.read(self.fd, _MAX_ANSWER_BYTES))
            except OSError as exc:
                line.set_exception(exc)

        loop.add_reader(self.fd, readable)
        try:
            data = await line
        finally:
            loop.remove_reader(self.fd)
        return data.decode("utf-8", "replace").strip() if data else None


class _PasskeyAnswer:
    """The pairing's questions (device_drivers.pairing.PasskeyPrompt) answered from
    --passkey, else at the terminal; without either, refused (and noted, to say so)."""

    def __init__(self, given: int | None, terminal: _Terminal | None) -> None:
        self.given = given
        self.terminal = terminal
        self.no_terminal = False

    async def passkey(self, sensor: str) -> int | None:
        from device_drivers.pairing import BadPasskey, parse_passkey

        if self.given is not None:
            return self.given
        if self.terminal is None:
            self.no_terminal = True
            return None
        for _ in range(_PROMPT_TRIES):
            text = await self.terminal.ask(f"{sensor} shows a 6-digit passkey; type it here: ")
            if text is None:
                return None
            try:
                return parse_passkey(text)
            except BadPasskey as exc:
                self.terminal.say(str(exc))
        return None

    async def confirm(self, sensor: str, number: int) -> bool:
        if self.given is not None:
            return number == self.given
        if self.terminal is None:
            self.no_terminal = True
            return False
        text = await self.terminal.ask(f"does {sensor} show {number:06d}? [y/N]: ")
        return text is not None and text.lower() in {"y", "yes"}


def pair(args: argparse.Namespace, settings: HubSettings) -> int:
    from bleak.exc import BleakError

    from device_drivers.pairing import (
        DriverError,
        PasskeyNotGiven,
        PasskeyRejected,
    )
    from device_drivers.state import StateError

    if args.passkey is not None and args.simulated_radio is None:
        raise HubCliError(
            "--passkey is answered by the hub's own Bluetooth host (--simulated-radio) only; "
            "with this computer's Bluetooth, the system's agent asks for the passkey "
            "(bluetoothctl: agent KeyboardDisplay, default-agent)"
        )
    state = state_of(settings.hub_dir)
    terminal = _Terminal.of_stdin()
    answers = _PasskeyAnswer(args.passkey, terminal)
    try:
        done = run(_pairing(args, state, answers, terminal))
    except PasskeyNotGiven as exc:
        if answers.no_terminal:
            raise HubCliError(
                f"{exc}, and there is no terminal to type it in: give it with --passkey NNNNNN"
            ) from exc
        raise HubCliError(str(exc)) from exc
    except PasskeyRejected as exc:
        given = " (the one given with --passkey)" if args.passkey is not None else ""
        raise HubCliError(f"{exc}{given}; read them off its display and pair again") from exc
    except (DriverError, StateError) as exc:
        raise HubCliError(str(exc)) from exc
    except BleakError as exc:
        raise HubCliError(f"Bluetooth is not usable here: {exc}") from exc
    except OSError as exc:  # no D-Bus system bus (no BlueZ), or the radio's link went away
        where = (
            "the system's Bluetooth service (bluetoothd, over D-Bus)"
            if args.simulated_radio is None
            else f"the simulated radio at {args.simulated_radio}"
        )
        raise HubCliError(f"Bluetooth is not usable here: {where}: {exc}") from exc
    if done is None:
        return 0
    wearable, details = done.wearable, done.details
    user = "" if wearable.user is None else f", participant is user {wearable.user}"
    print(f"paired {wearable.sensor} ({wearable.profile}) at {wearable.address}{user}")
    device = " ".join(_shown(x) for x in (details.manufacturer, details.model) if x)
    print(
        f"  device: {device or 'not said'}"
        + (f", serial {_shown(details.serial)}" if details.serial else "")
        + (f", firmware {_shown(details.firmware)}" if details.firmware else "")
    )
    battery = "not said" if details.battery_level is None else f"{details.battery_level} %"
    print(f"  battery: {battery}")
    print(
        "  clock: set to the hub's time (UTC)"
        if details.clock_set
        else "  clock: none the hub can set"
    )
    return 0


async def _pairing(
    args: argparse.Namespace, state: HubState, answers: _PasskeyAnswer, terminal: _Terminal | None
) -> Pairing | None:
    """``pair``'s work in one event loop: the scan and list, the choice, the pairing. None
    when only listing, else the :class:`~device_drivers.pairing.Pairing` done."""
    from device_drivers.pairing import (
        PromptPairingAgent,
        discover,
        find,
        pair_and_set_up,
        profile_of,
    )

    agent = PromptPairingAgent(answers, state)
    async with contextlib.AsyncExitStack() as stack:
        backends = await _pairing_radio(args.simulated_radio, agent, stack)
        scan_s: float = args.scan_seconds
        address: str | None = args.address
        profile: str | None = None
        if address is None or args.list:
            found = await discover(backends, timeout_s=scan_s)
            _print_found(found, scan_s)
            if args.list:
                return None
            chosen = await _choose(found, terminal, scan_s)
            address, profile = chosen.address, chosen.profile
        sensor: str | None = args.sensor
        if sensor is None:
            if profile is None:
                _device, adv = await find(address, backends, scan_s)
                profile = profile_of(adv.service_uuids)
            sensor = await _name(state, address, profile, terminal)
        return await pair_and_set_up(
            address, sensor, state, backends, agent=agent, user=args.user, scan_timeout_s=scan_s
        )


async def _pairing_radio(
    spec: str | None, agent: PromptPairingAgent, stack: contextlib.AsyncExitStack
) -> BleBackends:
    """The Bluetooth ``pair`` uses: this computer's (bleak's own backend), or the hub's host
    stack on a simulated radio's controller, with ``agent`` answering the pairing."""
    from device_drivers.pairing import BleBackends

    if spec is None:
        return BleBackends()
    from device_drivers import sim

    try:
        adapter = await sim.SimAdapter.connect_hci(spec, agent=agent)
    except OSError as exc:
        raise HubCliError(f"cannot reach the simulated radio at {spec}: {exc}") from exc
    stack.push_async_callback(adapter.close)
    return BleBackends(adapter.scanner_backend, adapter.client_backend)


def _print_found(found: Sequence[FoundWearable], scan_s: float) -> None:
    if not found:
        print(f"no wearable in pairing mode found within {scan_s:g} s")
        return
    print("wearables in pairing mode, strongest signal first:")
    for number, w in enumerate(found, 1):
        services = ", ".join(_shown(s) for s in w.services) or w.profile
        print(f"  {number}  {_shown(w.name)}  {w.address}  {w.rssi} dBm  {services}")


async def _choose(
    found: Sequence[FoundWearable], terminal: _Terminal | None, scan_s: float
) -> FoundWearable:
    if not found:
        raise HubCliError(
            f"no wearable in pairing mode within {scan_s:g} s: wake it or put it in pairing"
            " mode, bring it next to the hub, and try again"
        )
    if terminal is None:
        raise HubCliError("choose the wearable to pair: give its address with --address")
    for _ in range(_PROMPT_TRIES):
        text = await terminal.ask(f"pair which one? [1-{len(found)}]: ")
        if text is None or not text:
            break
        if text.isascii() and text.isdigit() and 1 <= int(text) <= len(found):
            return found[int(text) - 1]
        terminal.say(f"a number from 1 to {len(found)}, as listed")
    raise HubCliError("no wearable chosen")


async def _name(state: HubState, address: str, profile: str, terminal: _Terminal | None) -> str:
    """The sensor name: asked at a terminal, else (and by default) the one the wearable was
    paired under before, else its profile's, made unique on this hub."""
    known = state.wearable(address.upper())
    default: str = (
        known.sensor
        if known is not None
        else next(
            name
            for name in (profile, *(f"{profile}-{n}" for n in range(2, 1000)))
            if state.by_sensor(name) is None
        )
    )
    if terminal is None:
        return default
    for _ in range(_PROMPT_TRIES):
        text = await terminal.ask(f"name its readings carry [{default}]: ")
        if text is None:
            break
        if not text:
            return default
        try:
            name = sensor_name(text)
        except argparse.ArgumentTypeError as exc:
            terminal.say(str(exc))
            continue
        taken = state.by_sensor(name)
        if taken is None or taken.address == address.upper():
            return name
        terminal.say(f"{name!r} is taken by {taken.address}; choose another name")
    raise HubCliError("no sensor name given")


def wearables(args: argparse.Namespace, settings: HubSettings) -> int:

    wearables = state_of(settings.hub_dir).wearables
    if args.json:
        print(json.dumps([asdict(w) for w in wearables]))
        return 0
    for w in wearables:
        user = "" if w.user is None else f"  user {w.user}"
        bonded = "bonded" if w.bonded else "not bonded"
        print(f"{w.address}  {w.sensor}  {w.profile}  {bonded}{user}")
    if not wearables:
        print(f"no wearables paired: `{args.hub_prog} pair --address ADDRESS --sensor NAME`")
    return 0


def unpair(args: argparse.Namespace, settings: HubSettings) -> int:
    state = state_of(settings.hub_dir)
    # As typed, else as pair records it (upper case): a MAC address is the same either way.
    address = args.address if state.wearable(args.address) else args.address.upper()
    known = state.wearable(address)
    if known is None:
        raise HubCliError(f"no wearable paired at {args.address}")
    state.forget(address)
    print(f"forgot {known.sensor} at {address}")
    if not known.bonded or args.keep_bond:
        return 0
    from device_drivers.pairing import remove_bond

    why = run(remove_bond(address))
    if why is None:
        print(f"removed this computer's Bluetooth bond with {address}")
    else:
        print(
            f"warning: this computer's Bluetooth bond with {address} was not removed ({why});"
            f" remove it with `bluetoothctl remove {address}`",
            file=sys.stderr,
        )
    return 0
