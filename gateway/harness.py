"""The whole cluster on one machine (docs/scaling.md): what ``trialstream cluster`` runs and the
scaling fault test uses.

- RabbitMQ: ``rabbit_nodes`` nodes joined into one cluster (:class:`gateway.rabbitmq.
  RabbitCluster`); hubs speak MQTT 3.1.1 to it, gateways consume the uplink quorum queue.
- PostgreSQL: a primary and its synchronous standby under Patroni with etcd
  (:class:`gateway.patroni.PatroniCluster`), the trial's database on it.
- Gateway "hosts": ``gateway_hosts`` separate ``trialstream gateway`` processes, each its own
  node name, data directory, HTTP port and process group, consuming from RabbitMQ (each
  starting at a different node of the list) and writing through the multi-host database URL.
  They share one receipt key, as the gateways of one deployment do.
- Simulated hubs (:class:`SimulatedHub`): enrolled in the database with their own keys and
  broker logins, each a real relay and outbox in this process, starting at different broker
  nodes and knowing the others' addresses.

:func:`drill` streams from the hubs while it kills (-9) the RabbitMQ node leading the uplink
queue, one gateway host and the PostgreSQL primary, then waits until every hub has its
receipts and compares what each hub made with what is stored (:class:`DrillReport`).
Every process the harness starts it stops by its own process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric import ec

from device_drivers.clock import HubClock
from device_drivers.hub import OutboxSink
from device_drivers.outbox import Outbox
from device_drivers.relay import Relay, RelayConfig
from gateway.amqp import UPLINK_QUEUE, declare_uplink
from gateway.broker import free_port
from gateway.errors import GatewayError
from gateway.patroni import PatroniCluster
from gateway.processes import (
    attempts,
    log_tail,
    side_by_side,
    signal_group,
    stop_group,
    until,
)
from gateway.rabbitmq import RabbitCluster
from ingest import keys
from ingest.metrics import METRICS
from ingest.model import Reading
from storage import db, registry, status
from storage.errors import DatabaseUnavailable
from storage.migrate import ModeRequest, migrate

log = logging.getLogger(__name__)

DATABASE: Final = "trial"
STUDY: Final = "CLUSTER-01"
SITE: Final = "SITE-1"
READY_TIMEOUT_S: Final = 90.0
# Ten readings every 100 ms per hub while a drill streams: 100 readings/s, about five
# envelopes a second at the hubs' sealing below.
BURST: Final = 10
BURST_EVERY_S: Final = 0.1
ALL_SCOPES: Final = frozenset(m.scope for m in METRICS.values())


class HarnessError(GatewayError):
    """A part of the harness did not start or did not answer in time."""


@dataclass(frozen=True, slots=True)
class Shape:
    rabbit_nodes: int = 3
    database_nodes: int = 2
    gateway_hosts: int = 2
    workers_per_host: int = 1

    def check(self) -> None:
        if not 1 <= self.rabbit_nodes <= 7:
            raise ValueError("between 1 and 7 RabbitMQ nodes")
        if not 2 <= self.database_nodes <= 5:
            raise ValueError("between 2 and 5 database nodes (a primary and its standbys)")
        if not 1 <= self.gateway_hosts <= 8 or not 1 <= self.workers_per_host <= 8:
            raise ValueError("between 1 and 8 gateway hosts, each with 1 to 8 workers")

    def check_drill(self) -> None:
        """A drill loses a broker node and a gateway host: a majority of the queue's
        members and one gateway host must be left."""
        if self.rabbit_nodes < 3 or self.gateway_hosts < 2:
            raise ValueError(
                "a drill needs at least 3 RabbitMQ nodes (a majority of the queue's members"
                " survives one lost) and 2 gateway hosts"
            )


class GatewayHost:
    """One gateway "host": ``python -m gateway.cli gateway`` in a process group of its own."""

    def __init__(
        self,
        directory: Path,
        name: str,
        database_url: str,
        amqp_urls: list[str],
        gateway_key: Path,
        workers: int,
    ) -> None:
        self.directory = directory
        self.name = name
        self.http_port = free_port()
        self.workers = workers
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TRIALSTREAM_")}
        self.env.update(
            {
                "TRIALSTREAM_DATABASE_URL": database_url,
                "TRIALSTREAM_STORAGE_MODE": "plain",
                "TRIALSTREAM_MESSAGE_SOURCE": "amqp",
                "TRIALSTREAM_AMQP_URLS": ",".join(amqp_urls),
                "TRIALSTREAM_MQTT_V5": "false",
                "TRIALSTREAM_NODE": name,
                "TRIALSTREAM_DATA_DIR": str(directory),
                "TRIALSTREAM_GATEWAY_KEY": str(gateway_key),
                "TRIALSTREAM_HTTP_PORT": str(self.http_port),
                "TRIALSTREAM_LOG_LEVEL": "INFO",
            }
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.directory / "gateway.log"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "gateway.cli", "gateway", "--workers", str(self.workers)]
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                command, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as resp:  # noqa: S310
                return int(resp.status) == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_healthy(self, timeout: float = READY_TIMEOUT_S) -> None:
        for _ in attempts(timeout, 0.2):
            if self.healthy():
                return
            if not self.alive():
                raise HarnessError(f"gateway host {self.name} exited: {log_tail(self.log_path)}")
        raise HarnessError(f"gateway host {self.name} not healthy in {timeout:.0f} s")

    def kill(self) -> None:
        """kill -9 the host's supervisor and workers together (a host lost)."""
        signal_group(self.process, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=10)

    def stop(self) -> None:
        stop_group(self.process, 30)


