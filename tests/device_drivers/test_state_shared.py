"""The hub's state file shared by processes: the running hub and `pair` / `unpair` at the
command line. Each change is made on the document as it is on disk, under a lock, so none
overwrites another's; a damaged file is written over rather than stopping the hub."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from device_drivers.state import HubState, LinkMark, PairedWearable

STRAP = PairedWearable("C0:5E:00:00:00:01", "hr-chest", "heart_rate", bonded=True)
CUFF = PairedWearable("C0:5E:00:00:00:02", "bp-cuff", "blood_pressure", bonded=True, user=1)
METER = PairedWearable("C0:5E:00:00:00:03", "glucose-1", "glucose", bonded=False)


def test_a_running_hub_keeps_what_pair_wrote_since_it_opened_the_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    running = HubState.open(path)  # the service, started first
    running.remember(STRAP)
    HubState.open(path).remember(CUFF)  # `pair` in another process
    running.set_link(STRAP.sensor, LinkMark(1_000))  # the service writes a link mark
    running.set_cursor(METER.sensor, "glucose_sequence", 4)
    reopened = HubState.open(path)
    assert reopened.wearables == (STRAP, CUFF)
    assert reopened.link(STRAP.sensor) == LinkMark(1_000)
    assert reopened.cursor(METER.sensor, "glucose_sequence") == 4
    # The running hub sees the cuff too, from its next change on or when it reloads.
    assert running.wearables == (STRAP, CUFF)


def test_unpair_is_not_undone_by_the_running_hub(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    running = HubState.open(path)
    running.remember(STRAP)
    running.remember(METER)
    running.set_cursor(METER.sensor, "glucose_sequence", 9)
    HubState.open(path).forget(METER.address)  # `unpair`
    running.set_link(STRAP.sensor, LinkMark(2_000, "out_of_range"))
    reopened = HubState.open(path)
    assert reopened.wearables == (STRAP,)
    assert reopened.cursor(METER.sensor, "glucose_sequence") is None


def test_reload_reads_what_others_wrote(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    running = HubState.open(path)
    HubState.open(path).remember(STRAP)
    assert running.wearables == ()
    running.reload()
    assert running.wearables == (STRAP,)


def test_a_file_damaged_under_a_running_hub_is_written_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    running = HubState.open(path)
    running.remember(STRAP)
    path.write_text("{ not json")
    running.set_cursor(STRAP.sensor, "n", 1)
    assert "state file unreadable" in caplog.text
    assert HubState.open(path).wearables == (STRAP,)


def _add_cursors(path: str, sensor: str, count: int) -> None:
    state = HubState.open(Path(path))
    for i in range(count):
        state.set_cursor(sensor, "n", i + 1)


def test_two_processes_changing_it_at_once_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_add_cursors, args=(str(path), f"sensor-{k}", 200)) for k in range(2)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    cursors = json.loads(path.read_text())["cursors"]
    assert cursors == {"sensor-0": {"n": 200}, "sensor-1": {"n": 200}}
