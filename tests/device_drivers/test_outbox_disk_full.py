"""A real full disk under the outbox (a small tmpfs mounted by the test): SQLite's ENOSPC
becomes OutboxFull, every reading the outbox acknowledged survives, the sink and the relay
go on without crashing, and once space is back the refused span is recorded as a gap."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from device_drivers.clock import HubClock
from device_drivers.hub import OUTBOX_FULL, OutboxSink
from device_drivers.outbox import Outbox, OutboxError, OutboxFull
from device_drivers.relay import SEAL_RETRY_S, Relay, RelayConfig
from ingest.envelope import open_envelope
from ingest.model import Gap, Reading

DEV = "hub-0001"
T0 = 1_700_000_000_000
# Small enough to fill in a fraction of a second; a tmpfs rounds it to whole pages.
DISK_BYTES = 512 * 1024
FILLER_BYTES = 256 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs with a 256 KiB file to delete when the test wants space back."""
    mount = shutil.which("mount")
    umount = shutil.which("umount")
    if os.geteuid() != 0 or mount is None or umount is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8): full-disk test skipped")
    point = tmp_path / "disk"
    point.mkdir()
    result = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={DISK_BYTES},mode=0700", "tmpfs", str(point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {result.stderr.strip()}")
    try:
        (point / "filler").write_bytes(b"\0" * FILLER_BYTES)
        yield point
    finally:
        subprocess.run([umount, str(point)], check=True)


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def batch(start: int, n: int = 100) -> list[Reading]:
    return [
        Reading(T0 + (start + i) * 1000, "heart_rate", 60.0 + (start + i) % 40, "/min", "hr")
        for i in range(n)
    ]


def fill(outbox: Outbox) -> tuple[int, OutboxFull]:
    """Add readings (100 at a time, then one at a time) until the disk refuses even one;
    returns how many were acknowledged, and the last refusal."""
    acknowledged = 0
    refusal: OutboxFull | None = None
    for size in (100, 1):
        while True:
            try:
                outbox.add_readings(batch(acknowledged, size))
            except OutboxFull as exc:
                refusal = exc
                break
            acknowledged += size
    assert refusal is not None
    return acknowledged, refusal


def sealed(outbox: Outbox) -> list[Reading]:
    return [
        r
        for envelope in outbox.due(2**62, 0, 100_000)
        for r in open_envelope(envelope.data).payload.readings
    ]


def test_full_disk_is_outbox_full_and_keeps_every_acknowledged_reading(
    small_disk: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    path = small_disk / "outbox.sqlite"
    with Outbox.open(path, DEV) as outbox:
        acknowledged, full = fill(outbox)
        assert acknowledged > 0
        assert isinstance(full, OutboxError)
        assert full.max_bytes > DISK_BYTES  # the disk, not the bound, refused
        with pytest.raises(OutboxFull):
            outbox.add_readings(batch(acknowledged, 1))
        with pytest.raises(OutboxFull):
            outbox.add_gap(Gap(T0, T0 + 1, OUTBOX_FULL))
        assert outbox.stats().pending_readings == acknowledged
    with Outbox.open(path, DEV) as outbox:  # reopened on the still-full disk
        assert outbox.stats().pending_readings == acknowledged
        (small_disk / "filler").unlink()
        outbox.add_gap(Gap(T0, T0 + 1, OUTBOX_FULL))
        outbox.seal_pending(key, T0)
        assert sealed(outbox) == batch(0, acknowledged)


async def test_sink_keeps_the_gap_in_memory_until_the_disk_takes_it(small_disk: Path) -> None:
    with Outbox.open(small_disk / "outbox.sqlite", DEV) as outbox:
        sink = OutboxSink(outbox, HubClock(lambda: T0 / 1000))
        acknowledged, _ = fill(outbox)
        refused = batch(acknowledged, 10)
        await sink.readings(refused)  # neither the readings nor their gap fit: no exception
        await sink.readings(batch(acknowledged + 10, 5))
        assert sink.refused_full == 15
        assert outbox.stats().pending_gaps == 0
        (small_disk / "filler").unlink()
        await sink.readings(batch(acknowledged + 15, 1))
        stats = outbox.stats()
    assert stats.pending_readings == acknowledged + 1
    assert stats.pending_gaps == 1


async def test_sink_gap_covers_the_refused_span(
    small_disk: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    with Outbox.open(small_disk / "outbox.sqlite", DEV) as outbox:
        sink = OutboxSink(outbox, HubClock(lambda: T0 / 1000))
        acknowledged, _ = fill(outbox)
        await sink.readings(batch(acknowledged, 10))
        await sink.readings(batch(acknowledged + 10, 5))
        (small_disk / "filler").unlink()
        await sink.gap(Gap(T0, T0, "malformed_0x2A37"))
        outbox.seal_pending(key, T0)
        gaps = [
            g
            for envelope in outbox.due(2**62, 0, 100_000)
            for g in open_envelope(envelope.data).payload.gaps
        ]
    first, last = T0 + acknowledged * 1000, T0 + (acknowledged + 14) * 1000
    assert gaps == [Gap(first, last, OUTBOX_FULL), Gap(T0, T0, "malformed_0x2A37")]


class Ticks:
    """A monotonic clock the test advances."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_relay_survives_a_failed_seal_and_seals_once_space_is_back(
    small_disk: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    ticks = Ticks()
    with Outbox.open(small_disk / "outbox.sqlite", DEV) as outbox:
        relay = Relay(
            RelayConfig(DEV, "127.0.0.1", 1, seal_max_age_s=0.0),
            outbox,
            key,
            key.public_key(),
            clock=lambda: T0 / 1000,
            monotonic=ticks,
        )
        acknowledged, _ = fill(outbox)
        await relay.tick()
        assert relay.stats.outbox_errors == 1
        assert outbox.stats().pending_readings == acknowledged
        (small_disk / "filler").unlink()
        ticks.now += SEAL_RETRY_S / 2
        await relay.tick()  # not yet: failed seals are retried after SEAL_RETRY_S
        assert outbox.stats().unreceipted_envelopes == 0
        ticks.now += SEAL_RETRY_S
        await relay.tick()
        stats = outbox.stats()
        assert relay.stats.outbox_errors == 1
        assert stats.pending_readings == 0
        assert sealed(outbox) == batch(0, acknowledged)
