"""The hub and gateway as the processes people run, driven through the CLI: a site enrolls a
hub, the hub reads a virtual strap and relays over TLS, is killed with SIGKILL mid-stream
and restarted; afterwards every envelope it sealed is stored exactly once or still waits
in its outbox, the time it was down is a stored gap, and `hub status` says so."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from device_drivers.driver import HUB_STOPPED
from device_drivers.outbox import Outbox
from gateway import enrollment
from gateway.broker import MosquittoBroker, free_port
from gateway.commands.operator import PASSWORD_FILE_ENV
from gateway.pki import StudyCA
from storage import db, registry
from storage.users import Role
from tests.fixtures.gateway import gateway_env
from tests.fixtures.signers import add_operators, password_file


def cli_env(
    database_url: str, broker: MosquittoBroker, ca: StudyCA, data_dir: Path, http_port: int
) -> dict[str, str]:
    return gateway_env(
        database_url, broker, data_dir, http_port, MQTT_TLS="true", CA_DIR=str(ca.directory)
    )


def cli(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def spawn(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.fixture
def gateway_process(
    database_url: str, secure_mosquitto: MosquittoBroker, study_ca: StudyCA, tmp_path: Path
) -> Iterator[dict[str, str]]:
    env = cli_env(database_url, secure_mosquitto, study_ca, tmp_path / "gw", free_port())
    proc = spawn(env, "gateway", "--workers", "1")

    def healthy() -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{env['TRIALSTREAM_HTTP_PORT']}/healthz", timeout=1
            ) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    try:
        deadline = time.monotonic() + 30
        while not healthy():
            assert proc.poll() is None, "the gateway process exited"
            assert time.monotonic() < deadline, "the gateway did not become healthy"
            time.sleep(0.2)
        yield env
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def readings_of(url: str, device: str) -> int:
    async with db.connection(url) as conn:
        cur = await conn.execute("SELECT count(*) FROM readings WHERE device_id = %s", (device,))
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def gap_reasons_of(url: str, device: str) -> list[str]:
    async with db.connection(url) as conn:
        cur = await conn.execute("SELECT reason FROM gaps WHERE device_id = %s", (device,))
        return [str(r[0]) for r in await cur.fetchall()]


@pytest.mark.slow
async def test_enrolled_hub_survives_sigkill_with_nothing_lost_or_doubled(
    database_url: str, gateway_process: dict[str, str], tmp_path: Path
) -> None:
    # Site commands run as authenticated accounts; the password comes from a file.
    env = {**gateway_process, PASSWORD_FILE_ENV: str(password_file(tmp_path))}
    await add_operators(database_url, ("admin", Role.ADMIN, ()))
    cli(env, "site", "create-study", "--study", "S1", "--name", "Study one", "--as", "admin")
    cli(
        env,
        "site",
        "add-site",
        "--site",
        "SITE-A",
        "--study",
        "S1",
        "--name",
        "Site A",
        "--as",
        "admin",
    )
    await add_operators(database_url, ("coord", Role.SITE_COORDINATOR, ["SITE-A"]))
    cli(env, "site", "add-participant", "--participant", "P1", "--site", "SITE-A", "--as", "coord")
    async with db.connection(database_url) as conn:
        doc = await registry.create_consent_document(
            conn,
            "S1",
            "ICF",
            "1.0",
            "text",
            {"heart_rate"},
            effective_at=datetime.now(UTC) - timedelta(days=1),
        )
        await registry.record_consent(
            conn,
            "P1",
            doc,
            "consent",
            {"heart_rate"},
            effective_at=datetime.now(UTC),
            recorded_by="coord",
            signer_name="P1",
            meaning="consent",
        )
        await conn.commit()
    issued = json.loads(
        cli(env, "site", "enroll-code", "--participant", "P1", "--json", "--as", "coord")
    )
    # The whole code, as the hub reads it from the site's QR code: it pins the study CA.
    ca = StudyCA.load_or_create(Path(env["TRIALSTREAM_CA_DIR"]))
    assert f"ca={enrollment.ca_sha256(ca)}" in issued["uri"]
    hub_dir = tmp_path / "hub"
    out = cli(env, "hub", "enroll", issued["uri"], "--hub-dir", str(hub_dir))
    device = json.loads((hub_dir / "hub.json").read_text())["device_id"]
    assert device in out

    hub = spawn(env, "hub", "run", "--hub-dir", str(hub_dir), "--simulate", "hr")
    try:
        deadline = time.monotonic() + 60
        while await readings_of(database_url, device) < 5:
            assert hub.poll() is None, "the hub exited"
            assert time.monotonic() < deadline, "no readings from the hub"
            await asyncio.sleep(0.3)
        hub.send_signal(signal.SIGKILL)
        hub.wait()
        before = await readings_of(database_url, device)
        hub = spawn(env, "hub", "run", "--hub-dir", str(hub_dir), "--simulate", "hr")
        deadline = time.monotonic() + 60
        # The strap was connected when the hub was killed: the time it was not watched is
        # a stored hub_stopped gap (the gateway takes the reason as any other).
        while await readings_of(
            database_url, device
        ) < before + 5 or HUB_STOPPED not in await gap_reasons_of(database_url, device):
            assert hub.poll() is None, "the restarted hub exited"
            assert time.monotonic() < deadline, "no readings after the restart"
            await asyncio.sleep(0.3)
    finally:
        hub.send_signal(signal.SIGINT)
        try:
            hub.wait(timeout=20)
        except subprocess.TimeoutExpired:
            hub.kill()
            hub.wait()

    status = json.loads(cli(env, "hub", "status", "--hub-dir", str(hub_dir), "--json"))
    assert status["device_id"] == device
    assert status["running"]["wearables"][0]["info"]["model"] == "TS-HRM-1"
    with Outbox.open(hub_dir / "outbox.sqlite", device) as outbox:
        waiting = {env_.seq for env_ in outbox.due(2**62, 0, 10_000)}
        next_seq = outbox.stats().next_seq
    async with db.connection(database_url) as conn:
        cur = await conn.execute(
            "SELECT seq, reading_count, stored_count FROM envelopes WHERE device_id = %s", (device,)
        )
        stored = {int(s): (int(n), int(k)) for s, n, k in await cur.fetchall()}
        cur = await conn.execute("SELECT count(*) FROM readings WHERE device_id = %s", (device,))
        (total,) = await cur.fetchone() or (0,)
    # Every envelope the hub sealed is stored (once: the primary key) or still waits in its
    # outbox for a receipt (it may be both, when the receipt was still on its way): no hole.
    assert len(stored) >= 2
    assert set(stored) | waiting == set(range(1, next_seq))
    assert total == sum(k for _, k in stored.values())
    assert all(n == k for n, k in stored.values())  # consented, plausible: all stored
