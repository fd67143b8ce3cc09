"""`trialstream hub wearables / unpair / pair` and the simulated kinds of `hub run`: the
hub's paired wearables as its state file keeps them, through the real command."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from bleak.exc import BleakDeviceNotFoundError

from device_drivers import cli as hub_cli
from device_drivers import pairing, sim
from device_drivers.state import HubState, PairedWearable
from tests.test_cli import trialstream


def paired(directory: Path) -> None:
    state = HubState.open(directory / "state.json")
    state.remember(PairedWearable("AA:00:00:00:00:01", "bp-cuff", "blood_pressure", True, user=2))
    state.remember(PairedWearable("AA:00:00:00:00:02", "strap", "heart_rate", True))


def test_wearables_lists_and_unpair_forgets(tmp_path: Path) -> None:
    paired(tmp_path)
    listed = trialstream("hub", "wearables", "--hub-dir", str(tmp_path))
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == [
        "AA:00:00:00:00:01  bp-cuff  blood_pressure  bonded  user 2",
        "AA:00:00:00:00:02  strap  heart_rate  bonded",
    ]
    # Typed in lower case, as a label may print it: the same wearable.
    gone = trialstream(
        "hub", "unpair", "--hub-dir", str(tmp_path), "--address", "aa:00:00:00:00:01"
    )
    assert gone.returncode == 0, gone.stderr
    assert "forgot bp-cuff at AA:00:00:00:00:01" in gone.stdout
    left = json.loads(trialstream("hub", "wearables", "--hub-dir", str(tmp_path), "--json").stdout)
    assert [w["sensor"] for w in left] == ["strap"]
    again = trialstream(
        "hub", "unpair", "--hub-dir", str(tmp_path), "--address", "AA:00:00:00:00:01"
    )
    assert again.returncode == 2
    assert "no wearable paired at AA:00:00:00:00:01" in again.stderr


def test_an_empty_or_broken_state_says_so(tmp_path: Path) -> None:
    empty = trialstream("hub", "wearables", "--hub-dir", str(tmp_path))
    assert "no wearables paired" in empty.stdout
    (tmp_path / "state.json").write_text("{not json")
    broken = trialstream("hub", "wearables", "--hub-dir", str(tmp_path))
    assert broken.returncode == 2
    assert "Traceback" not in broken.stderr
    assert "not JSON" in broken.stderr


def test_pair_refuses_a_bad_user_number(tmp_path: Path) -> None:
    for bad in ("255", "-1", "two"):
        done = trialstream(
            "hub", "pair", "--hub-dir", str(tmp_path), "--address", "AA:00:00:00:00:09",
            "--sensor", "cuff", "--user", bad,
        )  # fmt: skip
        assert done.returncode == 2
        assert "--user" in done.stderr


def test_every_simulated_kind_is_a_virtual_wearable() -> None:
    for kind, name in hub_cli._SIMULATED.items():
        assert issubclass(getattr(sim, name), sim.VirtualWearable), kind
    assert set(hub_cli._SIMULATED) == {"hr", "oxi", "bp", "temp", "glucose", "scale"}


class _Stack:
    """Stands in for the Bluetooth stack behind bleak's client: records what it was asked,
    and answers as told (done, an error, or no answer at all)."""

    asked: list[str] = []
    answer: str = "done"

    def __init__(self, address: str, **_: object) -> None:
        self.address = address

    async def unpair(self) -> None:
        _Stack.asked.append(self.address)
        if _Stack.answer == "error":
            raise BleakDeviceNotFoundError(self.address, "Device was not found.")
        if _Stack.answer == "hang":
            await asyncio.sleep(3600)


@pytest.mark.parametrize(
    ("answer", "flags", "asked", "says"),
    [
        ("done", (), True, "removed this computer's Bluetooth bond with AA:00:00:00:00:02"),
        ("error", (), True, "warning: this computer's Bluetooth bond with AA:00:00:00:00:02 was "
         "not removed (BleakDeviceNotFoundError: Device was not found.); remove it with "
         "`bluetoothctl remove AA:00:00:00:00:02`"),
        ("hang", (), True, "(no answer from the Bluetooth stack within 0.1 s)"),
        ("done", ("--keep-bond",), False, ""),
    ],
)  # fmt: skip
def test_unpair_removes_the_systems_bond_or_says_how(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    answer: str,
    flags: tuple[str, ...],
    asked: bool,
    says: str,
) -> None:
    paired(tmp_path)
    monkeypatch.setattr(pairing, "BleakClient", _Stack)
    monkeypatch.setattr(pairing, "REMOVE_BOND_TIMEOUT_S", 0.1)
    monkeypatch.setattr(_Stack, "asked", [])
    monkeypatch.setattr(_Stack, "answer", answer)
    argv = ["unpair", "--hub-dir", str(tmp_path), "--address", "AA:00:00:00:00:02", *flags]
    assert hub_cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert "forgot strap at AA:00:00:00:00:02" in out
    assert says in out + err
    assert _Stack.asked == (["AA:00:00:00:00:02"] if asked else [])
    assert [w.sensor for w in HubState.open(tmp_path / "state.json").wearables] == ["bp-cuff"]


def test_a_wearable_never_bonded_is_only_forgotten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    HubState.open(tmp_path / "state.json").remember(
        PairedWearable("AA:00:00:00:00:03", "scale", "weight", bonded=False)
    )
    monkeypatch.setattr(pairing, "BleakClient", _Stack)
    monkeypatch.setattr(_Stack, "asked", [])
    assert (
        hub_cli.main(["unpair", "--hub-dir", str(tmp_path), "--address", "AA:00:00:00:00:03"]) == 0
    )
    assert capsys.readouterr().out == "forgot scale at AA:00:00:00:00:03\n"
    assert _Stack.asked == []
