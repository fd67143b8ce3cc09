"""Hubs' broker identities on RabbitMQ kept by the gateway through the management API
(gateway.rabbit_admin), on a real node with certificate logins: enrollment creates the hub's
user and its certificate then logs in; `site revoke` removes it, cutting the open connection;
`broker sync-hubs` makes the broker's hub users match the database; a bad admin URL or
device id is refused before anything is sent."""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path

import pytest

from device_drivers.identity import enroll
from gateway import revocation
from gateway.broker import MosquittoBroker
from gateway.errors import BrokerError, ConfigError
from gateway.pki import StudyCA
from gateway.rabbit_admin import RabbitAdmin
from gateway.rabbitmq import RabbitNode
from gateway.settings import Settings
from ingest import keys
from tests.fixtures.gateway import gateway_env, gateway_settings, running_gateway
from tests.fixtures.pki import hub_files
from tests.fixtures.trial import Trial
from tests.gateway.test_enrollment import new_code, ticket
from tests.gateway.test_rabbitmq_tls import CertHub
from tests.test_cli import trialstream

pytestmark = pytest.mark.slow


def admin(node: RabbitNode) -> RabbitAdmin:
    assert node.management_url is not None
    return RabbitAdmin(node.management_url)


async def test_an_identity_made_by_the_gateway_logs_in_by_certificate_and_is_cut_off(
    secure_rabbit: RabbitNode, study_ca: StudyCA, tmp_path: Path
) -> None:
    device = f"hub-{secrets.token_hex(3)}"
    files = hub_files(study_ca, tmp_path / device, device, keys.generate_private_key())
    refused = CertHub(secure_rabbit, device, files)
    try:
        assert not refused.connect()  # no identity yet
    finally:
        refused.close()
    await admin(secure_rabbit).add_hub(device)
    assert device in await admin(secure_rabbit).hubs()
    hub = CertHub(secure_rabbit, device, files)
    try:
        assert hub.connect(), hub.results
        assert await admin(secure_rabbit).remove_hub(device) in (0, 1)
        assert hub.lost.wait(10), "the hub's connection stayed open"
    finally:
        hub.close()
    assert device not in await admin(secure_rabbit).hubs()
    assert await admin(secure_rabbit).remove_hub(device) == 0  # gone already: fine
    again = CertHub(secure_rabbit, device, files)
    try:
        assert not again.connect()
    finally:
        again.close()


async def test_enrollment_creates_the_identity_and_revocation_removes_it(
    trial: Trial,
    database_url: str,
    mosquitto: MosquittoBroker,
    secure_rabbit: RabbitNode,
    tmp_path: Path,
) -> None:
    settings = dataclasses.replace(
        gateway_settings(database_url, mosquitto, tmp_path / "gateway"),
        rabbitmq_admin_url=secure_rabbit.management_url,
    )
    async with running_gateway(settings) as gw:
        identity = await enroll(tmp_path / "hub", ticket(gw, await new_code(trial)))
    # (Its certificate logging in, and being cut off, is the test above: this gateway has a
    # CA of its own, which the session's node does not trust.)
    assert identity.device_id in await admin(secure_rabbit).hubs()
    outcome = await revocation.revoke_hub(
        settings, identity.device_id, actor="coordinator-1", reason="lost hub"
    )
    assert (outcome.identity_removed, outcome.problems) == (True, [])
    assert identity.device_id not in await admin(secure_rabbit).hubs()


async def test_sync_creates_the_missing_and_removes_the_revoked_or_unknown(
    trial: Trial,
    database_url: str,
    mosquitto: MosquittoBroker,
    secure_rabbit: RabbitNode,
    tmp_path: Path,
) -> None:
    ghost = f"ghost-{secrets.token_hex(3)}"
    await admin(secure_rabbit).add_hub(ghost)
    # The trial's hub-1 is an active device with no broker identity yet.
    assert secure_rabbit.management_url is not None
    env = gateway_env(
        database_url,
        mosquitto,
        tmp_path / "cli",
        0,
        RABBITMQ_ADMIN_URL=secure_rabbit.management_url,
    )
    done = trialstream("broker", "sync-hubs", env=env)
    assert done.returncode == 0, done.stderr
    assert "hub identities created: 1: hub-1" in done.stdout
    assert f"hub identities removed: 1: {ghost}" in done.stdout
    hubs = await admin(secure_rabbit).hubs()
    assert "hub-1" in hubs
    assert ghost not in hubs
    # Users the gateway did not make are left alone.
    assert "guest" in secure_rabbit.ctl("list_users", "--quiet").stdout
    again = trialstream("broker", "sync-hubs", env=env)
    assert "created: 0" in again.stdout
    assert "removed: 0" in again.stdout
    await admin(secure_rabbit).sync(set())  # leave the session's node without these


@pytest.mark.parametrize(
    "url",
    [
        "ftp://admin:pw@rabbit:15672/",
        "http://rabbit:15672/",
        "http://admin@rabbit:15672/",
        "http://admin:pw@:15672/",
        "http://admin:pw@rabbit:15672/?x=1",
        "not a url",
    ],
)
def test_a_bad_admin_url_is_refused_without_showing_it(url: str) -> None:
    with pytest.raises(ConfigError, match="TRIALSTREAM_RABBITMQ_ADMIN_URL") as err:
        Settings.from_env({"TRIALSTREAM_RABBITMQ_ADMIN_URL": url})
    assert "pw" not in str(err.value)


async def test_a_bad_device_id_is_refused_before_any_call() -> None:
    nowhere = RabbitAdmin("http://admin:pw@127.0.0.1:9/")
    for bad in ("", "a/b", "a#", "x" * 65, "hub 1", "hub\n1"):
        with pytest.raises(BrokerError, match="not a device id"):
            await nowhere.add_hub(bad)
        with pytest.raises(BrokerError, match="not a device id"):
            await nowhere.remove_hub(bad)
    with pytest.raises(BrokerError, match="cannot reach"):
        await nowhere.add_hub("hub-1")
