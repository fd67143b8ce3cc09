"""Revoking a hub reaches the broker: the study CA's CRL lists the hub's certificate, the real
Mosquitto (TLS, ``crlfile``) reloads it on `site revoke`, refuses the hub's next TLS
handshake within seconds and loses its open connection, while other hubs stay connected."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import os
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from device_drivers.identity import make_csr
from gateway import enrollment, revocation
from gateway.broker import MosquittoBroker, handshake_refused
from gateway.commands.operator import PASSWORD_FILE_ENV
from gateway.pki import CRL_VALIDITY, StudyCA, certificate_serial
from ingest import keys
from ingest.transport import TlsFiles, configure_tls
from storage import db, registry
from storage.users import Role
from tests.fixtures.signers import add_operators, password_file
from tests.fixtures.trial import Trial
from tests.fixtures.waiting import wait_until

# paho drops its reference to a TLS socket the broker refuses without closing it; the
# garbage collector closes it with a ResourceWarning (as in test_broker_identity.py).
pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


# --- the CRL itself ---------------------------------------------------------------------


def test_a_new_ca_publishes_an_empty_crl_signed_by_itself(tmp_path: Path) -> None:
    ca = StudyCA.load_or_create(tmp_path / "ca")
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert len(crl) == 0
    assert crl.issuer == ca.cert.subject
    assert crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc == CRL_VALIDITY
    assert abs(crl.last_update_utc - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=1)
    assert oct(ca.crl_path.stat().st_mode & 0o777) == oct(0o644)
    # A CA directory from before CRLs (or one whose CRL was removed) gets one on load.
    ca.crl_path.unlink()
    StudyCA.load_or_create(tmp_path / "ca")
    assert len(x509.load_pem_x509_crl(ca.crl_path.read_bytes())) == 0


def test_a_published_crl_names_the_revoked_serials_and_only_them(tmp_path: Path) -> None:
    ca = StudyCA.load_or_create(tmp_path / "ca")
    revoked, kept = (ca.sign_csr(make_csr(keys.generate_private_key()), d) for d in "ab")
    first = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    published = ca.publish_crl([revoked.serial_number])
    on_disk = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert on_disk == published
    assert on_disk.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
    entry = on_disk.get_revoked_certificate_by_serial_number(revoked.serial_number)
    assert entry is not None
    assert entry.revocation_date_utc == on_disk.last_update_utc
    assert on_disk.get_revoked_certificate_by_serial_number(kept.serial_number) is None
    assert [f.name for f in (tmp_path / "ca").iterdir() if f.name.endswith(".tmp")] == []

    # Re-issued at once: a broker keeps, of two CRLs it holds, the one with the later
    # thisUpdate (whole seconds), so each CRL is strictly later and numbered higher.
    again = ca.publish_crl([revoked.serial_number, kept.serial_number])

    def number(crl: x509.CertificateRevocationList) -> int:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number

    assert number(first) < number(published) < number(again)
    assert first.last_update_utc < published.last_update_utc < again.last_update_utc
    assert len(again) == 2


# --- the database's revoked certificates -------------------------------------------------


async def enroll_hub(trial: Trial, ca: StudyCA, participant: str, directory: Path) -> TlsFiles:
    """A hub enrolled as in production (code, CSR, certificate); its TLS files."""
    key = keys.generate_private_key()
    async with db.connection(trial.url) as conn:
        await registry.create_participant(conn, participant, trial.study_id, trial.site_id)
        await conn.commit()
        code = await enrollment.issue_code(conn, participant, created_by="coordinator-1")
        await conn.commit()
        enrolled = await enrollment.enroll(
            conn, code.code, make_csr(key), ca, keys.generate_private_key().public_key()
        )
    return save_hub(directory, ca, key, enrolled)


def save_hub(
    directory: Path, ca: StudyCA, key: ec.EllipticCurvePrivateKey, enrolled: enrollment.Enrollment
) -> TlsFiles:
    directory.mkdir(parents=True)
    keys.save_private_key(key, directory / "hub.key")
    (directory / "hub.pem").write_text(enrolled.certificate_pem)
    (directory / "device_id").write_text(enrolled.device_id)
    return TlsFiles(ca.cert_path, directory / "hub.pem", directory / "hub.key")


def device_id(files: TlsFiles) -> str:
    return (files.certfile.parent / "device_id").read_text()


async def test_the_crl_lists_the_certificates_of_revoked_devices(
    trial: Trial, tmp_path: Path
) -> None:
    ca = StudyCA.load_or_create(tmp_path / "ca")
    a = await enroll_hub(trial, ca, "P-A", tmp_path / "a")
    b = await enroll_hub(trial, ca, "P-B", tmp_path / "b")
    async with db.connection(trial.url) as conn:
        await enrollment.revoke(conn, device_id(a), actor="coordinator-1", reason="lost")
        crl = await revocation.publish_crl(conn, ca)
    assert [r.serial_number for r in crl] == [certificate_serial(a.certfile.read_bytes())]
    assert (
        crl.get_revoked_certificate_by_serial_number(certificate_serial(b.certfile.read_bytes()))
        is None
    )


# --- the real broker ---------------------------------------------------------------------


class HubConnection:
    """A hub's MQTT 5 client over TLS (client id = device id, as the relay's): its CONNACKs
    and disconnects, reconnecting on its own as paho's loop does."""

    def __init__(self, broker: MosquittoBroker, files: TlsFiles, client_id: str) -> None:
        self.accepted = 0
        self.disconnects: list[ReasonCode] = []
        self.refused = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        configure = configure_tls(files)
        assert configure is not None
        configure(self.client)
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = lambda _c, _u: self.refused.set()
        try:
            self.client.connect(broker.host, broker.port)
        except (OSError, ssl.SSLError):
            self.refused.set()
            return
        self.client.loop_start()

    def _on_connect(
        self, _c: mqtt.Client, _u: object, _f: object, rc: ReasonCode, _p: object
    ) -> None:
        if rc.is_failure:
            self.refused.set()
        else:
            self.accepted += 1

    def _on_disconnect(
        self, _c: mqtt.Client, _u: object, _f: object, rc: ReasonCode, _p: object
    ) -> None:
        self.disconnects.append(rc)
        if self.accepted == 0:
            self.refused.set()

    @property
    def connected(self) -> bool:
        return self.client.is_connected()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()


