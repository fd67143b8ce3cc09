"""The gateway as the benchmarks run it, and what they read of it: its processes
(``python -m gateway.cli gateway --workers N`` against a scratch database and a private
broker, optionally with its sign-in limits raised), the receipts it sends, the CPU time and
memory its processes use, and its own ``/metrics``."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import cbor2
import psutil  # type: ignore[import-untyped]

from bench.common import METRICS_HEADERS, METRICS_TOKEN, recorded_mode
from bench.load import Publishers
from bench.mqtt_raw import RawClient, RawMqttError
from gateway.broker import MosquittoBroker, free_port
from gateway.web.ratelimit import Limit

# The parts of the machine whose CPU time a drain window and the latency run report.
_CPU_PARTS = ("consumer", "broker", "database", "other")


def process_tree(root: psutil.Process) -> list[psutil.Process]:
    return [root, *root.children(recursive=True)]


def _cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


class Cpu:
    """CPU time spent over a window, by part: the consumer's processes (given by their
    roots, with their children), the broker (any ``mosquitto``, or the trees of
    ``broker_roots``: a private RabbitMQ node), the database server, and the rest of the
    machine; and how busy the machine's cores were.

    Processes are read at both ends of the window; one born inside it counts from zero, one
    that died inside it is missed (none do: consumers, broker and database backends live
    through the window)."""

    def __init__(self, consumer_roots: Sequence[int], broker_roots: Sequence[int] = ()) -> None:
        self._roots = list(consumer_roots)
        self._broker_roots = list(broker_roots)
        self._start = self._snapshot()
        self._machine0 = psutil.cpu_times()
        self._t0 = time.monotonic()

    @staticmethod
    def _trees(roots: Sequence[int]) -> set[int]:
        pids: set[int] = set()
        for pid in roots:
            with contextlib.suppress(psutil.NoSuchProcess):
                pids.update(p.pid for p in process_tree(psutil.Process(pid)))
        return pids

    def _snapshot(self) -> dict[int, tuple[str, float]]:
        consumers = self._trees(self._roots)
        brokers = self._trees(self._broker_roots)
        out: dict[int, tuple[str, float]] = {}
        for proc in psutil.process_iter(["name"]):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                name = proc.info["name"] or ""
                if proc.pid in consumers:
                    part = "consumer"
                elif name == "mosquitto" or proc.pid in brokers:
                    part = "broker"
                elif name == "postgres":
                    part = "database"
                else:
                    part = "other"
                out[proc.pid] = (part, _cpu_seconds(proc))
        return out

    def summary(self, envelopes: float, *, cores: bool = False) -> dict[str, Any]:
        """CPU microseconds per envelope committed in the window, by part; cores busy; and
        with ``cores``, the cores each part kept busy on average (CPU s per s)."""
        end = self._snapshot()
        elapsed = time.monotonic() - self._t0
        m1 = psutil.cpu_times()
        idle = (m1.idle + getattr(m1, "iowait", 0.0)) - (
            self._machine0.idle + getattr(self._machine0, "iowait", 0.0)
        )
        by_part: dict[str, float] = dict.fromkeys(_CPU_PARTS, 0.0)
        for pid, (part, seconds) in end.items():
            before = self._start.get(pid)
            by_part[part] += seconds - (before[1] if before and before[0] == part else 0.0)
        per = 1e6 / envelopes if envelopes > 0 else 0.0
        out: dict[str, Any] = {
            f"{part}_us_per_envelope": round(by_part[part] * per, 1) for part in _CPU_PARTS
        }
        out["total_us_per_envelope"] = round(sum(by_part.values()) * per, 1)
        out["cores_busy"] = round(psutil.cpu_count() - idle / elapsed, 2) if elapsed else None
        if cores and elapsed:
            out.update({f"{part}_cores": round(by_part[part] / elapsed, 3) for part in _CPU_PARTS})
        return out


class Memory:
    """Samples the resident set of a process tree in a thread."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self._root = psutil.Process(pid)
        self._interval = interval_s
        self.samples: list[tuple[float, int, int]] = []  # (time, total, largest worker)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                procs = process_tree(self._root)
                rss = []
                for p in procs:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        rss.append(p.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            self.samples.append((time.monotonic(), sum(rss), max(rss[1:], default=0)))

    def __enter__(self) -> Memory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self, start: float, end: float) -> dict[str, Any]:
        inside = [s for s in self.samples if start <= s[0] <= end]
        if not inside:
            return {}
        third = max(1, len(inside) // 3)
        mib = 1024 * 1024
        return {
            "peak_total_mib": round(max(s[1] for s in inside) / mib, 1),
            "peak_worker_mib": round(max(s[2] for s in inside) / mib, 1),
            "first_third_peak_total_mib": round(max(s[1] for s in inside[:third]) / mib, 1),
            "last_third_peak_total_mib": round(max(s[1] for s in inside[-third:]) / mib, 1),
        }


@contextlib.contextmanager
def gateway_processes(
    url: str,
    broker: MosquittoBroker | None,
    workdir: Path,
    workers: int,
    *,
    login_limit: Limit | None = None,
    amqp_url: str | None = None,
    amqp_shards: int = 1,
) -> Iterator[tuple[int, int]]:
    """The gateway's processes: (supervisor pid, HTTP port) once every worker is connected.
    They run in the storage mode recorded in the database of ``url``, fed from ``broker``
    over MQTT, or with ``amqp_url`` from RabbitMQ's uplink queue (``amqp_shards`` of them)
    over AMQP.

    ``login_limit``: every worker's sign-in limits (per address and per account) set to it
    (through :mod:`bench.gateway_launch`); None leaves the gateway's own."""
    http_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIALSTREAM_")}
    if broker is not None:
        env.update(
            {"TRIALSTREAM_MQTT_HOST": broker.host, "TRIALSTREAM_MQTT_PORT": str(broker.port)}
        )
    if amqp_url is not None:
        env.update(
            {
                "TRIALSTREAM_MESSAGE_SOURCE": "amqp",
                "TRIALSTREAM_AMQP_URLS": amqp_url,
                "TRIALSTREAM_AMQP_SHARDS": str(amqp_shards),
            }
        )
    env.update(
        {
            "TRIALSTREAM_DATABASE_URL": url,
            "TRIALSTREAM_DATA_DIR": str(workdir / "gateway"),
            "TRIALSTREAM_HTTP_PORT": str(http_port),
            "TRIALSTREAM_STORAGE_MODE": str(recorded_mode(url)),
            "TRIALSTREAM_LOG_LEVEL": "WARNING",
            "TRIALSTREAM_METRICS_TOKEN": METRICS_TOKEN,
        }
    )
    log = (workdir / "gateway.log").open("ab")
    command = [sys.executable, "-m", "gateway.cli"]
    if login_limit is not None:
        command = [
            sys.executable,
            "-m",
            "bench.gateway_launch",
            str(login_limit.burst),
            repr(login_limit.per_minute),
        ]
    proc = subprocess.Popen(
        [*command, "gateway", "--workers", str(workers)],
        env=env,
        stdout=log,
        stderr=log,
    )
    try:
        _wait_workers(proc, http_port, workers)
        yield proc.pid, http_port
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def scrape(http_port: int, workers: int) -> dict[str, str]:
    """The /metrics text of each worker, by worker label (each scrape lands on one)."""
    texts: dict[str, str] = {}
    deadline = time.monotonic() + 30
    while len(texts) < workers and time.monotonic() < deadline:
        scrape = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/metrics", headers=METRICS_HEADERS
        )
        with urllib.request.urlopen(scrape, timeout=5) as resp:
            text = resp.read().decode()
        for line in text.splitlines():
            if line.startswith("trialstream_messages_total{"):
                texts[line.split('"')[1]] = text
    return texts


