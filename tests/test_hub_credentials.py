"""A hub's credentials over time, against the real Mosquitto (TLS, ``crlfile``) and gateway:
the renewed certificate is the one the relay presents from its next handshake on, and a
revoked hub is told so by the gateway, stops relaying and will not start again."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from device_drivers import credentials
from device_drivers.hub import Hub
from device_drivers.identity import HubIdentity
from device_drivers.outbox import Outbox
from device_drivers.relay import Relay, RelayConfig
from gateway import revocation
from gateway.broker import MosquittoBroker, handshake_refused
from gateway.pki import StudyCA
from ingest.transport import ClientTls, TlsFiles
from storage import db
from tests.fixtures.gateway import RunningGateway, running_gateway, tls_gateway_settings
from tests.fixtures.hubs import enrolled_hub
from tests.fixtures.trial import Trial
from tests.fixtures.waiting import wait_until

# paho drops its reference to a TLS socket the broker refuses without closing it (as in
# test_revocation.py).
pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


@pytest.fixture
async def crl_gateway(
    database_url: str, crl_broker: MosquittoBroker, revocation_ca: StudyCA, tmp_path: Path
) -> AsyncIterator[RunningGateway]:
    """The gateway on a TLS broker whose CRL this test may change, told how to reload it."""
    settings = tls_gateway_settings(database_url, crl_broker, revocation_ca, tmp_path / "gateway")
    async with running_gateway(settings) as gw:
        yield gw


def relay_of(identity: HubIdentity, tls: ClientTls, outbox: Outbox) -> Relay:
    return Relay(
        RelayConfig(identity.device_id, identity.broker_host, identity.broker_port),
        outbox,
        identity.key(),
        identity.receipt_key(),
        configure_client=tls,
    )


@pytest.mark.slow
async def test_the_relay_presents_the_renewed_certificate_from_its_next_handshake(
    trial: Trial,
    crl_gateway: RunningGateway,
    crl_broker: MosquittoBroker,
    revocation_ca: StudyCA,
    tmp_path: Path,
) -> None:
    identity = await enrolled_hub(trial, crl_gateway, tmp_path / "hub")
    assert identity.tls is not None
    tls = ClientTls(identity.tls)
    outbox = Outbox.open(tmp_path / "outbox.sqlite", identity.device_id)
    relay = relay_of(identity, tls, outbox)
    task = asyncio.create_task(relay.run())
    try:
        await wait_until(lambda: relay.stats.connected, "the hub connected", within=15)
        old = tmp_path / "old.pem"
        shutil.copy(identity.directory / "hub.pem", old)
        old_serial = credentials.certificate_window(identity).serial

        # Not due yet: nothing is asked for.
        keeper = credentials.CertificateKeeper(identity, on_renewed=tls.reload)
        await keeper.check()
        assert keeper.renewals == 0
        # Fifty days on (past half of its 90): renewed, and the relay told.
        keeper = credentials.CertificateKeeper(
            identity, on_renewed=tls.reload, clock=lambda: time.time() + 50 * 86_400
        )
        await keeper.check()
        assert keeper.renewals == 1
        assert credentials.certificate_window(identity).serial != old_serial

        # The broker now refuses the old certificate; the relay's next connection succeeds.
        revocation_ca.publish_crl([int(old_serial, 16)])
        crl_broker.reload()
        old_files = TlsFiles(revocation_ca.cert_path, old, identity.key_path)
        await wait_until(
            lambda: handshake_refused(crl_broker.host, crl_broker.port, old_files),
            "the broker refuses the old certificate",
        )
        await relay.set_online(False)
        await relay.set_online(True)
        await wait_until(lambda: relay.stats.connected, "the hub reconnected", within=15)
        assert relay.stats.connect_failures == 0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        outbox.close()


async def hub_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gateway.cli", "hub", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
async def test_a_revoked_hub_is_told_stops_and_will_not_start_again(
    trial: Trial,
    crl_gateway: RunningGateway,
    tmp_path: Path,
) -> None:
    identity = await enrolled_hub(trial, crl_gateway, tmp_path / "hub")
    assert identity.tls is not None
    tls = ClientTls(identity.tls)
    outbox = Outbox.open(identity.directory / "outbox.sqlite", identity.device_id)
    relay = relay_of(identity, tls, outbox)
    keeper = credentials.CertificateKeeper(
        identity,
        connect_failures=lambda: relay.stats.connect_failures,
        on_renewed=tls.reload,
        standing_after_failures=1,
        poll_s=0.2,
    )
    hub = Hub(relay, [], keeper=keeper)
    task = asyncio.create_task(hub.run())
    try:
        await wait_until(lambda: relay.stats.connected, "the hub connected", within=15)
        outcome = await revocation.revoke_hub(
            crl_gateway.settings, identity.device_id, actor="coordinator-1", reason="hub lost"
        )
        assert outcome.problems == []
        started = time.monotonic()
        # The broker refuses the hub's next handshake; the hub asks, is told, and stops.
        with pytest.raises(ExceptionGroup) as info:
            async with asyncio.timeout(60):
                await task
        assert info.group_contains(credentials.HubWithdrawn)
        told_after = time.monotonic() - started
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        outbox.close()
    assert told_after < 45
    assert relay.stats.connect_failures >= 1
    failures = relay.stats.connect_failures
    await asyncio.sleep(3)
    assert relay.stats.connect_failures == failures, "the stopped hub still tries to connect"

    record = json.loads((identity.directory / credentials.STANDING_FILE).read_text())
    assert record["status"] == "revoked"
    with pytest.raises(credentials.HubWithdrawn):
        credentials.check_not_withdrawn(identity.directory)

    # `hub run` refuses, with the reason and the exit status a service manager keeps down.
    result = await hub_cli("run", "--hub-dir", str(identity.directory), "--simulate", "hr")
    assert result.returncode == credentials.EXIT_WITHDRAWN, result.stderr
    assert "revoked by its site" in result.stderr
    status = await hub_cli("status", "--hub-dir", str(identity.directory), "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["standing"]["status"] == "revoked"

    async with db.connection(trial.url) as conn:
        cur = await conn.execute(
            "SELECT action FROM audit_log WHERE entity = 'device' AND entity_id = %s"
            " ORDER BY audit_id",
            (identity.device_id,),
        )
        actions = [r[0] for r in await cur.fetchall()]
    assert actions == ["device.revoke", "device.told_standing"]