@dataclass
class SimulatedHub:
    """An enrolled hub's relay and outbox in this process, fed heart-rate readings."""

    relay: Relay
    outbox: Outbox
    sink: OutboxSink
    produced: int = 0

    @property
    def device_id(self) -> str:
        return self.relay.config.device_id

    async def produce(self, n: int) -> None:
        """n heart-rate readings stamped now by the hub's clock, as a session would."""
        t = int(self.sink.clock() * 1000)
        await self.sink.readings(
            [Reading(t - n + i + 1, "heart_rate", 60.0 + i % 30, "/min", "hr") for i in range(n)]
        )
        self.produced += n

    def drained(self) -> bool:
        """Every reading it made sealed, sent and receipted."""
        s = self.outbox.stats()
        return s.pending_readings == s.pending_gaps == s.unreceipted_envelopes == 0


class Harness:
    """The cluster in ``directory``: :meth:`start`, then :func:`running_hubs` and
    :func:`drill` or a look around, then :meth:`stop` (or use it as a context manager)."""

    def __init__(self, directory: Path, shape: Shape | None = None) -> None:
        self.shape = shape or Shape()
        self.shape.check()
        self.directory = directory
        self.rabbit = RabbitCluster(directory / "rabbitmq", self.shape.rabbit_nodes)
        self.database = PatroniCluster(self.shape.database_nodes)
        self.gateway_key = directory / "gateway.key"
        self.hosts: list[GatewayHost] = []
        self.document_id = 0  # the study's consent document, once seeded

    @property
    def database_url(self) -> str:
        return self.database.dsn(DATABASE)

    def __enter__(self) -> Harness:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, say: Callable[[str], None] = log.info) -> None:
        """RabbitMQ and the database side by side, then the schema and the uplink queue,
        then the gateway hosts; returns once every host answers /healthz."""
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            say(
                f"starting {self.shape.rabbit_nodes} RabbitMQ nodes and "
                f"{self.shape.database_nodes} Patroni nodes with etcd"
            )
            side_by_side(self.rabbit.start, self.database.start)
            say(f"RabbitMQ cluster and database ready; primary {self.database.primary().name}")
            asyncio.run(self._prepare())
            urls = self.rabbit.amqp_urls
            for i in range(self.shape.gateway_hosts):
                rotated = urls[i % len(urls) :] + urls[: i % len(urls)]
                host = GatewayHost(
                    self.directory / f"gateway-{i}",
                    f"host{i}",
                    self.database_url,
                    rotated,
                    self.gateway_key,
                    self.shape.workers_per_host,
                )
                self.hosts.append(host)
                host.start()
            for host in self.hosts:
                host.wait_healthy()
            say(f"{len(self.hosts)} gateway hosts healthy: {', '.join(h.url for h in self.hosts)}")
        except BaseException:
            self.stop()
            raise

    async def _prepare(self) -> None:
        import aio_pika

        await db.create_database(self.database.dsn(), DATABASE)
        async with db.connection(self.database_url, autocommit=True) as conn:
            await migrate(conn, ModeRequest.PLAIN)
        self.document_id = await _seed(self.database_url)
        if not self.gateway_key.exists():
            keys.save_private_key(keys.generate_private_key(), self.gateway_key)
        connection = await aio_pika.connect(self.rabbit.nodes[0].amqp_url)
        async with connection:
            await declare_uplink(await connection.channel())

    def uplink_leader_index(self) -> int:
        return self.rabbit.nodes.index(self.rabbit.leader(UPLINK_QUEUE))

    async def progress(self, hubs: list[SimulatedHub], elapsed_s: float) -> str:
        """One status line: what the hubs made, what is receipted, stored, refused."""
        try:
            verdicts = await _verdicts(self.database_url, hubs)
        except DatabaseUnavailable as exc:
            return f"[{elapsed_s:7.1f} s] database not reachable: {exc}"
        unreceipted = sum(h.outbox.stats().unreceipted_envelopes for h in hubs)
        connected = sum(h.relay.stats.connected for h in hubs)
        return (
            f"[{elapsed_s:7.1f} s] produced {sum(v.produced for v in verdicts)}"
            f" stored {sum(v.stored_readings for v in verdicts)}"
            f" envelopes {sum(v.stored_envelopes for v in verdicts)}"
            f" unreceipted {unreceipted}"
            f" rejections {sum(v.rejections for v in verdicts)}"
            f" hubs connected {connected}/{len(hubs)}"
            f" rabbitmq {len(self.rabbit.running())}/{len(self.rabbit.nodes)}"
            f" gateway hosts {sum(h.alive() for h in self.hosts)}/{len(self.hosts)}"
        )

    def describe(self) -> dict[str, Any]:
        """Every address and process of the cluster, as JSON."""
        return {
            "directory": str(self.directory),
            "rabbitmq": [
                {
                    "node": n.name,
                    "amqp": n.amqp_url,
                    "mqtt": f"127.0.0.1:{n.mqtt_port}",
                    "pid": n.process.pid if n.process else None,
                    "running": n in self.rabbit.running(),
                }
                for n in self.rabbit.nodes
            ],
            "database": {
                "url": self.database_url,
                "members": self.database.members(),
                "nodes": [
                    {"name": n.name, "port": n.pg_port, "rest": n.rest_port}
                    for n in self.database.nodes
                ],
            },
            "gateway_hosts": [
                {
                    "name": h.name,
                    "url": h.url,
                    "pid": h.process.pid if h.process else None,
                    "running": h.alive(),
                    "log": str(h.log_path),
                }
                for h in self.hosts
            ],
        }

    def stop(self) -> None:
        """Every gateway host, then RabbitMQ, then the database, each by its process group."""
        for host in self.hosts:
            host.stop()
        self.rabbit.stop()
        self.database.stop()