def inside_gateway(texts: Mapping[str, str]) -> dict[str, Any]:
    """What the workers' own histograms say of the same run: where a receipt's time went
    between the message's arrival at a worker and its receipt (bucket bounds, so a
    quantile reads "at most"), mean seconds per batch phase, and messages per batch."""
    receipt: Counter[float] = Counter()
    sums: dict[str, float] = {}
    counts: Counter[str] = Counter()
    messages = batches = failures = 0
    for text in texts.values():
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            if name.startswith("trialstream_receipt_duration_seconds_bucket{"):
                le = name.split('le="')[1].rstrip('"}')
                receipt[math.inf if le == "+Inf" else float(le)] += int(value)
            elif name.startswith("trialstream_batch_duration_seconds_sum{"):
                phase = name.split('phase="')[1].split('"')[0]
                sums[phase] = sums.get(phase, 0.0) + float(value)
            elif name.startswith("trialstream_batch_duration_seconds_count{"):
                counts[name.split('phase="')[1].split('"')[0]] += int(value)
            elif name.startswith("trialstream_messages_total{"):
                messages += int(value)
            elif name.startswith("trialstream_batches_total{"):
                batches += int(value)
            elif name.startswith("trialstream_receipt_publish_failures_total{"):
                failures += int(value)
    total = receipt[math.inf]

    def at_most_ms(q: float) -> float | None:
        for bound in sorted(receipt):
            if total and receipt[bound] >= q * total:
                return None if bound == math.inf else bound * 1000
        return None

    return {
        "receipt_ms_at_most": {"p50": at_most_ms(0.5), "p99": at_most_ms(0.99)},
        "batch_phase_mean_ms": {
            phase: round(sums[phase] / counts[phase] * 1000, 1) for phase in counts if counts[phase]
        },
        "messages_per_batch": round(messages / batches, 1) if batches else None,
        "messages": messages,
        "receipt_publish_failures": failures,
    }


