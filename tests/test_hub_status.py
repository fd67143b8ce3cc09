"""How long the hub has been away from its broker: the running hub writes since when (and
keeps counting across a restart), and `trialstream-hub status` says OFFLINE past a
threshold, in text and in JSON."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from device_drivers import cli as hub_cli
from device_drivers.hub import Hub, OutboxSink
from device_drivers.outbox import Outbox
from device_drivers.relay import Relay, RelayConfig
from tests.fixtures.waiting import wait_until

DEV = "hub-status-1"
HOUR_MS = 3_600_000
T = 1_700_000_000_000


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
def hub_dir(tmp_path: Path) -> Path:
    """An enrolled hub's directory, as far as `status` reads it (no TLS: no certificate)."""
    identity = {
        "device_id": DEV,
        "participant_id": "P-1",
        "study_id": "S-1",
        "broker": {"host": "127.0.0.1", "port": 1883, "tls": False},
        "gateway_url": "http://127.0.0.1:8080",
    }
    (tmp_path / "hub.json").write_text(json.dumps(identity))
    Outbox.open(tmp_path / "outbox.sqlite", DEV).close()
    return tmp_path


@pytest.fixture
def hub(hub_dir: Path) -> Iterator[Hub]:
    """A hub whose relay never runs: it stays away from its broker until a test says."""
    key = ec.generate_private_key(ec.SECP256R1())
    with Outbox.open(hub_dir / "outbox.sqlite", DEV) as outbox:
        relay = Relay(RelayConfig(DEV, "127.0.0.1", 1), outbox, key, key.public_key())
        yield Hub(relay, [], status_path=hub_dir / "status.json")


@contextlib.asynccontextmanager
async def writing_status(hub: Hub) -> AsyncIterator[dict[str, Any]]:
    """The hub writing its status file; yields the first status it writes."""
    path = hub.status_path
    assert path is not None
    started = now_ms()

    def written() -> bool:
        with contextlib.suppress(OSError, ValueError, LookupError, TypeError):  # the old one
            return bool(json.loads(path.read_text())["written_at_ms"] >= started)
        return False

    task = asyncio.create_task(hub._write_status(path), name="test-hub-status")
    try:
        await wait_until(written, "the status written")
        yield json.loads(path.read_text())
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def status(hub_dir: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    assert hub_cli.main(["status", "--hub-dir", str(hub_dir), *flags]) == 0
    return capsys.readouterr().out


def test_the_hub_counts_from_when_it_lost_the_broker(hub: Hub) -> None:
    first = hub.status()["broker_offline_since_ms"]
    assert isinstance(first, int)
    assert hub.status()["broker_offline_since_ms"] == first  # still the same outage
    hub.relay.stats.connected = True
    assert hub.status()["broker_offline_since_ms"] is None
    hub.relay.stats.connected = False
    assert hub.status()["broker_offline_since_ms"] >= first


@pytest.mark.parametrize(
    ("previous", "since"),
    [
        ({"broker_connected": False, "broker_offline_since_ms": T}, T),
        ({"broker_connected": True, "written_at_ms": T}, T),
        ({"broker_connected": False, "broker_offline_since_ms": 2**62}, None),
        ({"broker_connected": False, "broker_offline_since_ms": "yesterday"}, None),
        ([1, 2], None),
    ],
    ids=["was-offline", "was-connected", "in-the-future", "not-a-time", "not-an-object"],
)
async def test_a_restarted_hub_keeps_counting_from_the_previous_run(
    hub: Hub, hub_dir: Path, previous: object, since: int | None
) -> None:
    (hub_dir / "status.json").write_text(json.dumps(previous))
    started = now_ms()
    async with writing_status(hub) as written:
        if since is None:  # nothing plausible before: offline since this run began
            assert written["broker_offline_since_ms"] >= started
        else:
            assert written["broker_offline_since_ms"] == since


async def test_status_says_offline_for_how_long_since_when(
    hub: Hub, hub_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    since = now_ms() - (3 * HOUR_MS + 12 * 60_000 + 30_000)
    (hub_dir / "status.json").write_text(
        json.dumps({"broker_connected": False, "broker_offline_since_ms": since})
    )
    async with writing_status(hub):
        text = status(hub_dir, capsys)
        report = json.loads(status(hub_dir, capsys, "--json"))
    at = datetime.fromtimestamp(since / 1000, UTC)
    assert f"  OFFLINE for 3 h 12 min (since {at:%Y-%m-%d %H:%M} UTC)" in text
    assert "  broker: NOT connected" in text
    assert report["running"]["broker_offline_since_ms"] == since
    assert report["offline"]["since_ms"] == since
    assert report["offline"]["too_long"] is True
    assert 3 * 3600 + 12 * 60 + 30 <= report["offline"]["for_s"] < 3 * 3600 + 13 * 60


async def test_status_keeps_quiet_about_a_short_outage_and_a_connected_hub(
    hub: Hub, hub_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with writing_status(hub):  # offline for seconds: no alarm, but JSON says so
        text = status(hub_dir, capsys)
        report = json.loads(status(hub_dir, capsys, "--json"))
    assert "OFFLINE" not in text
    assert report["offline"]["too_long"] is False
    assert report["offline"]["for_s"] < hub_cli.OFFLINE_ALERT_S

    hub.relay.stats.connected = True
    (hub_dir / "status.json").write_text(json.dumps(hub.status()))
    assert "OFFLINE" not in status(hub_dir, capsys)
    assert json.loads(status(hub_dir, capsys, "--json"))["offline"] is None


def test_status_of_a_hub_from_before_the_field_says_nothing_of_it(
    hub: Hub, hub_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    older = hub.status()
    del older["broker_offline_since_ms"]
    (hub_dir / "status.json").write_text(json.dumps(older))
    assert "OFFLINE" not in status(hub_dir, capsys)
    assert json.loads(status(hub_dir, capsys, "--json"))["offline"] is None


async def test_status_says_the_hub_time_zone_or_how_to_set_it(
    hub_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with Outbox.open(hub_dir / "outbox.sqlite", DEV) as outbox:
        relay = Relay(RelayConfig(DEV, "127.0.0.1", 1), outbox, key, key.public_key())
        sink = OutboxSink(outbox)
        hub = Hub(relay, [], sink, status_path=hub_dir / "status.json")
        (hub_dir / "status.json").write_text(json.dumps(hub.status()))
        assert "  time zone: not known (set TRIALSTREAM_HUB_TIME_ZONE" in status(hub_dir, capsys)
        await sink.note_time_zone("Europe/Berlin")
        (hub_dir / "status.json").write_text(json.dumps(hub.status()))
    assert "  time zone: Europe/Berlin\n" in status(hub_dir, capsys)
    assert json.loads(status(hub_dir, capsys, "--json"))["running"]["time_zone"] == "Europe/Berlin"
