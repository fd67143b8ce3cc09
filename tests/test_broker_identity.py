"""The broker's identity rules with TLS on (deploy/mosquitto/ config): a hub speaks only as
itself, a client without a certificate from the study CA cannot connect, and the relay's
envelopes travel end to end over TLS."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ssl
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from device_drivers.outbox import Outbox
from device_drivers.relay import Relay, RelayConfig
from gateway.broker import MosquittoBroker
from gateway.pki import StudyCA
from ingest.model import Reading
from ingest.transport import TlsFiles, configure_tls
from storage import db
from tests.fixtures.gateway import RunningGateway
from tests.fixtures.pki import hub_files
from tests.fixtures.trial import Trial
from tests.fixtures.waiting import wait_until


class TlsClient:
    """A bare MQTT 5 client that records CONNACK, PUBACK and SUBACK reason codes."""

    def __init__(
        self,
        broker: MosquittoBroker,
        client_id: str,
        tls: TlsFiles | None,
        *,
        ca_only: Path | None = None,
    ) -> None:
        self.connack: ReasonCode | None = None
        self.pubacks: dict[int, ReasonCode] = {}
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.connect_error: str | None = None
        self.done = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        if tls is not None:
            configure = configure_tls(tls)
            assert configure is not None
            configure(self.client)
        elif ca_only is not None:
            self.client.tls_set(ca_certs=str(ca_only), cert_reqs=ssl.CERT_REQUIRED)
        self.client.on_connect = self._on_connect
        self.client.on_publish = lambda _c, _u, mid, rc, _p: self.pubacks.__setitem__(mid, rc)
        self.client.on_subscribe = lambda _c, _u, mid, rcs, _p: self.subacks.__setitem__(mid, rcs)
        try:
            self.client.connect(broker.host, broker.port)
        except (OSError, ssl.SSLError) as exc:
            self.connect_error = str(exc)  # not the exception: its frames hold the socket
            return
        self.client.loop_start()

    def _on_connect(
        self, _c: mqtt.Client, _u: object, _f: object, rc: ReasonCode, _p: object
    ) -> None:
        self.connack = rc

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:  # a refused TLS handshake leaves paho's socket open
            sock.close()


@pytest.fixture
def hub1_tls(trial: Trial, study_ca: StudyCA, tmp_path: Path) -> TlsFiles:
    return hub_files(study_ca, tmp_path / "hub-1", "hub-1", trial.hubs["hub-1"].key)


async def test_a_hub_may_publish_only_to_its_own_topic(
    secure_mosquitto: MosquittoBroker, hub1_tls: TlsFiles
) -> None:
    c = TlsClient(secure_mosquitto, "hub-1", hub1_tls)
    try:
        await wait_until(lambda: c.connack is not None, "CONNACK")
        assert c.connack is not None
        assert not c.connack.is_failure
        own = c.client.publish("dct/v1/hub-1/up", b"x", qos=1).mid
        await wait_until(lambda: own in c.pubacks, "PUBACK for its own topic")
        other = c.client.publish("dct/v1/hub-2/up", b"x", qos=1).mid
        await wait_until(lambda: other in c.pubacks, "PUBACK for another device's topic")
        assert not c.pubacks[own].is_failure
        assert c.pubacks[other].getName() == "Not authorized"
    finally:
        c.close()


async def test_a_hub_receives_only_its_own_receipts(
    secure_mosquitto: MosquittoBroker, hub1_tls: TlsFiles, study_ca: StudyCA, tmp_path: Path
) -> None:
    received: list[str] = []
    hub = TlsClient(secure_mosquitto, "hub-1", hub1_tls)
    hub.client.on_message = lambda _c, _u, m: received.append(m.topic)
    gw = TlsClient(
        secure_mosquitto, "gateway-test", study_ca.issue_files(tmp_path / "gw", "gateway")
    )
    try:
        await wait_until(lambda: hub.connack is not None and gw.connack is not None, "CONNACKs")
        _, mid = hub.client.subscribe("dct/v1/+/down", qos=1)
        await wait_until(lambda: mid in hub.subacks, "SUBACK")
        for dev in ("hub-2", "hub-1"):
            pub = gw.client.publish(f"dct/v1/{dev}/down", b"receipt", qos=1).mid
            await wait_until(lambda p=pub: p in gw.pubacks, "gateway PUBACK")
            assert not gw.pubacks[pub].is_failure
        await wait_until(lambda: len(received) >= 1, "the hub's own receipt")
        assert received == ["dct/v1/hub-1/down"]
    finally:
        hub.close()
        gw.close()


# paho drops its reference to a TLS socket the broker closes after the handshake without
# closing it; the garbage collector closes it with a ResourceWarning. Collected here, so the
# warning belongs to this test and nowhere else.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_no_certificate_no_connection(
    secure_mosquitto: MosquittoBroker, study_ca: StudyCA, tmp_path: Path
) -> None:
    plain = TlsClient(secure_mosquitto, "anonymous", None)
    without_cert = TlsClient(secure_mosquitto, "no-cert", None, ca_only=study_ca.cert_path)
    other_ca = StudyCA.load_or_create(tmp_path / "rogue-ca")
    rogue = TlsClient(
        secure_mosquitto, "hub-1", other_ca.issue_files(tmp_path / "rogue", "hub-1"), ca_only=None
    )
    try:
        await asyncio.sleep(0)  # give the network threads a chance; each waits below
        for client in (plain, without_cert, rogue):
            await wait_until(
                lambda cl=client: (
                    cl.connect_error is not None
                    or (cl.connack is not None and cl.connack.is_failure)
                    or not cl.client.is_connected()
                ),
                "refusal",
            )
            assert not client.client.is_connected()
            assert client.connack is None or client.connack.is_failure
    finally:
        for client in (plain, without_cert, rogue):
            client.close()
        del plain, without_cert, rogue, client
        gc.collect()


async def test_relay_over_tls_reaches_the_secure_gateway(
    trial: Trial,
    secure_gateway: RunningGateway,
    secure_mosquitto: MosquittoBroker,
    hub1_tls: TlsFiles,
    tmp_path: Path,
) -> None:
    hub = trial.hubs["hub-1"]
    outbox = Outbox.open(tmp_path / "outbox.sqlite", hub.device_id)
    relay = Relay(
        RelayConfig(
            hub.device_id,
            secure_mosquitto.host,
            secure_mosquitto.port,
            seal_max_age_s=0.1,
            tick_s=0.05,
        ),
        outbox,
        hub.key,
        secure_gateway.receipt_public_key,
        configure_client=configure_tls(hub1_tls),
    )
    task = asyncio.create_task(relay.run())
    try:
        t0 = int(time.time() * 1000) - 60_000
        outbox.add_readings([Reading(t0 + i, "heart_rate", 70.0, "/min", "hr") for i in range(10)])
        await wait_until(
            lambda: (
                relay.stats.receipts_accepted >= 1
                and outbox.stats().unreceipted_envelopes == 0
                and outbox.stats().pending_readings == 0
            ),
            "receipt over TLS",
        )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        outbox.close()
    async with db.connection(trial.url) as conn:
        cur = await conn.execute("SELECT count(*) FROM readings WHERE device_id = 'hub-1'")
        assert await cur.fetchone() == (10,)