def _wait_workers(proc: subprocess.Popen[bytes], http_port: int, workers: int) -> None:
    """Until every worker reports an MQTT connection on /metrics (each scrape lands on one)."""
    seen: set[str] = set()
    deadline = time.monotonic() + 60
    while len(seen) < workers:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError("the gateway workers did not connect within 60 s")
        try:
            scrape = urllib.request.Request(
                f"http://127.0.0.1:{http_port}/metrics", headers=METRICS_HEADERS
            )
            with urllib.request.urlopen(scrape, timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            time.sleep(0.1)
            continue
        for line in text.splitlines():
            if line.startswith("trialstream_mqtt_connected{") and line.endswith(" 1"):
                seen.add(line.split('"')[1])
        time.sleep(0.05)


class Receipts:
    """Subscribes to every device's downlink and stamps each receipt's arrival (a thread of
    its own on a :mod:`bench.mqtt_raw` connection)."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.arrivals: list[tuple[float, bytes]] = []
        self._error: Exception | None = None
        self._client = RawClient(broker.host, broker.port, f"bench-receipts-{os.getpid()}")
        # QoS 1: a QoS 0 subscriber may be dropped messages by a busy broker, which would
        # read as receipts the gateway never sent.
        try:
            self._client.subscribe("dct/v1/+/down")
        except BaseException:
            self._client.close()
            raise
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="bench-receipts", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        try:
            while not self._stop.is_set():
                _, got = self._client.poll(0.1)
                if got:
                    t = time.monotonic()
                    self.arrivals.extend((t, payload) for _, payload in got)
                self._client.ping_if_idle()
        except (RawMqttError, OSError) as exc:
            self._error = exc

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._client.close()
        if self._error is not None:
            raise RuntimeError(f"receipt listener failed: {self._error}") from self._error

    def by_envelope(self) -> dict[tuple[str, int], tuple[float, int]]:
        out: dict[tuple[str, int], tuple[float, int]] = {}
        for t, data in self.arrivals:
            # [receipt, COSE Receipt] (docs/protocol.md section 5); the signature is the
            # hubs' business, the benchmark only needs which envelope each one answers.
            body = cbor2.loads(cbor2.loads(data)[0])
            key = (str(body["dev"]), int(body["seq"]))
            if key not in out:
                out[key] = (t, int(body["stored"]))
        return out


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def receipt_latency(
    url: str,
    broker: MosquittoBroker,
    workdir: Path,
    workers: int,
    pubs: Publishers,
    rate: float,
    seconds: float,
) -> dict[str, Any]:
    """The gateway's processes on ``broker`` while ``pubs`` publish at ``rate`` envelopes/s
    for ``seconds``: how many were sent and receipted, publish -> receipt latency, the
    gateway's memory, CPU per envelope (the publishers and the receipt listener count as
    "other") and what its own histograms say."""
    with gateway_processes(url, broker, workdir, workers) as (pid, port), Memory(pid) as mem:
        receipts = Receipts(broker)
        try:
            m0 = time.monotonic()
            cpu = Cpu([pid])
            sent, _, published = pubs.run(broker.host, broker.port, rate, seconds)
            cpu_used = cpu.summary(sent)
            deadline = time.monotonic() + 30
            while len(receipts.by_envelope()) < sent and time.monotonic() < deadline:
                time.sleep(0.2)
            memory = mem.summary(m0, time.monotonic())
            inside = inside_gateway(scrape(port, workers))
        finally:
            receipts.close()
    got = receipts.by_envelope()
    latencies = [
        (got[k][0] - t) * 1000 for k, t in published.items() if k in got and got[k][0] >= t
    ]
    return {
        "envelopes": sent,
        "receipts": sum(1 for k in published if k in got),
        "latency_ms": {
            "p50": round(quantile(latencies, 0.5), 1) if latencies else None,
            "p99": round(quantile(latencies, 0.99), 1) if latencies else None,
            "max": round(max(latencies), 1) if latencies else None,
            "mean": round(statistics.fmean(latencies), 1) if latencies else None,
        },
        "memory": memory,
        "cpu": cpu_used,
        "inside_gateway": inside,
    }
