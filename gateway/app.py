"""The gateway's aiohttp application: it owns the database pool and the MQTT consumer.

``create_app(settings)`` builds it; the pool and the consumer are resources of the app
(``cleanup_ctx``), started with it and closed with it. ``/healthz`` answers 200 only while
the database and the broker are both reachable; ``/metrics`` is Prometheus text.

The consumer and the alert service run as tasks beside the HTTP server. When either ends
with an error, the error is logged once with its traceback and the ``on_fatal`` callback
given to ``create_app`` is called with ``EXIT_CONSUMER_DIED``: the process running the app
stops it (``gateway.serve`` exits the worker, which its supervisor starts again), so a
worker never goes on serving HTTP with nothing ingesting.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import hmac
import io
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

import paho.mqtt.client as mqtt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from psycopg_pool import AsyncConnectionPool

from gateway import hub_routes
from gateway.alerts import AlertEngine, AlertService, MqttPublisher, Publisher
from gateway.consumer import Consumer, ConsumerConfig, Histogram
from gateway.consumer_core import BatchConsumer
from gateway.notify import Notifier
from gateway.pki import GATEWAY_IDENTITY, StudyCA
from gateway.problems import problem, problem_middleware
from gateway.serve import EXIT_CONSUMER_DIED, dump_tasks
from gateway.settings import Settings
from gateway.web import auth, setup_web
from gateway.web.ratelimit import TRUSTED_PROXIES, parse_networks
from ingest import keys
from ingest.transport import configure_tls
from storage import db
from storage.migrate import StorageMode, migrate
from storage.users import Role
from storage.writer import BulkWriter, InTransaction

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
WORKER = web.AppKey("worker", int)
POOL = web.AppKey("pool", AsyncConnectionPool)
# The consumer's own connections: the pages' and API's load can never take the ones the
# ingest path needs (one batch being judged, one being written).
INGEST_POOL = web.AppKey("ingest_pool", AsyncConnectionPool)
MODE = web.AppKey("mode", StorageMode)
CONSUMER = web.AppKey("consumer", BatchConsumer)
CONSUMER_TASK = web.AppKey("consumer_task", asyncio.Task[None])
STUDY_CA = web.AppKey("study_ca", StudyCA)
RECEIPT_KEY = web.AppKey("receipt_key", ec.EllipticCurvePrivateKey)
ALERT_ENGINE = web.AppKey("alert_engine", AlertEngine)


@dataclass(frozen=True, slots=True)
class TaskDied:
    """A background task of the app (the consumer, the alert service) ended with an error."""

    exit_code: int
    task: str
    error: BaseException


class ConsumerFactory(Protocol):
    """Builds the app's consumer; ``Consumer`` itself, or a subclass of it."""

    def __call__(
        self,
        config: ConsumerConfig,
        pool: AsyncConnectionPool,
        writer: BulkWriter,
        receipt_key: ec.EllipticCurvePrivateKey,
        *,
        configure_client: Callable[[mqtt.Client], None] | None = None,
        also: InTransaction | None = None,
    ) -> Consumer: ...


@dataclass
class Lifecycle:
    """How this app was started, and what it must do when a background task dies."""

    on_fatal: Callable[[TaskDied], None] | None = None
    consumer_factory: ConsumerFactory = Consumer
    # Times this worker slot was started again after dying, and how the last one ended
    # (None for a first start).
    restarts: int = 0
    last_exit_code: int | None = None
    fatal: TaskDied | None = None
    stopping: bool = False


LIFECYCLE = web.AppKey("lifecycle", Lifecycle)

# API bodies are small JSON documents; envelopes never come over HTTP.
MAX_BODY_BYTES = 64 * 1024
HEALTH_TIMEOUT_S = 2.0
# A background task (alert sweep and publication, notifications; not the consumer) gets this
# long to end once cancelled; the worker's own stop deadline
# (gateway.serve.WORKER_STOP_DEADLINE_S) is 10 s.
TASK_STOP_S = 3.0


def load_or_create_gateway_key(settings: Settings) -> ec.EllipticCurvePrivateKey:
    path = settings.gateway_key_path
    if path.exists():
        return keys.load_private_key(path)
    key = keys.generate_private_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        keys.save_private_key(key, path)
    except FileExistsError:
        return keys.load_private_key(path)  # another worker created it first
    log.info("created gateway receipt key path=%s", path)
    return key


