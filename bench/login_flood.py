"""``trialstream bench login-flood``: ingestion while wrong-password sign-ins flood the
gateway, against the same ingestion with no flood, in one run.

Set-up as ``bench ingest``'s latency run (:mod:`bench.load`, :mod:`bench.gateway_process`):
a scratch database of simulated consented hubs, envelopes sealed before any timing and
published at QoS 1 at a fixed rate by publisher processes into a private Mosquitto (fresh per
window), ``python -m gateway.cli gateway --workers N`` (fresh per window), and a listener
that stamps each receipt's arrival on ``dct/v1/<dev>/down``.

Four windows of ``seconds`` each, at the same envelope rate, one after another:

- ``baseline_1``: no flood;
- ``limited``: the bench process sends ``POST /api/v1/session`` with a wrong password at
  ``flood_rate`` a second (open loop: an attempt is sent when due, whatever the answers
  so far) to the gateway with its own limits (``gateway.web.ratelimit``): most attempts get
  429 before any password is looked at;
- ``unlimited``: the same flood against a gateway whose workers raised their sign-in
  limits so far that none holds (:mod:`bench.gateway_launch`): the worst case, a flood from
  many addresses against many accounts, where every attempt costs an argon2 verify;
- ``baseline_2``: no flood again. The two baselines' spread is the run's noise.

Each attempt names a user that has no account, a name of its own: the gateway then verifies
the password against its dummy hash, with the argon2 parameters of real accounts (the same
cost as a wrong password, ``storage.users``), and never locks an account, so every attempt
that gets past the limits costs a hash. The hashes that ran are counted from the audit trail
(``user.login_failed`` records, cause ``InvalidCredentials``).

Throughput is receipts/s: receipts arriving in the window after its first ``SKIP_S``.
Latency is ``publish()`` -> receipt arrival of every envelope published in the window. CPU is
read at both ends of the window, by part: the gateway's processes (with the argon2 threads
of its workers), the broker, PostgreSQL and the rest (the publishers, the receipt listener
and the flood's client, all in ``other``).

Targets (the issue's): with the flood, throughput within noise (its drop from the baselines'
mean no larger than the baselines' spread) and receipt p99 under 250 ms. They are stated in
the result; nothing here fails on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import aiohttp
from argon2.exceptions import VerificationError

from bench.common import Progress, database_name, machine, scratch_database, server_version
from bench.gateway_process import (
    Cpu,
    Receipts,
    gateway_processes,
    inside_gateway,
    quantile,
    scrape,
)
from bench.load import PUBLISHERS, Publishers, create_trial, reset
from gateway.broker import MosquittoBroker
from gateway.web.ratelimit import LOGIN_PER_ACCOUNT, LOGIN_PER_ADDRESS, Limit
from storage import db
from storage.users import DEFAULT_HASHER, HASH_SLOTS

RATE = 1000.0
SIZE = 10
SECONDS = 20.0
FLOOD_RATE = 50.0
FLOOD_TIMEOUT_S = 10.0
WORKERS = 2
HUBS = 200
TARGET_P99_MS = 250.0
# Receipts arriving in a window's first seconds are not counted in its throughput: the
# gateway's pools and the broker's sessions warm up then.
SKIP_S = 1.5
# The "unlimited" flood's sign-in limits, per address and per account: none ever holds.
UNLIMITED = Limit(burst=1_000_000_000, per_minute=60_000_000_000.0)
WRONG_PASSWORD = "not the password of anyone"
WINDOWS = (
    ("baseline_1", None),
    ("limited", "limited"),
    ("unlimited", "unlimited"),
    ("baseline_2", None),
)
# The project's folder: a relative --out is taken from here.
PROJECT = Path(__file__).resolve().parent.parent

_FAILURES = (
    "SELECT detail->>'cause', count(*) FROM audit_log WHERE action = 'user.login_failed' GROUP BY 1"
)


@dataclass(frozen=True, slots=True)
class _Setup:
    url: str
    publishers: Publishers
    workdir: Path
    rate: float
    seconds: float
    flood_rate: float
    flood_timeout_s: float
    workers: int
    say: Progress


async def _hashes(url: str) -> int:
    """Sign-ins refused after an argon2 verify so far (an unknown name or a wrong password;
    a locked or disabled account is refused without one)."""
    async with db.connection(url) as conn:
        cur = await conn.execute(_FAILURES)
        causes = {str(cause): int(n) for cause, n in await cur.fetchall()}
    return causes.get("InvalidCredentials", 0)


def _ms(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None, "mean": None}
    return {
        "p50": round(quantile(values, 0.5), 1),
        "p99": round(quantile(values, 0.99), 1),
        "max": round(max(values), 1),
        "mean": round(statistics.fmean(values), 1),
    }


async def _flood(
    base: str, tag: str, rate: float, start_at: float, duration: float, timeout_s: float
) -> dict[str, Any]:
    """Wrong-password sign-ins at ``rate`` a second from ``start_at`` for ``duration`` s,
    each a user name of its own; what came back, once every attempt is answered or has
    timed out."""
    statuses: Counter[str] = Counter()
    answer_ms: dict[str, list[float]] = {}
    retry_after: list[int] = []

    async def attempt(http: aiohttp.ClientSession, n: int) -> None:
        body = {"username": f"flood-{tag}-{n}", "password": WRONG_PASSWORD}
        t = time.monotonic()
        try:
            async with http.post(f"{base}/api/v1/session", json=body) as resp:
                await resp.read()
                status = str(resp.status)
                if resp.status == 429:
                    retry_after.append(int(resp.headers.get("Retry-After", "0")))
        except TimeoutError:
            status = "timeout"
        except aiohttp.ClientError as exc:
            status = type(exc).__name__
        statuses[status] += 1
        answer_ms.setdefault(status, []).append((time.monotonic() - t) * 1000)

    # No connection limit: an attempt goes when it is due, not when an earlier one is done.
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    sent = 0
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        tasks: set[asyncio.Task[None]] = set()
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        end = start_at + duration
        while (now := time.monotonic()) < end:
            due = int((now - start_at) * rate) + 1
            while sent < due:
                task = asyncio.create_task(attempt(http, sent))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            await asyncio.sleep(min(1.0 / rate, max(0.0, end - now)))
        sending_s = time.monotonic() - start_at
        await asyncio.gather(*tasks)
    return {
        "attempts": sent,
        "attempts_per_s": round(sent / sending_s, 1) if sending_s > 0 else None,
        "statuses": dict(sorted(statuses.items())),
        "answer_ms": {status: _ms(v) for status, v in sorted(answer_ms.items())},
        "retry_after_s_max": max(retry_after) if retry_after else None,
    }


async def _cpu_over(
    url: str, pid: int, start_at: float, seconds: float, envelopes: float
) -> tuple[dict[str, Any], int]:
    """CPU by part over the window, and the hashes run in it."""
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    cpu = await asyncio.to_thread(Cpu, [pid])
    hashes = await _hashes(url)
    await asyncio.sleep(max(0.0, start_at + seconds - time.monotonic()))
    used = await asyncio.to_thread(cpu.summary, envelopes, cores=True)
    return used, await _hashes(url) - hashes


def _wait_receipts(receipts: Receipts, sent: int, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while len(receipts.by_envelope()) < sent and time.monotonic() < deadline:
        time.sleep(0.2)


async def _window(name: str, flood_kind: str | None, s: _Setup) -> dict[str, Any]:
    await asyncio.to_thread(reset, s.url)
    broker = MosquittoBroker(s.workdir / f"mosquitto-{name}")
    broker.start()
    limit = UNLIMITED if flood_kind == "unlimited" else None
    flood: dict[str, Any] | None = None
    try:
        gateway = gateway_processes(s.url, broker, s.workdir, s.workers, login_limit=limit)
        with gateway as (pid, port):
            receipts = Receipts(broker)
            try:
                hashes_before = await _hashes(s.url)
                start_at = time.monotonic() + 1.0
                publishing = asyncio.create_task(
                    asyncio.to_thread(
                        s.publishers.run,
                        broker.host,
                        broker.port,
                        s.rate,
                        s.seconds,
                        start_at=start_at,
                    )
                )
                measuring = asyncio.create_task(
                    _cpu_over(s.url, pid, start_at, s.seconds, s.rate * s.seconds)
                )
                if flood_kind is not None:
                    flood = await _flood(
                        f"http://127.0.0.1:{port}",
                        name,
                        s.flood_rate,
                        start_at,
                        s.seconds,
                        s.flood_timeout_s,
                    )
                sent, _, published = await publishing
                cpu, hashes_in_window = await measuring
                hashes_all = await _hashes(s.url) - hashes_before
                await asyncio.to_thread(_wait_receipts, receipts, sent, 30.0)
                inside = await asyncio.to_thread(inside_gateway, scrape(port, s.workers))
            finally:
                receipts.close()
    finally:
        broker.kill()
    got = receipts.by_envelope()
    latencies = [(got[k][0] - t) * 1000 for k, t in published.items() if k in got]
    by_second: dict[int, list[float]] = {}
    for k, t in published.items():
        if k in got:
            by_second.setdefault(int(t - start_at), []).append((got[k][0] - t) * 1000)
    skip = min(SKIP_S, s.seconds / 4)
    arrivals = [t for t, _ in got.values() if start_at + skip <= t <= start_at + s.seconds]
    per_second = Counter(int(t - start_at - skip) for t in arrivals)
    whole = range(int(s.seconds - skip))
    out: dict[str, Any] = {
        "envelopes_per_s_offered": s.rate,
        "envelopes_published": sent,
        "receipts": sum(1 for k in published if k in got),
        "receipts_per_s": round(len(arrivals) / (s.seconds - skip), 1),
        # How much the count moves from one second to the next (receipts come per batch).
        "receipts_per_s_stdev_1s": round(statistics.pstdev([per_second[i] for i in whole]), 1)
        if whole
        else None,
        "latency_ms": _ms(latencies),
        # p99 of the envelopes published in each second of the window: when the tail came.
        "latency_p99_ms_by_second": [
            round(quantile(by_second[i], 0.99)) for i in sorted(by_second)
        ],
        "cpu": cpu,
        "inside_gateway": inside,
        "flood": None,
    }
    if flood is not None:
        flood["kind"] = flood_kind
        flood["hashes"] = {
            "in_window": hashes_in_window,
            "per_s_in_window": round(hashes_in_window / s.seconds, 1),
            "until_every_attempt_answered": hashes_all,
        }
        out["flood"] = flood
    return out


def _verdict(windows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    b1, b2 = (windows[k]["receipts_per_s"] for k in ("baseline_1", "baseline_2"))
    baseline = (b1 + b2) / 2
    noise = abs(b1 - b2) / baseline if baseline else None
    p99s = [windows[k]["latency_ms"]["p99"] for k in ("baseline_1", "baseline_2")]
    base_p99 = statistics.fmean(p99s) if None not in p99s else None
    out: dict[str, Any] = {
        "baseline": {
            "receipts_per_s": round(baseline, 1),
            "receipts_per_s_windows": [b1, b2],
            "noise": round(noise, 4) if noise is not None else None,
            "p99_ms": p99s,
            "p99_under_target": all(p is not None and p < TARGET_P99_MS for p in p99s),
        }
    }
    for kind in ("limited", "unlimited"):
        w = windows[kind]
        ratio = w["receipts_per_s"] / baseline if baseline else None
        p99 = w["latency_ms"]["p99"]
        within = ratio is not None and noise is not None and 1 - ratio <= noise
        under = p99 is not None and p99 < TARGET_P99_MS
        out[kind] = {
            "receipts_per_s": w["receipts_per_s"],
            "throughput_ratio": round(ratio, 4) if ratio is not None else None,
            "throughput_within_noise": within,
            "p50_ms": w["latency_ms"]["p50"],
            "p99_ms": p99,
            "p99_ratio": round(p99 / base_p99, 2) if p99 and base_p99 else None,
            "p99_under_target": under,
            "gateway_cores": w["cpu"].get("consumer_cores"),
            "met_targets": within and under,
        }
    return out


def _argon2_verify_ms() -> float:
    """One wrong-password verify with the gateway's hasher, in this process (for scale)."""
    stored = DEFAULT_HASHER.hash("the right password")
    t = time.perf_counter()
    with contextlib.suppress(VerificationError):
        DEFAULT_HASHER.verify(stored, WRONG_PASSWORD)
    return round((time.perf_counter() - t) * 1000, 1)


