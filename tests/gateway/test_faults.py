"""Faults on the ingest path with every component real: the gateway as the processes people
run (``python -m gateway.cli gateway``), a private Mosquitto, PostgreSQL, and hubs relaying
from their durable outboxes (republish until receipt). Workers are killed with SIGKILL, the
broker is killed and restarted, database backends are terminated and the database refuses
connections for a while; at the end every reading is stored exactly once and every
envelope the hubs sealed has its receipt."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from psycopg import conninfo, sql

from device_drivers.outbox import Outbox
from device_drivers.relay import Relay, RelayConfig
from gateway import serve
from gateway.broker import MosquittoBroker, free_port
from gateway.consumer import MAX_UNACKED
from gateway.pki import StudyCA
from gateway.serve import STOP_GRACE_S
from gateway.settings import Settings
from ingest import keys
from ingest.model import Reading
from storage import db
from tests.fixtures.gateway import METRICS_HEADERS
from tests.fixtures.gateway import gateway_env as shared_env
from tests.fixtures.mqtt import MqttProbe
from tests.fixtures.trial import Hub, Trial
from tests.fixtures.waiting import wait_until

pytestmark = pytest.mark.slow

READINGS_PER_HUB = 10_000
# Several readings per envelope, as hubs send them; small enough that the faults land
# while envelopes are in flight.
READINGS_PER_ENVELOPE = 50


# --- the gateway as processes ---------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text()
            out.extend(int(p) for p in text.split())
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@dataclass
class GatewayProcess:
    """``trialstream gateway --workers N`` in its own process group."""

    env: dict[str, str]
    workers: int
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    _logs: list[object] = field(default_factory=list)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.env['TRIALSTREAM_HTTP_PORT']}"

    def start(self) -> None:
        assert self.log_path is not None
        log = self.log_path.open("ab")
        self._logs.append(log)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "gateway", "--workers", str(self.workers)],
            env=self.env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        return [p for p in _children(self.proc.pid) if "spawn_main" in _cmdline(p)]

    def kill_worker(self) -> int:
        pids = self.worker_pids()
        assert pids, "no gateway worker to kill"
        os.kill(pids[0], signal.SIGKILL)
        return pids[0]

    def kill_all(self) -> None:
        """SIGKILL to the supervisor and its workers at once: nothing restarts them."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill_all()
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        for log in self._logs:
            log.close()  # type: ignore[attr-defined]

    def get(self, path: str) -> tuple[int, str]:
        try:
            request = urllib.request.Request(self.http + path, headers=METRICS_HEADERS)
            with urllib.request.urlopen(request, timeout=3) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()

    def health(self) -> dict[str, object] | None:
        try:
            _, body = self.get("/healthz")
        except OSError:
            return None
        return dict(json.loads(body))

    def metric(self, name: str, **labels: str) -> int:
        """The sum of a counter over the samples matching ``labels`` (one worker per scrape)."""
        _, text = self.get("/metrics")
        total = 0
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += int(line.rsplit(" ", 1)[1])
        return total

    async def healthy(self, within: float = 60.0) -> None:
        def ok() -> bool:
            assert self.proc is not None
            assert self.proc.poll() is None, self.log_tail()
            h = self.health()
            return h is not None and h.get("status") == "ok"

        await wait_until(ok, "the gateway reports healthy", within=within)

    def log_tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-3000:]


def gateway_env(
    database_url: str, broker: MosquittoBroker, data_dir: Path, *, node: str = "gw"
) -> dict[str, str]:
    return shared_env(database_url, broker, data_dir, free_port(), NODE=node)


@contextlib.contextmanager
def gateway_process(
    database_url: str,
    broker: MosquittoBroker,
    data_dir: Path,
    *,
    workers: int,
    node: str = "gw",
) -> Iterator[GatewayProcess]:
    data_dir.mkdir(parents=True, exist_ok=True)
    gw = GatewayProcess(gateway_env(database_url, broker, data_dir, node=node), workers)
    gw.log_path = data_dir / f"gateway-{node}.log"
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


# --- hubs -----------------------------------------------------------------------------------