async def _database(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    url = settings.require_database_url()
    async with db.connection(url, autocommit=True) as conn:
        report = await migrate(conn, settings.storage_mode)
    app[MODE] = report.mode
    app[POOL] = await db.open_pool(url, min_size=1, max_size=4)
    app[INGEST_POOL] = await db.open_pool(url, min_size=2, max_size=2)
    log.info("database ready mode=%s schema=%d", report.mode, report.version)
    yield
    await app[INGEST_POOL].close()
    await app[POOL].close()


async def _identity(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    app[STUDY_CA] = StudyCA.load_or_create(settings.ca_path)
    app[RECEIPT_KEY] = load_or_create_gateway_key(settings)
    yield


async def _consumer(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    config = ConsumerConfig(
        host=settings.mqtt_host,
        port=settings.mqtt_port,
        client_id=f"trialstream-{settings.node}-{app[WORKER]}",
        shared=settings.mqtt_shared and settings.mqtt_v5,
        mqtt5=settings.mqtt_v5,
    )
    writer = BulkWriter(app[INGEST_POOL], app[MODE])
    consumer: BatchConsumer
    if settings.message_source == "amqp":
        # RabbitMQ in front (docs/scaling.md): the uplink quorum queue over AMQP. Imported
        # here: a gateway on MQTT (the default) does not load the AMQP client.
        from gateway.amqp import AmqpConsumer

        consumer = AmqpConsumer(
            config,
            settings.amqp_url_list(),
            app[INGEST_POOL],
            writer,
            app[RECEIPT_KEY],
            shards=settings.amqp_shards,
            also=app[ALERT_ENGINE],
        )
    else:
        tls = None
        if settings.mqtt_tls:
            tls = app[STUDY_CA].issue_files(settings.data_dir / "certs", GATEWAY_IDENTITY)
        consumer = app[LIFECYCLE].consumer_factory(
            config,
            app[INGEST_POOL],
            writer,
            app[RECEIPT_KEY],
            configure_client=configure_tls(tls),
            also=app[ALERT_ENGINE],
        )
    task = asyncio.create_task(consumer.run(), name=f"mqtt-consumer-{app[WORKER]}")
    task.add_done_callback(functools.partial(_task_ended, app))
    app[CONSUMER] = consumer
    app[CONSUMER_TASK] = task
    yield
    # No bound of its own: a batch being committed when the stop came is finished (and
    # acknowledged) rather than left to be delivered again; the worker's deadline still holds.
    await stop_task(task, lifecycle=app[LIFECYCLE], within=None)


async def _alerts(app: web.Application) -> AsyncIterator[None]:
    """Alert sweep (missing data, escalation) and publication of alert events on MQTT."""
    consumer = app[CONSUMER]
    publish: Publisher
    if isinstance(consumer, Consumer):
        publish = MqttPublisher(consumer.publish)
    else:
        from gateway.amqp import AmqpConsumer

        assert isinstance(consumer, AmqpConsumer)
        publish = consumer.publish_confirmed
    service = AlertService(
        app[ALERT_ENGINE], app[POOL], app[SETTINGS].require_database_url(), publish
    )
    task = asyncio.create_task(service.run(), name=f"alerts-{app[WORKER]}")
    task.add_done_callback(functools.partial(_task_ended, app))
    yield
    await stop_task(task, lifecycle=app[LIFECYCLE])


async def _notifier(app: web.Application) -> AsyncIterator[None]:
    """Alert deliveries by e-mail and webhook to whoever is on call (docs/notifications.md)."""
    settings = app[SETTINGS]
    notifier = Notifier(
        app[POOL],
        settings.require_database_url(),
        settings.smtp(),
        f"{settings.gateway_url.rstrip('/')}/monitor",
    )
    task = asyncio.create_task(notifier.run(), name=f"notifier-{app[WORKER]}")
    task.add_done_callback(functools.partial(_task_ended, app))
    yield
    await stop_task(task, lifecycle=app[LIFECYCLE])


def _task_ended(app: web.Application, task: asyncio.Task[None]) -> None:
    """A background task ended: unless the app is stopping, that is fatal to the worker."""
    lifecycle = app[LIFECYCLE]
    if task.cancelled() or lifecycle.stopping:
        return
    error = task.exception() or RuntimeError(f"task {task.get_name()} returned")
    log.error("task stopped task=%s", task.get_name(), exc_info=error)
    if lifecycle.fatal is not None:
        return  # the first death already asked for the stop
    lifecycle.fatal = TaskDied(EXIT_CONSUMER_DIED, task.get_name(), error)
    if lifecycle.on_fatal is not None:
        lifecycle.on_fatal(lifecycle.fatal)


async def stop_task(
    task: asyncio.Task[None], *, lifecycle: Lifecycle, within: float | None = TASK_STOP_S
) -> None:
    """Cancel a background task and wait ``within`` seconds (None: as long as it takes)
    for it to end. One that does not end is left behind with every pending task's awaits
    on record, rather than holding the worker's exit past its stop deadline (and its slot
    empty): what such a task does is transactional, rolled back with its connection when
    the process ends. An error it ended with is raised here, as before it was cancelled."""
    lifecycle.stopping = True
    if task.done():
        return  # its error, if any, was reported when it ended
    task.cancel()
    await asyncio.wait({task}, timeout=within)
    if not task.done():
        pending = io.StringIO()
        dump_tasks(pending)
        log.error(
            "task %s did not end within %g s of being cancelled; left behind\n%s",
            task.get_name(),
            within,
            pending.getvalue(),
        )
        return
    if not task.cancelled():
        task.result()


async def healthz(request: web.Request) -> web.Response:
    app = request.app
    database = False
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT_S), app[POOL].connection() as conn:
            await conn.execute("SELECT 1")
            database = True
    except (TimeoutError, OSError, Exception):  # noqa: BLE001 - any failure means "not reachable"
        database = False
    consumer = app[CONSUMER]
    task = app[CONSUMER_TASK]
    body = {
        "database": database,
        "mqtt": consumer.stats.mqtt_connected,
        "consumer": not task.done(),
        "storage_mode": app[MODE].value,
        "restarts": app[LIFECYCLE].restarts,
        "last_exit_code": app[LIFECYCLE].last_exit_code,
    }
    ok = database and consumer.stats.mqtt_connected and not task.done()
    body["status"] = "ok" if ok else "unavailable"
    return web.json_response(body, status=200 if ok else 503)


def _family(
    name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], int]]
) -> list[str]:
    out = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        text = ",".join(f'{k}="{v}"' for k, v in labels.items())
        out.append(f"{name}{{{text}}} {value}")
    return out