async def _seed(url: str) -> int:
    """The harness's study, site and consent document (its id)."""
    async with db.connection(url) as conn, conn.transaction():
        await registry.create_study(conn, STUDY, "Cluster harness study")
        await registry.create_site(conn, SITE, STUDY, "Site 1")
        return await registry.create_consent_document(
            conn,
            STUDY,
            "Main ICF",
            "1.0",
            "I agree to share my readings.",
            ALL_SCOPES,
            effective_at=datetime.now(UTC) - timedelta(days=30),
        )


async def _enroll(
    harness: Harness, participant: str, device: str, public_key: ec.EllipticCurvePublicKey
) -> None:
    now = datetime.now(UTC)
    async with db.connection(harness.database_url) as conn, conn.transaction():
        await registry.enroll_consented(
            conn,
            registry.ConsentedHub(
                participant,
                STUDY,
                SITE,
                device,
                keys.public_key_to_der(public_key),
                keys.fingerprint(public_key),
                harness.document_id,
                ALL_SCOPES,
                enrolled_at=now - timedelta(days=1),
                consent_at=now - timedelta(hours=1),
                recorded_by="cluster-harness",
            ),
        )


@contextlib.asynccontextmanager
async def running_hubs(harness: Harness, count: int) -> AsyncIterator[list[SimulatedHub]]:
    """``count`` hubs enrolled (database and broker login), each relaying from its own outbox
    to the broker node ``i % nodes`` first, the other nodes after it."""
    receipt_key = keys.load_private_key(harness.gateway_key).public_key()
    nodes = harness.rabbit.nodes
    hubs: list[SimulatedHub] = []
    tasks: list[asyncio.Task[None]] = []
    stem = secrets.token_hex(2)
    try:
        for i in range(count):
            device = f"hub-{stem}-{i}"
            key = keys.generate_private_key()
            await _enroll(harness, f"P-{stem}-{i}", device, key.public_key())
            password = secrets.token_urlsafe(16)
            await asyncio.to_thread(harness.rabbit.add_hub, device, password)
            order = nodes[i % len(nodes) :] + nodes[: i % len(nodes)]
            directory = harness.directory / "hubs" / device
            directory.mkdir(parents=True, exist_ok=True)
            outbox = Outbox.open(directory / "outbox.sqlite", device)
            config = RelayConfig(
                device,
                "127.0.0.1",
                order[0].mqtt_port,
                seal_max_readings=20,
                seal_max_age_s=0.2,
                resend_after_s=3.0,
                tick_s=0.05,
                mqtt5=False,
                alternates=tuple(("127.0.0.1", n.mqtt_port) for n in order[1:]),
            )
            relay = Relay(
                config,
                outbox,
                key,
                receipt_key,
                configure_client=_login(device, password),
            )
            hubs.append(SimulatedHub(relay, outbox, OutboxSink(outbox, HubClock(time.time))))
            tasks.append(asyncio.create_task(relay.run(), name=f"relay-{device}"))
        yield hubs
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for hub in hubs:
            hub.outbox.close()