async def run(
    server_url: str,
    *,
    rate: float = RATE,
    size: int = SIZE,
    seconds: float = SECONDS,
    flood_rate: float = FLOOD_RATE,
    flood_timeout_s: float = FLOOD_TIMEOUT_S,
    workers: int = WORKERS,
    hubs: int = HUBS,
    progress: TextIO | None = None,
) -> dict[str, Any]:
    say = Progress(progress)
    verify_ms = _argon2_verify_ms()
    windows: dict[str, dict[str, Any]] = {}
    async with scratch_database(server_url, "trialstream_bench_login_flood") as url:
        version = await server_version(url)
        t0_ms = int((time.time() - 86_400) * 1000)
        simulated = await create_trial(url, hubs, t0_ms - 86_400_000, 3 * 86_400_000)
        say(f"scratch database {database_name(url)}: {hubs} hubs, participants consented")
        count = int(rate * (seconds + 1)) + hubs
        say(f"sealing {count:,} envelopes of {size} readings in {PUBLISHERS} processes")
        publishers = await asyncio.to_thread(Publishers, simulated, size, count, t0_ms)
        try:
            with tempfile.TemporaryDirectory(prefix="trialstream-bench-login-flood-") as tmp:
                setup = _Setup(
                    url,
                    publishers,
                    Path(tmp),
                    rate,
                    seconds,
                    flood_rate,
                    flood_timeout_s,
                    workers,
                    say,
                )
                for name, kind in WINDOWS:
                    flood = f"{kind} flood at {flood_rate:g}/s" if kind else "no flood"
                    say(f"{name}: {rate:g} envelopes/s for {seconds:g} s, {flood}")
                    w = windows[name] = await _window(name, kind, setup)
                    say(_describe(name, w))
        finally:
            publishers.close()
    summary = _verdict(windows)
    for kind in ("limited", "unlimited"):
        v = summary[kind]
        say(
            f"{kind}: throughput x{v['throughput_ratio']} of the baselines (noise "
            f"{summary['baseline']['noise']}), p99 {v['p99_ms']} ms: "
            f"{'met' if v['met_targets'] else 'NOT met'}"
        )
    return {
        "benchmark": "login-flood",
        "machine": machine(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "postgresql": version,
        "method": {
            "window_s": seconds,
            "throughput_skip_s": min(SKIP_S, seconds / 4),
            "envelopes_per_s": rate,
            "readings_per_envelope": size,
            "hubs": hubs,
            "publisher_processes": PUBLISHERS,
            "gateway_workers": workers,
            "windows": [name for name, _ in WINDOWS],
            "broker": "private Mosquitto, plain loopback, fresh per window",
            "gateway": "python -m gateway.cli gateway --workers N, fresh per window",
            "throughput": "receipts arriving in the window after its first seconds, per s",
            "latency": "publish() -> receipt arrival, every envelope of the window (and its p99"
            " per second of publishing)",
            "flood": f"POST /api/v1/session with a wrong password at {flood_rate:g}/s from"
            " the bench process (open loop, one connection per attempt in flight), each a"
            f" user name without an account; client timeout {flood_timeout_s:g} s",
            "hashes": "audit records user.login_failed, cause InvalidCredentials",
            "cpu": "by part over the window: consumer = the gateway's processes; other ="
            " publishers, receipt listener, flood client and the rest of the machine",
        },
        "argon2": {
            "time_cost": DEFAULT_HASHER.time_cost,
            "memory_cost_kib": DEFAULT_HASHER.memory_cost,
            "parallelism": DEFAULT_HASHER.parallelism,
            "hash_slots_per_worker": HASH_SLOTS,
            "verify_ms_in_bench_process": verify_ms,
        },
        "limits": {
            "limited": {
                "login_per_address": _limit(LOGIN_PER_ADDRESS),
                "login_per_account": _limit(LOGIN_PER_ACCOUNT),
                "per": "worker process",
            },
            "unlimited": {
                "login_per_address": _limit(UNLIMITED),
                "login_per_account": _limit(UNLIMITED),
                "per": "worker process",
            },
        },
        "targets": {
            "p99_ms_under": TARGET_P99_MS,
            "throughput": "within noise: 1 - receipts/s with the flood / the baselines' mean"
            " <= |baseline_1 - baseline_2| / their mean",
        },
        "windows": windows,
        "summary": summary,
        "met_targets": {kind: summary[kind]["met_targets"] for kind in ("limited", "unlimited")},
    }


def _limit(limit: Limit) -> dict[str, float]:
    return {"burst": limit.burst, "per_minute": limit.per_minute}


def _describe(name: str, w: dict[str, Any]) -> str:
    line = (
        f"{name}: {w['receipts_per_s']:,.0f} receipts/s, p50 {w['latency_ms']['p50']} ms,"
        f" p99 {w['latency_ms']['p99']} ms, gateway {w['cpu'].get('consumer_cores')} cores"
    )
    flood = w["flood"]
    if flood is not None:
        line += (
            f"; flood {flood['attempts']} attempts {flood['statuses']},"
            f" {flood['hashes']['in_window']} hashes in the window"
        )
    return line
