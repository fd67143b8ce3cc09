"""`trialstream hub wearables / unpair / pair` and the simulated kinds of `hub run`: the
hub's paired wearables as its state file keeps them, through the real command."""

from __future__ import annotations

import json
from pathlib import Path

from device_drivers import cli as hub_cli
from device_drivers import sim
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
