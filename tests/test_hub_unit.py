"""The hub's systemd unit agrees with the hub: the exit status that means "withdrawn" is
the one it never restarts on, it runs the hub's command on its own state directory, and
it stops the hub with the signal the hub handles."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

from device_drivers.cli import PROG
from device_drivers.credentials import EXIT_WITHDRAWN

UNIT = Path(__file__).resolve().parents[1] / "deploy" / "systemd" / "trialstream-hub.service"


def unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser


def test_the_unit_never_restarts_a_withdrawn_hub() -> None:
    service = unit()["Service"]
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == str(EXIT_WITHDRAWN)


def test_the_unit_runs_the_hub_on_its_own_private_state_directory() -> None:
    service = unit()["Service"]
    command = shlex.split(service["ExecStart"])
    # The hub's own command, which a hub installed alone (`.[hub]`) has.
    assert Path(command[0]).name == PROG
    assert command[1:3] == ["run", "--hub-dir"]
    assert command[3] == f"/var/lib/{service['StateDirectory']}"
    assert service["StateDirectoryMode"] == "0700"
    assert service["KillSignal"] == "SIGINT"
    assert service["User"] != "root"


def _bytes(size: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)


def test_the_unit_bounds_the_hubs_memory_with_room_above_what_it_uses() -> None:
    service = unit()["Service"]
    high, ceiling = _bytes(service["MemoryHigh"]), _bytes(service["MemoryMax"])
    # What `bench hub-wearables` measured (20 wearables at 10 Hz): about 65 MiB resident.
    assert 2 * 65 * (1 << 20) < high < ceiling
