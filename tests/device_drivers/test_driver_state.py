"""The hub state file: paired wearables, cursors and link marks, written atomically; and
the session's keeper of its link marks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from device_drivers.driver import HUB_STOPPED, LinkKeeper
from device_drivers.errors import DeviceDriverError
from device_drivers.state import FORMAT_VERSION, HubState, LinkMark, PairedWearable, StateError

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
    # No temporary left over; the lock file stays (processes take turns on it).
    assert sorted(p.name for p in path.parent.iterdir()) == [".hub.json.lock", "hub.json"]
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


def test_link_marks_survive_a_reopen_and_go_with_their_wearable(tmp_path: Path) -> None:
    path = tmp_path / "hub.json"
    state = HubState.open(path)
    state.remember(STRAP)
    state.set_link("hr-chest", LinkMark(1_700_000_000_000, "out_of_range"))
    state.set_link("glucose-1", LinkMark(1_700_000_000_500))
    reopened = HubState.open(path)
    assert reopened.link("hr-chest") == LinkMark(1_700_000_000_000, "out_of_range")
    assert reopened.link("glucose-1") == LinkMark(1_700_000_000_500, None)
    assert reopened.link("nobody") is None
    written = path.stat().st_ino  # each write renames a new file over it
    reopened.set_link("glucose-1", LinkMark(1_700_000_000_500))  # unchanged: not written
    assert path.stat().st_ino == written
    reopened.forget(STRAP.address)
    assert HubState.open(path).link("hr-chest") is None


@pytest.mark.parametrize(
    "entry",
    [
        [],
        "1700000000000",
        {},
        {"at_ms": "1700000000000"},
        {"at_ms": True},
        {"at_ms": 1.7e12},
        {"at_ms": -1},
        {"at_ms": 2**64},
        {"at_ms": 1, "outage": 7},
        {"at_ms": 1, "outage": ""},
        {"at_ms": 1, "outage": "x" * 65},
        {"at_ms": 1, "outage": "out\x00of_range"},
        {"at_ms": 1, "outage": "out\x85of_range"},
    ],
    ids=[
        "list",
        "text",
        "empty",
        "time-as-text",
        "time-boolean",
        "time-float",
        "time-negative",
        "time-past-int64",
        "reason-not-text",
        "reason-empty",
        "reason-too-long",
        "reason-nul",
        "reason-c1-control",
    ],
)
def test_a_damaged_link_mark_is_ignored_with_a_log_line(
    tmp_path: Path, entry: object, caplog: pytest.LogCaptureFixture
) -> None:
    """A damaged mark costs at most one gap's start, so it is not worth refusing the file:
    the wearables, cursors and other marks are read, and the hub goes on."""
    path = tmp_path / "hub.json"
    good = {"at_ms": 1_700_000_000_000, "outage": None}
    document = {
        "version": FORMAT_VERSION,
        "wearables": [{"address": STRAP.address, "sensor": "hr-chest", "profile": "heart_rate",
                       "bonded": True}],
        "cursors": {"glucose-1": {"glucose_sequence": 3}},
        "links": {"hr-chest": entry, "glucose-1": good},
    }  # fmt: skip
    path.write_text(json.dumps(document))
    state = HubState.open(path)
    assert state.link("hr-chest") is None
    assert state.link("glucose-1") == LinkMark(1_700_000_000_000)
    assert state.wearables == (STRAP,)
    assert state.cursor("glucose-1", "glucose_sequence") == 3
    assert "link mark ignored sensor='hr-chest'" in caplog.text


def test_link_marks_that_are_not_an_object_are_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "hub.json"
    path.write_text(json.dumps({"version": FORMAT_VERSION, "wearables": [], "links": [1, 2]}))
    assert HubState.open(path).link("hr-chest") is None
    assert "link marks ignored" in caplog.text


async def test_a_keeper_takes_up_an_open_outage_or_a_stopped_hub(tmp_path: Path) -> None:
    state = HubState.open(tmp_path / "hub.json")
    state.set_link("away", LinkMark(1_000, "driver_error"))
    state.set_link("watched", LinkMark(2_000))
    away, watched = LinkKeeper("away", state), LinkKeeper("watched", state)
    await away.restore(now_ms=5_000)
    await watched.restore(now_ms=5_000)
    assert (away.lost_at, away.reason) == (1_000, "driver_error")
    assert (watched.lost_at, watched.reason) == (2_000, HUB_STOPPED)

    await away.lost(6_000, "out_of_range")  # still out: the outage keeps its start and reason
    assert state.link("away") == LinkMark(1_000, "driver_error")
    recorded: list[tuple[int, int, str]] = []

    async def gap(from_ms: int, to_ms: int, reason: str) -> None:
        recorded.append((from_ms, to_ms, reason))

    await away.resumed(7_000, gap)
    await away.stopped(8_000)
    assert recorded == [(1_000, 7_000, "driver_error")]
    assert state.link("away") == LinkMark(8_000)


async def test_a_keeper_ignores_a_mark_later_than_its_clock(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = HubState.open(tmp_path / "hub.json")
    state.set_link("hr", LinkMark(9_000, "out_of_range"))
    keeper = LinkKeeper("hr", state)
    await keeper.restore(now_ms=5_000)
    assert keeper.lost_at is None
    assert "link mark later than the clock ignored sensor=hr" in caplog.text


async def test_a_keeper_whose_state_cannot_be_written_logs_and_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "hub.json"
    folder.mkdir()
    keeper = LinkKeeper("hr", HubState(folder, {}, {}))
    await keeper.lost(1_000, "out_of_range")
    assert keeper.lost_at == 1_000
    assert "link mark not written sensor=hr" in caplog.text


async def test_a_connected_link_is_written_at_most_once_per_interval(tmp_path: Path) -> None:
    now = [100.0]
    state = HubState.open(tmp_path / "hub.json")
    keeper = LinkKeeper("hr", state, interval_s=60.0, monotonic=lambda: now[0])

    async def no_gap(from_ms: int, to_ms: int, reason: str) -> None:
        raise AssertionError("no outage was open")

    await keeper.resumed(1_000, no_gap)
    now[0] += 59.0
    await keeper.watching(60_000)
    assert state.link("hr") == LinkMark(1_000)
    assert keeper.due_in() == pytest.approx(1.0)
    now[0] += 1.0
    await keeper.watching(61_000)
    assert state.link("hr") == LinkMark(61_000)
