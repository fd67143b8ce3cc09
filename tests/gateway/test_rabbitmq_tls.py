"""Hubs on RabbitMQ logging in by their client certificate alone (gateway.rabbitmq.RabbitNode
with ``tls``): the study CA's certificate for a device id is its login, with no password
kept anywhere; a certificate from another CA, or none, is refused at the handshake; and a
hub whose broker identity is withdrawn (``remove_hub``, as revocation does) has its open
connection closed and cannot log in again."""

from __future__ import annotations

import secrets
import ssl
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from gateway.pki import StudyCA
from gateway.rabbitmq import RabbitNode
from ingest import keys
from ingest.pipeline import up_topic
from ingest.transport import TlsFiles
from tests.fixtures.pki import hub_files

pytestmark = pytest.mark.slow


class CertHub:
    """A hub's MQTT 3.1.1 connection over TLS with its certificate, and no user name."""

    def __init__(
        self, node: RabbitNode, device_id: str, files: TlsFiles, *, present: bool = True
    ) -> None:
        self.results: list[str] = []
        self.lost = threading.Event()
        self.answered = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311
        )
        self.client.tls_set(
            ca_certs=str(files.cafile),
            certfile=str(files.certfile) if present else None,
            keyfile=str(files.keyfile) if present else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )
        if not present:  # a password instead, which the node does not take
            self.client.username_pw_set(device_id, "guessed")
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_: self.lost.set()
        assert node.mqtts_port is not None
        self.port = node.mqtts_port

    def _on_connect(
        self, _c: object, _u: object, _f: object, reason: ReasonCode, _p: object
    ) -> None:
        self.results.append(str(reason))
        self.answered.set()

    def connect(self) -> bool:
        """Whether the broker accepted the connection (False: refused or cut)."""
        try:
            self.client.connect("127.0.0.1", self.port)
        except (OSError, ssl.SSLError):
            return False
        self.client.loop_start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (self.answered.is_set() or self.lost.is_set()):
            time.sleep(0.05)
        return self.client.is_connected()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _hub(study_ca: StudyCA, tmp_path: Path, device_id: str) -> TlsFiles:
    return hub_files(study_ca, tmp_path / device_id, device_id, keys.generate_private_key())


def test_a_hub_logs_in_by_its_certificate_and_publishes_only_as_itself(
    secure_rabbit: RabbitNode, study_ca: StudyCA, tmp_path: Path
) -> None:
    device = f"hub-{secrets.token_hex(3)}"
    secure_rabbit.add_hub(device)  # no password: the certificate is the login
    hub = CertHub(secure_rabbit, device, _hub(study_ca, tmp_path, device))
    try:
        assert hub.connect(), hub.results
        info = hub.client.publish(up_topic(device), b"x", qos=1)
        info.wait_for_publish(10)
        assert info.is_published()
    finally:
        hub.close()
    # A password login for that user is impossible: it has none.
    done = secure_rabbit.ctl("authenticate_user", device, "anything", check=False)
    assert done.returncode != 0


def test_a_certificate_of_another_ca_or_none_is_refused(
    secure_rabbit: RabbitNode, study_ca: StudyCA, tmp_path: Path
) -> None:
    device = f"hub-{secrets.token_hex(3)}"
    secure_rabbit.add_hub(device)
    other_ca = StudyCA.load_or_create(tmp_path / "other-ca")
    stranger = hub_files(other_ca, tmp_path / "stranger", device, keys.generate_private_key())
    # The hub verifies the broker with the study CA but presents the other CA's certificate.
    files = TlsFiles(study_ca.cert_path, stranger.certfile, stranger.keyfile)
    for hub in (
        CertHub(secure_rabbit, device, files),
        CertHub(secure_rabbit, device, files, present=False),
    ):
        try:
            assert not hub.connect(), hub.results
        finally:
            hub.close()


def test_a_withdrawn_hub_is_cut_off_and_cannot_log_in_again(
    secure_rabbit: RabbitNode, study_ca: StudyCA, tmp_path: Path
) -> None:
    device = f"hub-{secrets.token_hex(3)}"
    secure_rabbit.add_hub(device)
    files = _hub(study_ca, tmp_path, device)
    hub = CertHub(secure_rabbit, device, files)
    try:
        assert hub.connect(), hub.results
        secure_rabbit.remove_hub(device)
        assert hub.lost.wait(10), "the hub's open connection was not closed"
    finally:
        hub.close()
    again = CertHub(secure_rabbit, device, files)
    try:
        assert not again.connect()
    finally:
        again.close()
    assert secure_rabbit.ctl("list_users", "--quiet").stdout.count(device) == 0
