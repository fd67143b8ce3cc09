"""``trialstream bench hub-wearables``: the whole hub, N wearables at R Hz, over minutes.

The issue's target: a hub serving 20 wearables at 10 Hz uses under 10 % of one core, and its
memory stays flat over 10 minutes. ``bench drivers`` measures the sessions alone for 10 s
into an in-memory sink, ``bench hub`` the outbox and relay alone at full speed; this one
runs the hub as ``trialstream-hub run --simulate`` builds it (``open_hub``: one session
per wearable, the outbox, the relay, the status file and the certificate keeper) for the
whole ``--duration``, and watches its process.

Method. Three kinds of process, so that each one's CPU time and memory are its own:

- the radio: a :class:`~device_drivers.sim.RadioProcess` (spawned) with the virtual radio,
  N heart-rate straps notifying at R Hz with their bumble stacks, and the controller of the
  hub (a real hub's dongle);
- the hub: ``python -m bench.hub_wearables_child hub ...``, a child whose hub is built by
  ``open_hub`` from an identity made for the run (key, a certificate of a study CA made for
  the run, the receipt key of the run's gateway key), with a bumble host that talks HCI to
  its controller in the radio process over TCP on loopback
  (:meth:`~device_drivers.sim.SimAdapter.connect_hci`), relaying to a local Mosquitto over
  plain loopback with the shipped relay settings (seal at 100 readings or 5 s, 0.2 s tick);
- this process: the broker, and :class:`bench.hub.Receipter` answering every envelope
  with a signed receipt as the gateway does (wrapped here to count the readings in the
  envelopes it receipts).

The child prints one line of counters every ``--sample-s`` seconds (notifications and
readings of its sessions, relay and outbox figures); at each line this process reads the
child's user + system CPU time and its RSS (psutil), and the CPU time of the radio and the
broker for context. Counting starts once every wearable streams and the first receipt is
back, so connecting and GATT discovery are left out; the window opens ``--warmup`` seconds
later (both runs), so the allocators' first minutes (their caches filling, pages first
touched: docs/performance.md) are reported apart from it. The child imports only the hub's
side (the benchmark's server-side pieces are imported in this process's functions), so its
RSS is a hub's; its own reporting (an outbox count every few seconds) is in its figures.

Baseline, in the same run, of the same shape: a fresh radio process with the same straps
and a child of the same module reading them through the same bumble host over HCI, with a
plain ``BleakClient`` subscription per strap whose callback only counts; no sessions, no
outbox, no relay. Why this one: the hub's work is proportional to the notifications, so
the floor it is compared with must carry them too. An idle hub with no wearables costs
almost nothing (a ratio to nearly zero says nothing), and the simulated wearables alone do
not notify while nobody subscribes. The ratio is then what the hub's own code (queueing,
decoding, stamping, SQLite writes, sealing and signing, MQTT, the status file) costs over
just receiving the same notifications on this host stack, and the baseline's RSS slope is
what the host stack and Python do by themselves over the same time. On a real hub BlueZ
and bleak's D-Bus backend replace bumble's host, whose costs differ.

Figures per run: CPU % of one core (mean over the window, p95 of the sampling intervals),
RSS at the window's start and end and its least-squares slope in MiB/h (whole window, and
its second half), notifications/s against N x R, readings/s made, sealed (left the outbox)
and receipted, the outbox
(pending readings, envelopes awaiting receipt, bytes on disk), and the warm-up's own RSS rise
and CPU. The baseline runs first, for ``--baseline-duration`` (default: as long as the hub's
run, so the slopes compare).

Memory is called flat when the hub's RSS slope over the window, less the baseline's, would
not carry it from where it ends to its systemd unit's ``MemoryHigh`` (read from
deploy/systemd/trialstream-hub.service) within ``MEMORY_BUDGET_DAYS``: a rate that a month
of running could not turn into a problem even if it never slowed. ``memory_flat_strictly``
says whether it is no steeper than the baseline's at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

from cryptography.hazmat.primitives import serialization

from bench.hub_wearables_child import BASELINE, HUB, SAMPLE_S
from device_drivers.identity import HubIdentity, make_csr
from device_drivers.sim import RadioProcess, VirtualHeartRateStrap
from ingest import keys
from ingest.envelope import open_envelope

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt
    import psutil  # type: ignore[import-untyped]
    from cryptography.hazmat.primitives.asymmetric import ec

    from bench.common import Progress
    from bench.hub import Receipter
    from gateway.broker import MosquittoBroker

PROJECT: Final = Path(__file__).resolve().parent.parent
WEARABLES: Final = 20
RATE_HZ: Final = 10.0
DURATION_S: Final = 600.0
# The target: under 10 % of one core at 20 wearables x 10 Hz (as ``bench drivers``).
TARGET_HUB_CPU_PCT: Final = 10.0
# Share of the expected notifications (and of the readings sealed, delivered) that counts as
# keeping up over a window: the straps' ticks and the window's edges do not line up, and an
# envelope may still await its receipt at the end.
KEEP_UP_SHARE: Final = 0.98
# 20 wearables connect and discover their services one after another over HCI; on a busy
# 2-core machine that takes tens of seconds. Past this the run fails instead of hanging.
READY_WITHIN_S: Final = 180.0
# A child that closes its stdin side and does not exit within this is killed.
STOP_WITHIN_S: Final = 30.0
DEVICE_ID: Final = "hub-bench-wearables"
MIB: Final = 2**20
# Before the window opens, both runs stream this long: a process's allocators fill their
# caches and first touch their pages over its first minutes (measured: docs/performance.md),
# which is not what "flat" asks about.
WARMUP_S: Final = 300.0
# Memory is flat when the hub's RSS slope over the window, less the baseline's, would not
# carry it from where it ends to its service's MemoryHigh within this many days.
MEMORY_BUDGET_DAYS: Final = 30
HUB_UNIT: Final = PROJECT / "deploy" / "systemd" / "trialstream-hub.service"

# ---------------------------------------------------------------------------------------
# The benchmark's own process: broker, receipts, radio, children, figures.


class DeliveredReadings:
    """Counts the readings in the envelopes a :class:`~bench.hub.Receipter` answers, each
    envelope (device, seq) once, by wrapping its client's message callback."""

    def __init__(self, receipter: Receipter) -> None:
        self.readings = 0
        self.envelopes = 0
        self._seen: set[tuple[str, int]] = set()
        self._inner = receipter.client.on_message
        receipter.client.on_message = self._on_message

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if self._inner is not None:
            self._inner(client, userdata, msg)
        payload = open_envelope(bytes(msg.payload)).payload
        if (payload.dev, payload.seq) not in self._seen:
            self._seen.add((payload.dev, payload.seq))
            self.envelopes += 1
            self.readings += len(payload.readings)