@dataclass
class RunningHub:
    hub: Hub
    relay: Relay
    outbox: Outbox
    task: asyncio.Task[None]
    produced: int = 0


@contextlib.asynccontextmanager
async def relays(
    hubs: list[Hub], broker: MosquittoBroker, gateway_key_path: Path, tmp_path: Path
) -> AsyncIterator[list[RunningHub]]:
    gateway_public = keys.load_private_key(gateway_key_path).public_key()
    running: list[RunningHub] = []
    try:
        for hub in hubs:
            outbox = Outbox.open(tmp_path / f"outbox-{hub.device_id}.sqlite", hub.device_id)
            config = RelayConfig(
                hub.device_id,
                broker.host,
                broker.port,
                seal_max_readings=READINGS_PER_ENVELOPE,
                seal_max_age_s=0.2,
                resend_after_s=3.0,
                tick_s=0.05,
            )
            relay = Relay(config, outbox, hub.key, gateway_public)
            task = asyncio.create_task(relay.run(), name=f"test-relay-{hub.device_id}")
            running.append(RunningHub(hub, relay, outbox, task))
        yield running
    finally:
        for r in running:
            r.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await r.task
            r.outbox.close()


def produce(hub: RunningHub, n: int, t0_ms: int) -> None:
    """The hub's wearables deliver ``n`` more readings (10 ms apart, after the last)."""
    start = hub.produced
    hub.outbox.add_readings(
        [
            Reading(t0_ms + (start + i) * 10, "heart_rate", 60.0 + (start + i) % 50, "/min", "hr")
            for i in range(n)
        ]
    )
    hub.produced += n


async def drained(hubs: list[RunningHub], within: float) -> None:
    def empty() -> bool:
        return all(
            (s := h.outbox.stats()).pending_readings == 0 and s.unreceipted_envelopes == 0
            for h in hubs
        )

    await wait_until(empty, "every outbox drained (every envelope receipted)", within=within)


async def assert_stored_exactly_once(url: str, hubs: list[RunningHub]) -> None:
    async with db.connection(url) as conn:
        for h in hubs:
            dev = h.hub.device_id
            cur = await conn.execute(
                "SELECT count(*), count(DISTINCT (seq, time)) FROM readings WHERE device_id = %s",
                (dev,),
            )
            total, distinct = await cur.fetchone() or (0, 0)
            assert (total, distinct) == (h.produced, h.produced), dev
            cur = await conn.execute(
                "SELECT seq, reading_count, stored_count FROM envelopes WHERE device_id = %s",
                (dev,),
            )
            stored = {int(s): (int(n), int(k)) for s, n, k in await cur.fetchall()}
            next_seq = h.outbox.stats().next_seq
            # Every envelope the hub sealed is stored once, whole, and was receipted.
            assert set(stored) == set(range(1, next_seq)), dev
            assert all(n == k for n, k in stored.values()), dev
            assert h.relay.stats.receipts_accepted >= next_seq - 1, dev
            assert h.relay.stats.receipts_rejected == 0, dev
        cur = await conn.execute("SELECT count(*) FROM rejections")
        assert await cur.fetchone() == (0,)


