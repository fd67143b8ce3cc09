"""The hub's time zone: found from its settings or its system, kept in the outbox with the
time it was first seen, and sent once with the next envelope after it changes (protocol v3);
every odd name or file is ignored rather than sent."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from device_drivers import hub as hub_module
from device_drivers.hub import OutboxSink
from device_drivers.local_zone import ENV_VARIABLE, system_time_zone, valid_zone
from device_drivers.outbox import Outbox
from ingest.envelope import open_envelope
from ingest.model import Reading, ZoneReport

DEV = "hub-0001"
T0 = 1_700_000_000_000
READING = Reading(T0, "heart_rate", 70.0, "/min", "strap")


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def zones_sent(outbox: Outbox, key: ec.EllipticCurvePrivateKey, now_ms: int) -> list[object]:
    return [open_envelope(s.data).payload.zone for s in outbox.seal_pending(key, now_ms)]


def test_a_new_zone_travels_once_with_the_next_envelope(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    with Outbox.open(tmp_path / "o.sqlite", DEV) as outbox:
        assert outbox.time_zone() is None
        assert outbox.note_time_zone("Europe/Berlin", T0)
        assert not outbox.note_time_zone("Europe/Berlin", T0 + 60_000)  # the same: nothing
        # An envelope with nothing else is sealed for it.
        assert zones_sent(outbox, key, T0 + 1) == [ZoneReport("Europe/Berlin", T0)]
        outbox.add_readings([READING])
        assert zones_sent(outbox, key, T0 + 2) == [None]
        assert outbox.note_time_zone("America/New_York", T0 + 3)
        outbox.add_readings([READING._replace(t_ms=T0 + 4)])
        assert zones_sent(outbox, key, T0 + 5) == [ZoneReport("America/New_York", T0 + 3)]
        assert outbox.time_zone() == ZoneReport("America/New_York", T0 + 3)


def test_a_zone_not_yet_sent_survives_a_restart_and_the_same_zone_is_not_sent_again(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    path = tmp_path / "o.sqlite"
    with Outbox.open(path, DEV) as outbox:
        outbox.note_time_zone("Asia/Kolkata", T0)
    with Outbox.open(path, DEV) as outbox:
        assert not outbox.note_time_zone("Asia/Kolkata", T0 + 10)  # keeps its first time
        assert zones_sent(outbox, key, T0 + 20) == [ZoneReport("Asia/Kolkata", T0)]
    with Outbox.open(path, DEV) as outbox:
        assert not outbox.note_time_zone("Asia/Kolkata", T0 + 30)
        assert zones_sent(outbox, key, T0 + 40) == []


def test_an_outbox_of_schema_2_gains_the_zone_columns(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    Outbox.open(path, DEV).close()
    with sqlite3.connect(path) as db:
        for column in ("time_zone", "time_zone_since_ms", "time_zone_pending"):
            db.execute(f"ALTER TABLE meta DROP COLUMN {column}")
        db.execute("PRAGMA user_version = 2")
    with Outbox.open(path, DEV) as outbox:
        assert outbox.time_zone() is None
        assert outbox.note_time_zone("UTC", T0)


async def test_the_sink_notes_the_zone_with_its_clock(tmp_path: Path) -> None:
    with Outbox.open(tmp_path / "o.sqlite", DEV) as outbox:
        sink = OutboxSink(outbox)
        await sink.note_time_zone("Europe/Berlin")
        zone = outbox.time_zone()
        assert zone is not None
        assert zone.time_zone == "Europe/Berlin"
        assert abs(zone.since_ms / 1000 - sink.clock()) < 60
        assert sink.time_zone == "Europe/Berlin"


# --- where the zone comes from ------------------------------------------------------------


def etc_with(
    tmp_path: Path, *, timezone: bytes | None = None, localtime: str | None = None
) -> Path:
    etc = tmp_path / "etc"
    etc.mkdir()
    if timezone is not None:
        (etc / "timezone").write_bytes(timezone)
    if localtime is not None:
        os.symlink(localtime, etc / "localtime")
    return etc


def test_the_setting_wins_then_tz_then_etc_timezone_then_the_localtime_link(
    tmp_path: Path,
) -> None:
    etc = etc_with(tmp_path, timezone=b"Europe/Paris\n", localtime="/usr/share/zoneinfo/Asia/Tokyo")
    env = {ENV_VARIABLE: "Europe/Berlin", "TZ": ":America/Chicago"}
    assert system_time_zone(env, etc) == "Europe/Berlin"
    assert system_time_zone({"TZ": ":America/Chicago"}, etc) == "America/Chicago"
    assert system_time_zone({"TZ": "CET-1CEST"}, etc) == "Europe/Paris"  # a rule, not a name
    (etc / "timezone").unlink()
    assert system_time_zone({}, etc) == "Asia/Tokyo"
    (etc / "localtime").unlink()
    os.symlink("../usr/share/zoneinfo/posix/Australia/Adelaide", etc / "localtime")
    assert system_time_zone({}, etc) == "Australia/Adelaide"


@pytest.mark.parametrize(
    ("timezone", "localtime"),
    [
        pytest.param(None, None, id="nothing"),
        pytest.param(b"", "/etc/nowhere", id="empty-file-and-link-outside-zoneinfo"),
        pytest.param(b"Not/A_Zone\n", None, id="unknown-name"),
        pytest.param(b"../../etc/passwd\n", None, id="path"),
        pytest.param(b"\xff\xfe\x00garbage", None, id="binary"),
        pytest.param(b"Europe/Berlin" * 100, None, id="too-long"),
        pytest.param(None, "/usr/share/zoneinfo/", id="link-to-the-directory"),
        pytest.param(None, "/usr/share/zoneinfo/../../../etc/shadow", id="link-escaping"),
    ],
)
def test_odd_files_give_no_zone(
    tmp_path: Path, timezone: bytes | None, localtime: str | None
) -> None:
    assert system_time_zone({}, etc_with(tmp_path, timezone=timezone, localtime=localtime)) is None


@pytest.mark.parametrize(
    "name",
    [
        "",
        " ",
        "Europe",
        "Europe/",
        "/Europe/Berlin",
        "Europe//Berlin",
        "Europe/../Berlin",
        "Europe/Berlin\x00",
        "Europe/Zürich",
        "a" * 65,
        "Etc/GMT+99",
        "CET-1CEST",
    ],
)
def test_names_that_are_not_zones_are_refused(name: str) -> None:
    assert valid_zone(name) is None
    assert system_time_zone({ENV_VARIABLE: name}, Path("/nonexistent")) is None


@pytest.mark.parametrize("name", ["UTC", "Europe/Berlin", "America/Port-au-Prince", "Etc/GMT+5"])
def test_names_of_zones_are_kept(name: str) -> None:
    assert valid_zone(f" {name}\n") == name


async def test_the_hub_looks_at_its_zone_and_notes_a_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub_module, "TIME_ZONE_INTERVAL_S", 0.01)
    said = iter(["Europe/Berlin", "Europe/Berlin", None, "Europe/London"])
    with Outbox.open(tmp_path / "o.sqlite", DEV) as outbox:
        sink = OutboxSink(outbox)
        seen: list[str] = []
        task = asyncio.create_task(hub_module.Hub.watch_time_zone(lambda: next(said, None), sink))
        try:
            for _ in range(500):
                await asyncio.sleep(0.01)
                zone = outbox.time_zone()
                if zone is not None and zone.time_zone not in seen:
                    seen.append(zone.time_zone)
                # The sink learns the zone only after the outbox has it: wait for both.
                if "Europe/London" in seen and sink.time_zone == "Europe/London":
                    break
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert seen == ["Europe/Berlin", "Europe/London"]
        assert sink.time_zone == "Europe/London"