def make_hub_identity(
    directory: Path, broker: MosquittoBroker, gateway_key: ec.EllipticCurvePrivateKey
) -> HubIdentity:
    """What enrolling would leave in ``directory``: the hub's key, its certificate from a
    study CA made for the run, the gateway's receipt key and ``hub.json`` naming the broker
    (plain loopback, no TLS). The gateway URL is never reached: the certificate keeper asks
    only after repeated connection failures, or at renewal time (weeks away)."""
    from gateway.pki import StudyCA

    ca = StudyCA.load_or_create(directory.parent / "study-ca")
    directory.mkdir(parents=True)
    key = keys.generate_private_key()
    keys.save_private_key(key, directory / "hub.key")
    cert = ca.sign_csr(make_csr(key), DEVICE_ID)
    (directory / "hub.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "receipt.pem").write_bytes(keys.public_key_to_pem(gateway_key.public_key()))
    record = {
        "device_id": DEVICE_ID,
        "participant_id": "BENCH-P-001",
        "study_id": "BENCH",
        "broker": {"host": broker.host, "port": broker.port, "tls": False},
        "topics": {},
        "gateway_url": "http://127.0.0.1:9",
    }
    (directory / "hub.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return HubIdentity.load(directory)


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading of the child: its counters and, at the moment its line arrived, its
    CPU time and RSS, the context processes' CPU time and the readings receipted."""

    t: float
    cpu_s: float
    rss_bytes: int
    context_cpu_s: dict[str, float]
    delivered_readings: int
    report: dict[str, Any]
    # The part of the RSS in file-backed and shared pages (libraries' code paged in as it
    # first runs); the rest is the process's own anonymous memory.
    rss_file_bytes: int = 0

    @property
    def rss_anon_mib(self) -> float:
        """The process's own (anonymous) part of its RSS, in MiB."""
        return (self.rss_bytes - self.rss_file_bytes) / MIB


class Child:
    """``python -m bench.hub_wearables_child MODE ...`` with its stdout read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path, sample_s: float) -> None:
        import psutil

        self.proc = proc
        self.process = psutil.Process(proc.pid)
        self._log = log
        self._sample_s = sample_s

    @classmethod
    async def start(cls, args: Sequence[str], log: Path, sample_s: float) -> Child:
        with log.open("ab") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.hub_wearables_child",
                *args,
                "--sample-s",
                repr(sample_s),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                cwd=PROJECT,
            )
        return cls(proc, log, sample_s)

    def failed(self, what: str) -> RuntimeError:
        with contextlib.suppress(OSError):
            tail = self._log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
            return RuntimeError(f"{what}; its log {self._log} ends:\n" + "\n".join(tail))
        return RuntimeError(what)

    async def report(self) -> dict[str, Any]:
        """The child's next line of counters."""
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(3 * self._sample_s + 30):
                line = await self.proc.stdout.readline()
        except TimeoutError:
            raise self.failed(f"child {self.proc.pid} sent no counters for a while") from None
        if not line:
            code = await self.proc.wait()
            raise self.failed(f"child {self.proc.pid} exited (code {code})")
        report: dict[str, Any] = json.loads(line)
        return report

    async def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            async with asyncio.timeout(STOP_WITHIN_S):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


def _cpu_s(process: psutil.Process | None) -> float:
    from bench.common import cpu_seconds

    return cpu_seconds([process]) if process is not None else 0.0


def _straps(count: int, rate_hz: float) -> list[Callable[[], VirtualHeartRateStrap]]:
    return [
        functools.partial(VirtualHeartRateStrap, f"TS-HRM-{i:04d}", seed=i, rate_hz=rate_hz)
        for i in range(count)
    ]


@dataclass(frozen=True, slots=True)
class Setup:
    """What both runs share."""

    work: Path
    wearables: int
    rate_hz: float
    sample_s: float
    broker_process: psutil.Process | None
    delivered: DeliveredReadings | None
    hub_dir: Path


def _ready(mode: str, report: dict[str, Any], wearables: int) -> bool:
    streaming = int(report["streaming"]) == wearables
    return streaming and (mode == BASELINE or int(report["receipts_accepted"]) > 0)


async def _sample(
    child: Child, setup: Setup, radio: psutil.Process, t0: float | None = None
) -> Sample:
    report = await child.report()
    now = time.monotonic()
    with child.process.oneshot():
        cpu = _cpu_s(child.process)
        memory = child.process.memory_info()
    return Sample(
        now if t0 is None else now - t0,
        cpu,
        int(memory.rss),
        {"radio": _cpu_s(radio), "broker": _cpu_s(setup.broker_process)},
        setup.delivered.readings if setup.delivered is not None else 0,
        report,
        rss_file_bytes=int(getattr(memory, "shared", 0)),
    )


async def measured_run(
    mode: str, warmup_s: float, duration_s: float, setup: Setup, say: Progress
) -> list[Sample]:
    """A fresh radio and one child of ``mode``; its samples from the moment it is ready,
    over ``warmup_s`` and then ``duration_s`` (times from that moment)."""
    import psutil

    from gateway.broker import free_port

    async with RadioProcess(_straps(setup.wearables, setup.rate_hz), hci_port=free_port()) as radio:
        args = [mode, "--hci", radio.hci_spec, "--addresses", ",".join(radio.addresses)]
        if mode == HUB:
            args += ["--hub-dir", str(setup.hub_dir)]
        child = await Child.start(args, setup.work / f"{mode}.log", setup.sample_s)
        say(
            f"{mode}: radio process {radio.pid} ({setup.wearables} straps at "
            f"{setup.rate_hz:g} Hz), child {child.proc.pid}; waiting for every wearable"
        )
        radio_process = psutil.Process(radio.pid)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + READY_WITHIN_S
            report = await child.report()
            while not _ready(mode, report, setup.wearables):
                if loop.time() > deadline:
                    raise child.failed(f"{mode}: not ready within {READY_WITHIN_S:.0f} s: {report}")
                report = await child.report()
            first = await _sample(child, setup, radio_process)
            samples = [dataclasses.replace(first, t=0.0)]
            say(
                f"{mode}: all {setup.wearables} streaming; warming up {warmup_s:g} s, then "
                f"measuring {duration_s:g} s"
            )
            every = max(1, round(60.0 / setup.sample_s))
            while samples[-1].t < warmup_s + duration_s - setup.sample_s / 2:
                samples.append(await _sample(child, setup, radio_process, first.t))
                if len(samples) % every == 0:
                    say(f"{mode}: {_progress_line(samples)}")
            say(f"{mode}: done, {_progress_line(samples)}")
        finally:
            await child.stop()
    return samples


def split_warmup(samples: Sequence[Sample], warmup_s: float) -> tuple[list[Sample], list[Sample]]:
    """The warm-up's samples (from the moment of readiness to the window's first sample,
    both included) and the window's, whose times start at 0 again."""
    start = next((i for i, x in enumerate(samples) if x.t >= warmup_s - 1e-9), len(samples) - 1)
    t0 = samples[start].t
    window = [dataclasses.replace(x, t=x.t - t0) for x in samples[start:]]
    return list(samples[: start + 1]), window


def summarize_warmup(samples: Sequence[Sample]) -> dict[str, Any]:
    """What the warm-up left out of the window: its length, the RSS at readiness and how
    much it rose (the anonymous part too), the CPU it took, and the RSS minute by minute."""
    a, b = samples[0], samples[-1]
    span = b.t - a.t
    return {
        "seconds": round(span, 1),
        "rss_mib_at_ready": round(a.rss_bytes / MIB, 2),
        "rss_mib_rise": round((b.rss_bytes - a.rss_bytes) / MIB, 2),
        "rss_anon_mib_rise": round(b.rss_anon_mib - a.rss_anon_mib, 2),
        "cpu_pct_of_one_core_mean": round(100 * (b.cpu_s - a.cpu_s) / span, 2) if span else None,
        "timeline_s_rss_mib": [
            [round(x.t, 1), round(x.rss_bytes / MIB, 2)]
            for i, x in enumerate(samples)
            if i == 0 or x is b or int(x.t // 60) > int(samples[i - 1].t // 60)
        ],
    }


def _progress_line(samples: Sequence[Sample]) -> str:
    a, b = samples[0], samples[-1]
    span = b.t - a.t
    cpu = 100 * (b.cpu_s - a.cpu_s) / span if span > 0 else 0.0
    rate = (b.report["notifications"] - a.report["notifications"]) / span if span > 0 else 0.0
    line = (
        f"{b.t:.0f} s, {cpu:.1f} % of one core, RSS {b.rss_bytes / MIB:.1f} MiB, "
        f"{rate:.1f} notifications/s"
    )
    if "pending_readings" in b.report:
        line += (
            f", outbox {b.report['pending_readings']} pending readings / "
            f"{b.report['unreceipted_envelopes']} envelopes awaiting receipt"
        )
    return line


def _slope_per_hour(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB) points, in MiB per hour."""
    if len(points) < 2:
        return None
    mean_t = statistics.fmean(t for t, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    cov = sum((t - mean_t) * (y - mean_y) for t, y in points)
    return round(3600 * cov / var, 3)


def _p95(values: Sequence[float]) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return float(statistics.quantiles(values, n=20, method="inclusive")[-1])


def summarize(
    mode: str, samples: Sequence[Sample], wearables: int, rate_hz: float
) -> dict[str, Any]:
    """The figures of one run from its samples (see the module's docstring)."""
    a, b = samples[0], samples[-1]
    window = b.t - a.t
    # Sample times strictly increase: each is a line the child printed sample_s apart.
    intervals = [100 * (y.cpu_s - x.cpu_s) / (y.t - x.t) for x, y in itertools.pairwise(samples)]
    rss = [(s.t, s.rss_bytes / MIB) for s in samples]
    half = [p for p in rss if p[0] >= window / 2]
    anon = [(s.t, s.rss_anon_mib) for s in samples]
    expected = wearables * rate_hz

    def per_s(key: str) -> float:
        return round(float(b.report[key] - a.report[key]) / window, 2)

    result: dict[str, Any] = {
        "window_seconds": round(window, 1),
        "samples": len(samples),
        "cpu_pct_of_one_core_mean": round(100 * (b.cpu_s - a.cpu_s) / window, 2),
        "cpu_pct_of_one_core_p95": round(_p95(intervals), 2),
        "cpu_pct_of_one_core_max": round(max(intervals, default=0.0), 2),
        "rss_mib_start": round(a.rss_bytes / MIB, 2),
        "rss_mib_end": round(b.rss_bytes / MIB, 2),
        "rss_mib_max": round(max(s.rss_bytes for s in samples) / MIB, 2),
        "rss_slope_mib_per_hour": _slope_per_hour(rss),
        "rss_slope_second_half_mib_per_hour": _slope_per_hour(half),
        # The same for the anonymous part alone: what the process allocated, without the
        # libraries' pages that are read in as their code first runs.
        "rss_anon_mib_start": round(anon[0][1], 2),
        "rss_anon_mib_end": round(anon[-1][1], 2),
        "rss_anon_slope_mib_per_hour": _slope_per_hour(anon),
        "rss_anon_slope_second_half_mib_per_hour": _slope_per_hour(
            [p for p in anon if p[0] >= window / 2]
        ),
        # glibc's allocator settings the children ran with (their thread caches, for one,
        # fill over the first minutes): results taken under different ones do not compare.
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "expected_notifications_per_s": expected,
        "notifications_per_s": per_s("notifications"),
        "context_cpu_pct_of_one_core_mean": {
            name: round(100 * (b.context_cpu_s[name] - a.context_cpu_s[name]) / window, 2)
            for name in a.context_cpu_s
        },
    }
    if mode == HUB:
        made = b.report["readings"] - a.report["readings"]
        # Readings wait in the outbox up to the relay's sealing age (5 s): those made but
        # still pending at the window's end are not late, so the share that says whether
        # the hub keeps up is of the readings that left the outbox (sealed) in the window.
        sealed = made - (b.report["pending_readings"] - a.report["pending_readings"])
        delivered = b.delivered_readings - a.delivered_readings
        result |= {
            "readings_made_per_s": per_s("readings"),
            "readings_sealed_per_s": round(sealed / window, 2),
            "readings_delivered_per_s": round(delivered / window, 2),
            "delivered_share_of_made": round(delivered / made, 4) if made > 0 else None,
            "delivered_share_of_sealed": round(delivered / sealed, 4) if sealed > 0 else None,
            "envelopes_sent_per_s": per_s("envelopes_sent"),
            "envelopes_resent": b.report["envelopes_resent"] - a.report["envelopes_resent"],
            "receipts_rejected": b.report["receipts_rejected"] - a.report["receipts_rejected"],
            "malformed": b.report["malformed"] - a.report["malformed"],
            "dropped": b.report["dropped"] - a.report["dropped"],
            "gaps": b.report["gaps"] - a.report["gaps"],
            "outbox": {
                "pending_readings_start": a.report["pending_readings"],
                "pending_readings_end": b.report["pending_readings"],
                "pending_readings_max": max(s.report["pending_readings"] for s in samples),
                "unreceipted_envelopes_end": b.report["unreceipted_envelopes"],
                "unreceipted_envelopes_max": max(
                    s.report["unreceipted_envelopes"] for s in samples
                ),
                "bytes_on_disk_start": a.report["outbox_bytes_on_disk"],
                "bytes_on_disk_end": b.report["outbox_bytes_on_disk"],
            },
        }
    result["timeline_s_cpu_pct_rss_mib_notifications"] = [
        [round(y.t, 1), round(c, 2), round(y.rss_bytes / MIB, 2), y.report["notifications"]]
        for y, c in zip(samples[1:], intervals, strict=False)
    ]
    return result


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _minus(a: float | None, b: float | None) -> float | None:
    return round(a - b, 3) if a is not None and b is not None else None


def memory_high_mib(unit: Path = HUB_UNIT) -> float | None:
    """The hub service's ``MemoryHigh=`` (systemd's K, M or G suffixes), in MiB; None when
    the unit sets none."""
    factors = {"K": 1 / 1024, "M": 1.0, "G": 1024.0}
    for line in unit.read_text(encoding="utf-8").splitlines():
        key, _, value = line.strip().partition("=")
        if key == "MemoryHigh" and value[-1:] in factors and value[:-1].isdigit():
            return int(value[:-1]) * factors[value[-1]]
    return None


def memory_budget(rss_end_mib: float, high_mib: float | None) -> float | None:
    """The steepest RSS slope, in MiB/h, that would not take the hub from ``rss_end_mib``
    to ``high_mib`` within ``MEMORY_BUDGET_DAYS``."""
    if high_mib is None:
        return None
    return round(max(0.0, high_mib - rss_end_mib) / (24 * MEMORY_BUDGET_DAYS), 3)


def compare(
    hub: dict[str, Any], baseline: dict[str, Any], high_mib: float | None = None
) -> dict[str, Any]:
    """The hub's figures against the baseline's, and the issue's targets."""
    expected = hub["expected_notifications_per_s"]
    share = hub["delivered_share_of_sealed"]
    keeps_up = (
        hub["notifications_per_s"] >= KEEP_UP_SHARE * expected
        and share is not None
        and share >= KEEP_UP_SHARE
        and hub["dropped"] == 0
        and hub["malformed"] == 0
    )
    hub_slope, baseline_slope = hub["rss_slope_mib_per_hour"], baseline["rss_slope_mib_per_hour"]
    cpu = hub["cpu_pct_of_one_core_mean"]
    added = _minus(hub_slope, baseline_slope)
    budget = memory_budget(hub["rss_mib_end"], high_mib)
    return {
        "cpu_mean_ratio_to_baseline": _ratio(cpu, baseline["cpu_pct_of_one_core_mean"]),
        "cpu_p95_ratio_to_baseline": _ratio(
            hub["cpu_pct_of_one_core_p95"], baseline["cpu_pct_of_one_core_p95"]
        ),
        "cpu_pct_added_over_baseline": round(cpu - baseline["cpu_pct_of_one_core_mean"], 2),
        "rss_end_ratio_to_baseline": _ratio(hub["rss_mib_end"], baseline["rss_mib_end"]),
        "rss_slope_minus_baseline_mib_per_hour": added,
        "rss_anon_slope_minus_baseline_mib_per_hour": _minus(
            hub["rss_anon_slope_mib_per_hour"], baseline["rss_anon_slope_mib_per_hour"]
        ),
        "keeps_up": keeps_up,
        "target": (
            f"keeps up (>= {KEEP_UP_SHARE:.0%} of the expected notifications, of the readings "
            f"sealed delivered) on < {TARGET_HUB_CPU_PCT:g} % of one core (mean); memory flat: "
            "after the warm-up, the RSS slope less the baseline's would not reach the hub "
            f"service's MemoryHigh within {MEMORY_BUDGET_DAYS} days"
        ),
        "cpu_target_met": keeps_up and cpu < TARGET_HUB_CPU_PCT,
        "memory_high_mib": high_mib,
        "memory_budget_mib_per_hour": budget,
        "memory_flat": added is not None and budget is not None and added <= budget,
        "memory_flat_strictly": added is not None and added <= 0,
    }


async def run(
    *,
    wearables: int = WEARABLES,
    rate_hz: float = RATE_HZ,
    duration_s: float = DURATION_S,
    baseline_duration_s: float | None = None,
    warmup_s: float = WARMUP_S,
    sample_s: float = SAMPLE_S,
    workdir: Path | None = None,
    progress: TextIO | None = None,
) -> dict[str, Any]:
    import psutil

    from bench.common import Progress, machine
    from bench.hub import Receipter
    from gateway.broker import MosquittoBroker

    say = Progress(progress)
    baseline_s = duration_s if baseline_duration_s is None else baseline_duration_s
    gateway_key = keys.generate_private_key()
    with tempfile.TemporaryDirectory(prefix="trialstream-bench-hub-wearables-", dir=workdir) as d:
        work = Path(d)
        broker = MosquittoBroker(work / "mosquitto")
        await asyncio.to_thread(broker.start)
        try:
            hub_dir = work / "hub"
            await asyncio.to_thread(make_hub_identity, hub_dir, broker, gateway_key)
            broker_process = None
            with contextlib.suppress(OSError, ValueError, psutil.Error):
                broker_process = psutil.Process(int(broker.pid_path.read_text().strip()))
            say(f"broker on {broker.host}:{broker.port}; hub {DEVICE_ID} in {hub_dir}")
            setup = Setup(work, wearables, rate_hz, sample_s, broker_process, None, hub_dir)
            baseline_warmup, baseline_window = split_warmup(
                await measured_run(BASELINE, warmup_s, baseline_s, setup, say), warmup_s
            )
            baseline = summarize(BASELINE, baseline_window, wearables, rate_hz)
            baseline["warmup"] = summarize_warmup(baseline_warmup)
            receipter = await asyncio.to_thread(Receipter, broker, gateway_key)
            try:
                delivered = DeliveredReadings(receipter)
                hub_setup = Setup(
                    work, wearables, rate_hz, sample_s, broker_process, delivered, hub_dir
                )
                hub_warmup, hub_window = split_warmup(
                    await measured_run(HUB, warmup_s, duration_s, hub_setup, say), warmup_s
                )
                hub = summarize(HUB, hub_window, wearables, rate_hz)
                hub["warmup"] = summarize_warmup(hub_warmup)
            finally:
                await asyncio.to_thread(receipter.close)
        finally:
            await asyncio.to_thread(broker.stop)
    comparison = compare(hub, baseline, memory_high_mib())
    say(
        f"hub {hub['cpu_pct_of_one_core_mean']:.1f} % of one core (p95 "
        f"{hub['cpu_pct_of_one_core_p95']:.1f}), baseline "
        f"{baseline['cpu_pct_of_one_core_mean']:.1f} %; RSS slope hub "
        f"{hub['rss_slope_mib_per_hour']} MiB/h, baseline "
        f"{baseline['rss_slope_mib_per_hour']} MiB/h (anonymous part: "
        f"{hub['rss_anon_slope_mib_per_hour']} and {baseline['rss_anon_slope_mib_per_hour']}); "
        f"keeps up: {comparison['keeps_up']}; memory flat (within "
        f"{comparison['memory_budget_mib_per_hour']} MiB/h): {comparison['memory_flat']}"
    )
    return {
        "benchmark": "hub-wearables",
        "machine": machine(),
        "wearables": wearables,
        "rate_hz": rate_hz,
        "duration_seconds": duration_s,
        "baseline_duration_seconds": baseline_s,
        "warmup_seconds": warmup_s,
        "sample_seconds": sample_s,
        "method": (
            "open_hub (sessions, outbox, relay, status file, certificate keeper) in a child "
            "process whose bumble host talks HCI over TCP loopback to a controller in a "
            "separate radio process with the straps; relaying to a private Mosquitto, "
            "receipted in the benchmark's process; the child's user+system CPU time and RSS "
            "read with psutil at every line of counters it prints; window from --warmup "
            "seconds after every wearable streams and the first receipt is back"
        ),
        "baseline": {
            "method": (
                "same radio and child shape: plain BleakClient subscriptions on the same host "
                "stack, a callback that only counts; no sessions, outbox or relay"
            ),
            **baseline,
        },
        "hub": hub,
        **comparison,
    }