def _histogram(
    name: str, help_text: str, series: list[tuple[dict[str, str], Histogram]]
) -> list[str]:
    out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    for labels, h in series:
        text = ",".join(f'{k}="{v}"' for k, v in labels.items())
        out.extend(f'{name}_bucket{{{text},le="{le}"}} {n}' for le, n in h.cumulative())
        out.append(f"{name}_sum{{{text}}} {h.total:.6f}")
        out.append(f"{name}_count{{{text}}} {h.n}")
    return out


async def _refuse_scrape(request: web.Request) -> web.Response | None:
    """``/metrics`` is for the scraper holding the metrics token, or a signed-in admin: it
    shows the study's volume and the gateway's state to no one else."""
    token = request.app[SETTINGS].metrics_token
    sent = request.headers.get("Authorization", "")
    if token and hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
        return None
    principal = await auth.principal_of(request)
    if principal is not None and principal.role is Role.ADMIN:
        return None
    if principal is None:
        resp = problem(401, "unauthenticated", "send the metrics token, or sign in as an admin")
        resp.headers["WWW-Authenticate"] = 'Bearer realm="trialstream-metrics"'
        return resp
    return problem(403, "forbidden", "only an admin or the metrics scraper reads /metrics")


async def metrics(request: web.Request) -> web.Response:
    refused = await _refuse_scrape(request)
    if refused is not None:
        return refused
    s = request.app[CONSUMER].stats
    w = {"worker": str(request.app[WORKER])}
    gc_stats = gc.get_stats()
    lines = [
        *_family(
            "trialstream_messages_total", "counter", "MQTT messages taken.", [(w, s.messages)]
        ),
        *_family(
            "trialstream_envelopes_total",
            "counter",
            "Envelopes processed, by outcome.",
            [
                ({**w, "outcome": "new"}, s.envelopes_new),
                ({**w, "outcome": "replayed"}, s.envelopes_replayed),
            ],
        ),
        *_family(
            "trialstream_readings_stored_total",
            "counter",
            "Readings committed.",
            [(w, s.readings_stored)],
        ),
        *_family(
            "trialstream_rejected_readings_total",
            "counter",
            "Readings of verified envelopes not stored, by reason.",
            [({**w, "reason": r}, n) for r, n in sorted(s.rejected_readings.items())],
        ),
        *_family(
            "trialstream_rejected_envelopes_total",
            "counter",
            "Envelopes refused whole, by reason.",
            [({**w, "reason": r}, n) for r, n in sorted(s.rejected_envelopes.items())],
        ),
        *_family(
            "trialstream_database_retries_total",
            "counter",
            "Batches retried because the database was unreachable.",
            [(w, s.database_retries)],
        ),
        *_family(
            "trialstream_consent_rechecks_total",
            "counter",
            "Batches judged again because consent changed before they could commit.",
            [(w, s.consent_rechecks)],
        ),
        *_family(
            "trialstream_receipt_publish_failures_total",
            "counter",
            "Receipts the MQTT client refused to queue (the hub will republish).",
            [(w, s.receipt_publish_failures)],
        ),
        *_family("trialstream_batches_total", "counter", "Batches stored.", [(w, s.batches)]),
        *_histogram(
            "trialstream_batch_duration_seconds",
            "Seconds per batch in each phase: judge (decode, verify, consent), store (the"
            " transaction, with retries through an outage), finish (receipts and acks).",
            [({**w, "phase": phase}, h) for phase, h in s.batch_seconds.items()],
        ),
        *_histogram(
            "trialstream_receipt_duration_seconds",
            "Seconds from a message's arrival at the worker to its acknowledgement (and"
            " receipt, where one is sent).",
            [(w, s.receipt_seconds)],
        ),
        *_family(
            "trialstream_worker_restarts_total",
            "counter",
            "Times this worker slot was started again after dying.",
            [(w, request.app[LIFECYCLE].restarts)],
        ),
        *_family(
            "trialstream_mqtt_connected",
            "gauge",
            "1 while connected to the broker.",
            [(w, int(s.mqtt_connected))],
        ),
        *_family(
            "trialstream_gc_collections_total",
            "counter",
            "Runs of the cyclic garbage collector, by generation.",
            [({**w, "generation": str(g)}, st["collections"]) for g, st in enumerate(gc_stats)],
        ),
        *_family(
            "trialstream_gc_frozen_objects",
            "gauge",
            "Objects of the worker's start-up kept out of the collector's sight (gc.freeze).",
            [(w, gc.get_freeze_count())],
        ),
    ]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