def _login(device: str, password: str) -> Callable[[mqtt.Client], None]:
    def configure(client: mqtt.Client) -> None:
        client.username_pw_set(device, password)
        client.reconnect_delay_set(1, 2)

    return configure


@dataclass
class HubVerdict:
    device_id: str
    produced: int
    sealed: int  # envelopes the hub sealed (its next sequence number less one)
    stored_readings: int
    stored_envelopes: int
    carried: int
    rejections: int
    receipts_accepted: int
    receipts_rejected: int
    broker: str  # the address it ended on

    @property
    def ok(self) -> bool:
        """Every reading stored once, every envelope once, each receipted, nothing refused."""
        return (
            self.stored_readings == self.carried == self.produced
            and self.stored_envelopes == self.sealed == self.receipts_accepted
            and self.rejections == 0
            and self.receipts_rejected == 0
        )


@dataclass
class DrillReport:
    hubs: list[HubVerdict]
    faults: list[dict[str, Any]] = field(default_factory=list)
    drained_after_s: float | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.drained_after_s is not None and all(h.ok for h in self.hubs)

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "seconds": round(self.seconds, 1),
            "drained_after_s": self.drained_after_s,
            "faults": self.faults,
            "hubs": [{**asdict(h), "ok": h.ok} for h in self.hubs],
        }


async def drill(
    harness: Harness,
    hubs: list[SimulatedHub],
    say: Callable[[str], None] = log.info,
    *,
    settle_s: float = 4.0,
    drain_timeout_s: float = 180.0,
) -> DrillReport:
    """Stream from every hub while killing (-9), one after the other with ``settle_s``
    between: the RabbitMQ node leading the uplink queue, the first gateway host still
    alive, and the PostgreSQL primary (waiting until the standby takes writes). Then stop
    streaming, wait until every hub has every receipt, and compare."""
    harness.shape.check_drill()
    t0 = time.monotonic()
    report = DrillReport([])

    def fault(what: str, **detail: Any) -> None:
        entry = {"at_s": round(time.monotonic() - t0, 1), "fault": what, **detail}
        report.faults.append(entry)
        say(f"[{entry['at_s']:6.1f} s] kill -9 {what} {json.dumps(detail)}")

    await until(lambda: all(h.relay.stats.connected for h in hubs), "every hub connected", 60)
    stop = asyncio.Event()
    streaming = asyncio.create_task(stream(hubs, stop), name="drill-stream")
    try:
        await asyncio.sleep(settle_s)
        leader = harness.rabbit.leader(UPLINK_QUEUE)
        fault("rabbitmq-uplink-leader", node=leader.name)
        await asyncio.to_thread(leader.kill)
        await asyncio.sleep(settle_s)
        host = next(h for h in harness.hosts if h.alive())
        fault("gateway-host", host=host.name)
        await asyncio.to_thread(host.kill)
        await asyncio.sleep(settle_s)
        primary = harness.database.primary()
        fault("postgresql-primary", node=primary.name)
        await asyncio.to_thread(primary.kill)
        promoted = await asyncio.to_thread(harness.database.wait_for_primary, primary)
        say(
            f"[{time.monotonic() - t0:6.1f} s] {promoted.name} is primary and takes writes; "
            f"uplink leader {harness.rabbit.leader(UPLINK_QUEUE).name}"
        )
        await asyncio.sleep(settle_s)
    finally:
        stop.set()
        await streaming
    say(f"[{time.monotonic() - t0:6.1f} s] streaming stopped; waiting for every receipt")
    drained = time.monotonic()
    with contextlib.suppress(TimeoutError):
        await until(lambda: all(h.drained() for h in hubs), "every receipt", drain_timeout_s)
        report.drained_after_s = round(time.monotonic() - drained, 1)
    report.hubs = await _verdicts(harness.database_url, hubs)
    report.seconds = time.monotonic() - t0
    return report


async def stream(hubs: Iterable[SimulatedHub], stop: asyncio.Event) -> None:
    """``BURST`` readings from every hub each ``BURST_EVERY_S`` until ``stop`` is set."""
    while not stop.is_set():
        for hub in hubs:
            await hub.produce(BURST)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), BURST_EVERY_S)


async def _verdicts(url: str, hubs: list[SimulatedHub]) -> list[HubVerdict]:
    async with db.connection(url) as conn:
        tallies = await status.device_tallies(conn, [h.device_id for h in hubs])
    return [
        HubVerdict(
            hub.device_id,
            hub.produced,
            hub.outbox.stats().next_seq - 1,
            tally.readings,
            tally.envelopes,
            tally.carried,
            tally.rejections,
            hub.relay.stats.receipts_accepted,
            hub.relay.stats.receipts_rejected,
            "{}:{}".format(*hub.relay.broker),
        )
        for hub, tally in zip(hubs, tallies, strict=True)
    ]
