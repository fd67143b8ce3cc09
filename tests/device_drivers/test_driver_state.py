"""The hub state file: paired wearables and cursors, written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from device_drivers.errors import DeviceDriverError
from device_drivers.state import FORMAT_VERSION, HubState, PairedWearable, StateError

STRAP = PairedWearable("C0:5E:00:00:00:01", "hr-chest", "heart_rate", bonded=True)
METER = PairedWearable("C0:5E:00:00:00:02", "glucose-1", "glucose", bonded=False)


def test_a_missing_file_is_a_new_hub(tmp_path: Path) -> None:
    state = HubState.open(tmp_path / "hub.json")
    assert state.wearables == ()
    assert state.cursor("anything", "glucose_sequence") is None
    assert not (tmp_path / "hub.json").exists()  # nothing written until something changes


def test_wearables_and_cursors_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "hub.json"
    state = HubState.open(path)
    state.remember(STRAP)
    state.remember(METER)
    state.set_cursor("glucose-1", "glucose_sequence", 41)
    state.set_cursor("glucose-1", "glucose_sequence", 42)

    reopened = HubState.open(path)
    assert reopened.wearables == (STRAP, METER)
    assert reopened.wearable(METER.address) == METER
    assert reopened.by_sensor("hr-chest") == STRAP
    assert reopened.by_sensor("nobody") is None
    assert reopened.cursor("glucose-1", "glucose_sequence") == 42
    assert [p.name for p in path.parent.iterdir()] == ["hub.json"]  # no temporary left over
    assert json.loads(path.read_text())["version"] == FORMAT_VERSION


def test_remember_replaces_by_address_and_forget_drops_cursors(tmp_path: Path) -> None:
    path = tmp_path / "hub.json"
    state = HubState.open(path)
    state.remember(METER)
    state.set_cursor("glucose-1", "glucose_sequence", 7)
    bonded = PairedWearable(METER.address, METER.sensor, METER.profile, bonded=True)
    state.remember(bonded)
    assert HubState.open(path).wearables == (bonded,)
    state.forget(METER.address)
    state.forget("C0:5E:00:00:00:99")  # unknown: nothing to do
    reopened = HubState.open(path)
    assert reopened.wearables == ()
    assert reopened.cursor("glucose-1", "glucose_sequence") is None


def test_a_sensor_name_belongs_to_one_wearable(tmp_path: Path) -> None:
    state = HubState.open(tmp_path / "hub.json")
    state.remember(STRAP)
    with pytest.raises(StateError):
        state.remember(PairedWearable("C0:5E:00:00:00:03", STRAP.sensor, "heart_rate", True))
    assert state.wearables == (STRAP,)


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        json.dumps({"version": 99, "wearables": [], "cursors": {}}),
        json.dumps({"version": FORMAT_VERSION, "wearables": {}, "cursors": {}}),
        json.dumps({"version": FORMAT_VERSION, "wearables": [1], "cursors": {}}),
        json.dumps({"version": FORMAT_VERSION, "wearables": [{"address": "x"}], "cursors": {}}),
        json.dumps({"version": FORMAT_VERSION, "wearables": [], "cursors": []}),
        json.dumps({"version": FORMAT_VERSION, "wearables": [], "cursors": {"s": {"c": "1"}}}),
        json.dumps({"version": FORMAT_VERSION, "wearables": [], "cursors": {"s": {"c": True}}}),
    ],
    ids=[
        "not-json",
        "not-an-object",
        "other-version",
        "wearables-not-list",
        "wearable-not-object",
        "wearable-incomplete",
        "cursors-not-object",
        "cursor-not-integer",
        "cursor-boolean",
    ],
)
def test_a_damaged_file_is_refused_with_a_typed_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "hub.json"
    path.write_text(content)
    with pytest.raises(StateError) as refused:
        HubState.open(path)
    assert isinstance(refused.value, DeviceDriverError)


def test_writing_over_a_folder_is_a_typed_error(tmp_path: Path) -> None:
    path = tmp_path / "hub.json"
    path.mkdir()
    with pytest.raises(StateError):
        HubState.open(path)
    with pytest.raises(StateError):
        HubState(path, {}, {}).remember(STRAP)