def create_app(
    settings: Settings,
    *,
    worker: int = 0,
    on_fatal: Callable[[TaskDied], None] | None = None,
    restarts: int = 0,
    last_exit_code: int | None = None,
    consumer_factory: ConsumerFactory = Consumer,
) -> web.Application:
    """The gateway app for worker slot ``worker``.

    ``on_fatal`` is called once, on the event loop, when the consumer or the alert service
    ends with an error (``TaskDied.exit_code`` is ``EXIT_CONSUMER_DIED``); the caller stops
    the app. Without it the error is only logged. ``restarts`` and ``last_exit_code`` describe
    the slot's earlier lives, for ``/healthz`` and ``/metrics``.
    """
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[problem_middleware])
    app[SETTINGS] = settings
    app[WORKER] = worker
    app[LIFECYCLE] = Lifecycle(
        on_fatal=on_fatal,
        consumer_factory=consumer_factory,
        restarts=restarts,
        last_exit_code=last_exit_code,
    )
    app[ALERT_ENGINE] = AlertEngine()
    app.cleanup_ctx.append(_identity)
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_consumer)
    app.cleanup_ctx.append(_alerts)
    app.cleanup_ctx.append(_notifier)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    hub_routes.add_routes(app)
    setup_web(app)
    app[TRUSTED_PROXIES] = parse_networks(settings.trusted_proxies or "")
    return app