async def attempt(broker: MosquittoBroker, files: TlsFiles, client_id: str) -> bool:
    """Whether a fresh TLS connection with ``files`` gets a successful CONNACK."""
    conn = HubConnection(broker, files, client_id)
    try:
        await wait_until(lambda: conn.accepted > 0 or conn.refused.is_set(), "an answer")
        return conn.accepted > 0
    finally:
        conn.close()
        gc.collect()


async def cli_env(
    trial: Trial, ca: StudyCA, broker: MosquittoBroker, tmp_path: Path
) -> dict[str, str]:
    """The command line's environment; site commands run as the coordinator ``coord``, with
    the password from a file."""
    await add_operators(trial.url, ("coord", Role.SITE_COORDINATOR, [trial.site_id]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIALSTREAM_")}
    env[PASSWORD_FILE_ENV] = str(password_file(tmp_path))
    env.update(
        TRIALSTREAM_DATABASE_URL=trial.url,
        TRIALSTREAM_CA_DIR=str(ca.directory),
        TRIALSTREAM_DATA_DIR=str(tmp_path / "gateway-data"),
        TRIALSTREAM_MQTT_TLS="true",
        TRIALSTREAM_MQTT_HOST=broker.host,
        TRIALSTREAM_MQTT_PORT=str(broker.port),
        TRIALSTREAM_BROKER_PID_FILE=str(broker.pid_path),
    )
    return env


async def trialstream(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
async def test_site_revoke_makes_the_real_broker_refuse_and_drop_the_hub(
    trial: Trial, revocation_ca: StudyCA, crl_broker: MosquittoBroker, tmp_path: Path
) -> None:
    ca = revocation_ca
    lost = await enroll_hub(trial, ca, "P-LOST", tmp_path / "lost")
    other = await enroll_hub(trial, ca, "P-OTHER", tmp_path / "other")
    assert await attempt(crl_broker, lost, device_id(lost))

    lost_conn = HubConnection(crl_broker, lost, device_id(lost))
    other_conn = HubConnection(crl_broker, other, device_id(other))
    try:
        await wait_until(lambda: lost_conn.connected and other_conn.connected, "both hubs up")
        started = time.monotonic()
        result = await trialstream(
            await cli_env(trial, ca, crl_broker, tmp_path),
            "site", "revoke", "--device", device_id(lost), "--reason", "hub stolen",
            "--as", "coord",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "refuses the hub's certificate" in result.stdout
        assert "connection to the broker, if any, was ended" in result.stdout

        # Its open connection ends, and paho's reconnections (every second) are refused.
        await wait_until(lambda: not lost_conn.connected, "the revoked hub dropped", within=5)
        assert not await attempt(crl_broker, lost, device_id(lost))
        assert time.monotonic() - started < 15
        await asyncio.sleep(2.5)
        assert lost_conn.accepted == 1
        assert not lost_conn.connected

        # The other hub kept its connection and may connect afresh.
        assert other_conn.connected
        assert other_conn.disconnects == []
        assert await attempt(crl_broker, other, device_id(other) + "-again")
    finally:
        lost_conn.close()
        other_conn.close()

    async with db.connection(trial.url) as conn:
        cur = await conn.execute(
            "SELECT revoked_reason FROM devices WHERE device_id = %s", (device_id(lost),)
        )
        assert await cur.fetchone() == ("hub stolen",)


@pytest.mark.slow
async def test_revocations_in_quick_succession_all_reach_the_broker(
    trial: Trial, revocation_ca: StudyCA, crl_broker: MosquittoBroker, tmp_path: Path
) -> None:
    """Two CRLs within one second: the broker must use the later one, with both hubs."""
    ca = revocation_ca
    hubs = [await enroll_hub(trial, ca, f"P-{i}", tmp_path / f"hub-{i}") for i in range(3)]
    env = await cli_env(trial, ca, crl_broker, tmp_path)
    # The reload as a command (what `systemctl reload mosquitto` does: SIGHUP).
    env.pop("TRIALSTREAM_BROKER_PID_FILE")
    env["TRIALSTREAM_BROKER_RELOAD"] = f"kill -HUP {crl_broker.pid}"
    for files in hubs[:2]:
        result = await trialstream(
            env,
            "site",
            "revoke",
            "--device",
            device_id(files),
            "--reason",
            "withdrawn",
            "--as",
            "coord",
        )
        assert result.returncode == 0, result.stderr
    assert not await attempt(crl_broker, hubs[0], device_id(hubs[0]))
    assert not await attempt(crl_broker, hubs[1], device_id(hubs[1]))
    assert await attempt(crl_broker, hubs[2], device_id(hubs[2]))


@pytest.mark.slow
async def test_without_a_way_to_reload_the_broker_revoke_says_so(
    trial: Trial, revocation_ca: StudyCA, crl_broker: MosquittoBroker, tmp_path: Path
) -> None:
    hub = await enroll_hub(trial, revocation_ca, "P-X", tmp_path / "x")
    env = await cli_env(trial, revocation_ca, crl_broker, tmp_path)
    env.pop("TRIALSTREAM_BROKER_PID_FILE")
    result = await trialstream(
        env, "site", "revoke", "--device", device_id(hub), "--reason", "lost", "--as", "coord"
    )
    assert result.returncode == 1
    assert "revoked" in result.stdout
    assert "TRIALSTREAM_BROKER_RELOAD" in result.stderr
    assert "Traceback" not in result.stderr
    # The CRL is published; the broker, not reloaded, does not know yet. The daily
    # `broker publish-crl` (here with a pid file) brings it the list and checks it.
    crl = x509.load_pem_x509_crl(revocation_ca.crl_path.read_bytes())
    serial = certificate_serial(hub.certfile.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert await attempt(crl_broker, hub, device_id(hub))
    env["TRIALSTREAM_BROKER_PID_FILE"] = str(crl_broker.pid_path)
    result = await trialstream(env, "broker", "publish-crl")
    assert result.returncode == 0, result.stderr
    assert "refuses revoked certificates" in result.stdout
    assert not await attempt(crl_broker, hub, device_id(hub))


def test_the_probe_tells_a_refused_certificate_from_an_accepted_one(
    revocation_ca: StudyCA, crl_broker: MosquittoBroker, tmp_path: Path
) -> None:
    probe, serial = revocation_ca.issue_probe(tmp_path / "probe")
    assert not handshake_refused(crl_broker.host, crl_broker.port, probe)
    revocation_ca.publish_crl([serial])
    crl_broker.reload()
    deadline = time.monotonic() + 5
    while not handshake_refused(crl_broker.host, crl_broker.port, probe):
        assert time.monotonic() < deadline, "the reloaded broker still accepts the probe"
        time.sleep(0.1)


@pytest.mark.slow
async def test_revoking_a_device_without_a_certificate_on_record_says_so(
    trial: Trial, revocation_ca: StudyCA, crl_broker: MosquittoBroker, tmp_path: Path
) -> None:
    """hub-1 of the trial fixture was registered without enrollment: no certificate."""
    env = await cli_env(trial, revocation_ca, crl_broker, tmp_path)
    result = await trialstream(
        env, "site", "revoke", "--device", "hub-1", "--reason", "lost", "--as", "coord"
    )
    assert result.returncode == 1
    assert "device hub-1 revoked" in result.stdout
    assert "refuses the hub's certificate" not in result.stdout
    assert "no certificate is on record for hub-1" in result.stderr