async def terminate_backends(url: str) -> int:
    name = str(conninfo.conninfo_to_dict(url)["dbname"])
    async with db.connection(url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        row = await cur.fetchone()
    return int(row[0]) if row else 0


def prepare_gateway_key(data_dir: Path) -> Path:
    """The receipt key, made before the workers start (they load it; hubs verify with it)."""
    path = data_dir / "keys" / "gateway.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    keys.save_private_key(keys.generate_private_key(), path)
    return path


async def three_hubs(trial: Trial) -> list[Hub]:
    await trial.add_participant("P2", "hub-2")
    await trial.add_participant("P3", "hub-3")
    return [trial.hubs["hub-1"], trial.hubs["hub-2"], trial.hubs["hub-3"]]


# --- the tests ------------------------------------------------------------------------------


async def test_worker_broker_and_database_faults_lose_and_duplicate_nothing(
    trial: Trial, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    hubs = await three_hubs(trial)
    data_dir = tmp_path / "gw"
    key_path = prepare_gateway_key(data_dir)
    t0_ms = int(time.time() * 1000) - 3_600_000
    steps = 20
    per_step = READINGS_PER_HUB // steps
    with gateway_process(trial.url, mosquitto, data_dir, workers=2) as gw:
        await gw.healthy()
        async with relays(hubs, mosquitto, key_path, tmp_path) as running:
            killed: list[int] = []
            terminated = 0
            for step in range(steps):
                for h in running:
                    produce(h, per_step, t0_ms)
                if step == 4:
                    killed.append(gw.kill_worker())
                if step == 8:
                    mosquitto.kill()
                if step == 10:
                    mosquitto.start()
                if step in (13, 16):
                    terminated += await terminate_backends(trial.url)
                await asyncio.sleep(0.2)
            await drained(running, within=90)
            await assert_stored_exactly_once(trial.url, running)
            assert all(h.produced == READINGS_PER_HUB for h in running)
            # The faults happened: a worker died (and was replaced), backends were cut,
            # and hubs had to send envelopes again.
            assert killed
            assert killed[0] not in gw.worker_pids()
            assert len(gw.worker_pids()) == 2
            assert terminated > 0
            assert sum(h.relay.stats.resent for h in running) > 0


async def test_two_gateways_share_the_work_and_one_killed_loses_nothing(
    trial: Trial, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    hubs = await three_hubs(trial)
    key_path = prepare_gateway_key(tmp_path / "a")
    (tmp_path / "b" / "keys").mkdir(parents=True)
    keys.save_private_key(keys.load_private_key(key_path), tmp_path / "b" / "keys" / "gateway.key")
    t0_ms = int(time.time() * 1000) - 3_600_000
    with (
        gateway_process(trial.url, mosquitto, tmp_path / "a", workers=1, node="a") as a,
        gateway_process(trial.url, mosquitto, tmp_path / "b", workers=1, node="b") as b,
    ):
        await a.healthy()
        await b.healthy()
        async with relays(hubs, mosquitto, key_path, tmp_path) as running:
            for _ in range(10):
                for h in running:
                    produce(h, 300, t0_ms)
                await asyncio.sleep(0.1)

            def both_took_work() -> bool:
                return (
                    a.metric("trialstream_envelopes_total", outcome="new") > 0
                    and b.metric("trialstream_envelopes_total", outcome="new") > 0
                )

            await wait_until(both_took_work, "both gateways stored envelopes", within=60)
            b.kill_all()
            before = a.metric("trialstream_envelopes_total", outcome="new")
            for _ in range(10):
                for h in running:
                    produce(h, 300, t0_ms)
                await asyncio.sleep(0.1)
            await wait_until(
                lambda: a.metric("trialstream_envelopes_total", outcome="new") > before,
                "the surviving gateway takes the new envelopes",
                within=60,
            )
            # The killed gateway's session holds what it had not acknowledged; the hubs
            # send those envelopes again until a receipt comes, and the survivor stores them.
            await drained(running, within=90)
            await assert_stored_exactly_once(trial.url, running)


async def test_database_outage_holds_messages_and_resumes_exactly_once(
    trial: Trial, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    hubs = await three_hubs(trial)
    data_dir = tmp_path / "gw"
    key_path = prepare_gateway_key(data_dir)
    t0_ms = int(time.time() * 1000) - 3_600_000
    name = str(conninfo.conninfo_to_dict(trial.url)["dbname"])
    admin_url = conninfo.make_conninfo(trial.url, dbname="postgres")

    async def allow_connections(allowed: bool) -> None:
        async with db.connection(admin_url, autocommit=True) as conn:
            await conn.execute(
                sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
                    sql.Identifier(name), sql.Literal(allowed)
                )
            )

    with gateway_process(trial.url, mosquitto, data_dir, workers=2) as gw:
        await gw.healthy()
        async with relays(hubs, mosquitto, key_path, tmp_path) as running:
            for h in running:
                produce(h, 1000, t0_ms)
            await drained(running, within=60)
            try:
                await allow_connections(False)
                async with db.connection(admin_url, autocommit=True) as conn:
                    await conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                        (name,),
                    )

                def database_down() -> bool:
                    h = gw.health()
                    return h is not None and h.get("database") is False

                await wait_until(database_down, "/healthz reports the database down")
                for h in running:
                    produce(h, 2000, t0_ms)

                def retrying() -> bool:
                    return gw.metric("trialstream_database_retries_total") > 0

                await wait_until(retrying, "the gateway retries the held batch", within=60)
                # Nothing was receipted meanwhile: the envelopes wait unacknowledged.
                assert all(h.outbox.stats().unreceipted_envelopes > 0 for h in running)
                assert gw.health() is not None
                assert gw.get("/healthz")[0] == 503
            finally:
                await allow_connections(True)
            await gw.healthy()
            await drained(running, within=90)
            await assert_stored_exactly_once(trial.url, running)
            assert all(h.produced == 3000 for h in running)


def _running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


async def test_a_stopped_gateway_lets_its_backlog_go_and_exits_promptly(
    trial: Trial, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """A worker holding MAX_UNACKED messages, with more waiting in its socket, stops at once
    on SIGINT: what it holds is not acknowledged (the broker delivers it again)."""
    with gateway_process(trial.url, mosquitto, tmp_path / "gw", workers=1) as gw:
        await gw.healthy()
        workers = gw.worker_pids()
        probe = MqttProbe(mosquitto, "backlog-publisher")
        try:
            async with db.connection(trial.url) as blocker:
                # Every batch's rejection rows now wait for this lock: the worker fills up.
                await blocker.execute("LOCK TABLE rejections IN ACCESS EXCLUSIVE MODE")
                infos = [
                    probe.client.publish(f"dct/v1/junk-{i % 7}/up", b"not an envelope", qos=1)
                    for i in range(MAX_UNACKED + 2000)
                ]
                await asyncio.to_thread(infos[-1].wait_for_publish, 30)
                assert all(i.is_published() for i in infos)  # all at the broker
                await wait_until(
                    lambda: gw.metric("trialstream_messages_total") > 0, "the worker taking them"
                )
                started = time.monotonic()
                gw.stop()
                took = time.monotonic() - started
        finally:
            probe.close()
    assert took < STOP_GRACE_S, gw.log_tail()
    assert "did not stop" not in gw.log_tail()
    assert not any(_running(p) for p in workers)


async def test_workers_stop_when_their_supervisor_is_killed(
    trial: Trial, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    with gateway_process(trial.url, mosquitto, tmp_path / "gw", workers=2) as gw:
        await gw.healthy()
        workers = gw.worker_pids()
        assert len(workers) == 2
        assert gw.proc is not None
        os.kill(gw.proc.pid, signal.SIGKILL)  # the supervisor only
        gw.proc.wait()
        await wait_until(
            lambda: not any(_running(p) for p in workers),
            "the orphaned workers stopping by themselves",
            within=20,
        )


async def test_the_supervisor_makes_the_study_ca_before_any_worker_starts(
    database_url: str, tmp_path: Path
) -> None:
    """Every worker loads the study CA; made by the first two at once, one of them found the
    other's key half-written and exited (and two restarts left no worker for seconds)."""
    settings = Settings(database_url=database_url, data_dir=tmp_path / "gw", mqtt_tls=False)
    await serve.prepare(settings)
    assert (settings.ca_path / "ca.key").exists()
    assert (settings.ca_path / "ca.pem").exists()
    first = StudyCA.load_or_create(settings.ca_path).cert
    await serve.prepare(settings)  # a restart keeps it
    assert StudyCA.load_or_create(settings.ca_path).cert == first


async def test_a_worker_keeps_the_collector_off_its_start_up_heap(
    trial: Trial, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """Under load the cyclic collector traversed every worker's whole heap over and over (14.5%
    of the samples at 10 readings per envelope): a worker freezes what it holds once started."""
    with gateway_process(trial.url, mosquitto, tmp_path / "gw", workers=1) as gw:
        await gw.healthy()
        assert gw.metric("trialstream_gc_frozen_objects") > 10_000, gw.log_tail()
        # Collections are still counted, per generation.
        _, text = gw.get("/metrics")
        assert 'trialstream_gc_collections_total{worker="0",generation="2"}' in text
