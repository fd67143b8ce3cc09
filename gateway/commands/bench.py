"""`trialstream bench`: benchmarks with JSON results."""

from __future__ import annotations

import argparse
import json
import sys

from gateway.commands.common import (
    Subparsers,
    add_database_flags,
    float_in,
    int_in,
    run,
    seconds_in,
)
from gateway.errors import ConfigError
from gateway.settings import Settings


def register(sub: Subparsers) -> None:
    bench = sub.add_parser(
        "bench",
        help="benchmarks (JSON results)",
        description="Run a benchmark; every figure is a ratio to a baseline "
        "measured in the same run.",
    )
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    bc = bench_sub.add_parser(
        "capacity",
        help="hosts, cores and storage for a load, from a bench ingest --amqp result",
        description="the cores each part (gateway workers, broker, database) keeps busy and "
        "the hosts that takes at a target utilization, on Mosquitto and on a RabbitMQ "
        "cluster, and the storage a year of readings takes, computed from the CPU per "
        "envelope a `bench ingest --amqp` run measured (its JSON file) and docs/storage.md's "
        "bytes per reading; every figure used is echoed with its source.",
    )
    bc.add_argument("--ingest", required=True, help="the JSON result of bench ingest --amqp")
    bc.add_argument("--participants", type=int_in(1, 10_000_000), default=20_000, help="(20000)")
    bc.add_argument("--studies", type=int_in(1, 100_000), default=50, help="(50)")
    bc.add_argument(
        "--readings-per-s",
        type=float_in(0.001, 1000, "readings/s"),
        default=2.5,
        help="readings per participant per second while worn (2.5: a strap and an oximeter "
        "at 1 Hz and the rest)",
    )
    bc.add_argument(
        "--seal", type=seconds_in(0.1, 3600), default=5.0, help="hub sealing interval (5 s)"
    )
    bc.add_argument(
        "--hours-worn",
        type=float_in(0.1, 24, "hours"),
        default=24.0,
        help="hours a day the wearables stream (24: the upper bound)",
    )
    bc.add_argument("--host-cores", type=int_in(1, 1024), default=2, help="cores per host (2)")
    bc.add_argument(
        "--utilization",
        type=float_in(0.05, 1, "of the cores"),
        default=0.5,
        help="target busy share of a host's cores (0.5)",
    )
    bc.add_argument("--out", help="also write the JSON result to this file")
    bc.set_defaults(handler=_cmd_bench_capacity)
    bs = bench_sub.add_parser(
        "storage",
        help="bulk writer vs per-row INSERT",
        description="rows/s of the bulk writer at batch sizes 100, 1k, 10k "
        "against a naive per-row INSERT baseline; then (plain mode) the hourly rollup "
        "refresh after a batch, merging its deltas against recomputing its hours.",
    )
    add_database_flags(bs)
    bs.add_argument(
        "--rows",
        type=int,
        default=50_000,
        help="readings per measured configuration (default: 50000)",
    )
    bs.add_argument(
        "--hour-readings",
        type=int,
        default=10_000,
        help="readings already in each rolled-up participant-hour (default: 10000)",
    )
    bs.add_argument("--out", help="also write the JSON result to this file")
    bs.set_defaults(handler=_cmd_bench_storage)
    bd = bench_sub.add_parser(
        "drivers",
        help="GATT parsers vs struct.unpack; wearable sessions over the virtual radio",
        description="readings/s of every profile's parser against a bare struct.unpack of "
        "the same bytes, and notifications/s for N virtual wearables at R Hz read by wearable "
        "sessions, against plain bleak subscriptions, with the CPU use of the hub's process "
        "apart from the radio's (wearables and the hub's controller run in a child process, "
        "reached over HCI on TCP loopback); target: the hub under 10% of one core "
        "at 20 wearables x 10 Hz.",
    )
    bd.add_argument(
        "--iterations", type=int, default=20_000, help="payloads parsed per profile (20000)"
    )
    bd.add_argument("--wearables", type=int, default=20, help="virtual wearables (default: 20)")
    bd.add_argument("--rate-hz", type=float, default=10.0, help="notifications/s each (10)")
    bd.add_argument("--seconds", type=float, default=10.0, help="measured window (default: 10)")
    bd.add_argument("--out", help="also write the JSON result to this file")
    bd.set_defaults(handler=_cmd_bench_drivers)
    bi = bench_sub.add_parser(
        "ingest",
        help="the gateway end to end vs the bare path and a naive subscriber",
        description="committed readings/s, publish->receipt latency and gateway memory for "
        "signed envelopes through a private Mosquitto into the gateway processes, against "
        "the bare path (paho -> COPY, no checks) and a naive subscriber (INSERT per reading) "
        "on the same load; needs mosquitto on PATH.",
    )
    add_database_flags(bi)
    bi.add_argument(
        "--seconds", type=float, default=4.0, help="measured window per run (default: 4)"
    )
    bi.add_argument(
        "--slow-seconds",
        type=float,
        help="window with the database slowed, at 10 readings per envelope (default: twice "
        "--seconds; 600 for the 10-minute memory run)",
    )
    bi.add_argument(
        "--sizes",
        default="1,10,100",
        help="readings per envelope, comma-separated (default: 1,10,100)",
    )
    bi.add_argument(
        "--latency-rate",
        type=float,
        metavar="ENVELOPES_PER_S",
        help="publish rate of the latency run, in envelopes/s (default: half the gateway's "
        "peak measured in the same run); a fixed rate compares two builds at the same load",
    )
    bi.add_argument("--workers", type=int, default=2, help="consumer processes (default: 2)")
    bi.add_argument("--hubs", type=int, default=200, help="simulated hubs (default: 200)")
    bi.add_argument(
        "--amqp",
        action="store_true",
        help="also the gateway fed from a private RabbitMQ node over AMQP (the load published "
        "over MQTT 3.1.1 into its uplink quorum queue), as a ratio to the gateway on "
        "Mosquitto in the same run; needs rabbitmq-server",
    )
    bi.add_argument(
        "--amqp-nodes",
        type=int_in(1, 5),
        default=1,
        help="with --amqp: RabbitMQ nodes in the cluster the queue is replicated on (1)",
    )
    bi.add_argument(
        "--amqp-shards",
        type=int_in(1, 16),
        default=1,
        help="with --amqp: quorum queues the uplink is sharded into, behind a consistent-hash"
        " exchange, each led on the least loaded node (1: one queue)",
    )
    bi.add_argument("--out", help="also write the JSON result to this file")
    bi.set_defaults(handler=_cmd_bench_ingest)
    bm = bench_sub.add_parser(
        "memory",
        help="one gateway worker's memory under a flood of the largest envelopes",
        description="resident memory of one gateway worker (idle, peak, steady) while a flood "
        "of the largest envelopes it stores (1000 readings, 170 KB each) arrives far faster "
        "than it stores them, so that its byte budget of unacknowledged messages is what "
        "bounds it; against the same worker at rest and under a flood of ordinary 10-reading "
        "envelopes, each through a private Mosquitto into a fresh gateway, in a scratch "
        "database. Every envelope published must end up stored with all its readings; the "
        "command exits 1 if one is not. Needs mosquitto on PATH; one to two minutes.",
    )
    add_database_flags(bm)
    bm.add_argument(
        "--envelopes",
        type=int,
        default=3_200,
        help="largest envelopes in the flood (default: 3200, eight byte budgets)",
    )
    bm.add_argument(
        "--ordinary-envelopes",
        type=int,
        default=30_000,
        help="10-reading envelopes in the baseline flood (default: 30000)",
    )
    bm.add_argument("--hubs", type=int, default=8, help="simulated hubs (default: 8)")
    bm.add_argument("--out", help="also write the JSON result to this file")
    bm.set_defaults(handler=_cmd_bench_memory)
    be = bench_sub.add_parser(
        "export",
        help="streaming exports (Parquet, FHIR) vs fetchall-then-write",
        description="readings/s and peak memory of the Parquet and FHIR exports of N readings "
        "in a scratch database, against a naive fetchall-then-write baseline.",
    )
    add_database_flags(be)
    be.add_argument("--rows", type=int, default=5_000_000, help="readings (default: 5000000)")
    be.add_argument(
        "--baseline-rows", type=int, default=1_000_000, help="baseline's readings (1000000)"
    )
    be.add_argument("--out", help="also write the JSON result to this file")
    be.set_defaults(handler=_cmd_bench_export)
    ba = bench_sub.add_parser(
        "alerts",
        help="alert latency to a monitor's page; what connected people cost ingest",
        description="publish->SSE latency of alert events (p50/p99) under half the gateway's "
        "measured peak load, and committed readings/s with 0 and with N people on the pages "
        "(alert streams and live-view polling), in a scratch database with a private "
        "Mosquitto; needs mosquitto on PATH.",
    )
    add_database_flags(ba)
    ba.add_argument("--hubs", type=int, default=100, help="load hubs (default: 100)")
    ba.add_argument("--people", type=int, default=200, help="connected people (default: 200)")
    ba.add_argument("--probes", type=int, default=200, help="alert probes per run (200)")
    ba.add_argument(
        "--seconds", type=float, default=6.0, help="work per throughput run (default: 6)"
    )
    ba.add_argument("--out", help="also write the JSON result to this file")
    ba.set_defaults(handler=_cmd_bench_alerts)
    bl = bench_sub.add_parser(
        "login-flood",
        help="ingestion under a flood of wrong-password sign-ins vs no flood",
        description="receipts/s and publish->receipt latency (p50/p99) at a fixed envelope "
        "rate through a private Mosquitto into the gateway processes, in four windows of one "
        "run: no flood, a flood of wrong-password sign-ins (POST /api/v1/session) at "
        "--flood-rate against the gateway's own rate limits (most get 429), the same flood "
        "with every worker's sign-in limits raised so that each attempt costs an argon2 "
        "verify (the worst case: many addresses, many accounts), and no flood again; the two "
        "floodless windows' spread is the noise. Reports the status counts, the hashes that "
        "ran, the CPU of the gateway's processes, and whether the targets were met (throughput "
        "within noise, p99 under 250 ms) in the JSON; the exit status does not depend on "
        "them. Needs mosquitto on PATH; about two minutes with the defaults.",
    )
    add_database_flags(bl)
    bl.add_argument(
        "--rate",
        type=float,
        default=1000.0,
        metavar="ENVELOPES_PER_S",
        help="envelopes published per second in every window (default: 1000)",
    )
    bl.add_argument("--size", type=int, default=10, help="readings per envelope (default: 10)")
    bl.add_argument(
        "--seconds", type=float, default=20.0, help="length of each window (default: 20)"
    )
    bl.add_argument(
        "--flood-rate",
        type=float,
        default=50.0,
        metavar="ATTEMPTS_PER_S",
        help="wrong-password sign-ins sent per second in the flood windows (default: 50)",
    )
    bl.add_argument(
        "--flood-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="the flood client's time limit per attempt (default: 10)",
    )
    bl.add_argument("--workers", type=int, default=2, help="gateway processes (default: 2)")
    bl.add_argument("--hubs", type=int, default=200, help="simulated hubs (default: 200)")
    bl.add_argument(
        "--out",
        default="bench/results/login_flood.json",
        help="also write the JSON result to this file, relative to the project's folder "
        "(default: bench/results/login_flood.json)",
    )
    bl.set_defaults(handler=_cmd_bench_login_flood)
    bh = bench_sub.add_parser(
        "hub",
        help="outbox sealing vs bare CBOR; relay to a local broker vs raw QoS 1 publishing",
        description="envelopes/s sealed and signed by the outbox against cbor2 alone, and "
        "readings/s the relay gets receipted through a private Mosquitto against a bare paho "
        "QoS 1 publisher of the same bytes, at 1, 10 and 100 readings per envelope; needs "
        "mosquitto on PATH.",
    )
    bh.add_argument(
        "--seal-envelopes", type=int, default=2_000, help="envelopes sealed per size (2000)"
    )
    bh.add_argument(
        "--relay-envelopes", type=int, default=1_000, help="envelopes relayed per size (1000)"
    )
    bh.add_argument("--dir", help="where the outbox files go (default: the system temp dir)")
    bh.add_argument("--out", help="also write the JSON result to this file")
    bh.set_defaults(handler=_cmd_bench_hub)
    ba = bench_sub.add_parser(
        "adherence",
        help="adherence kept current during ingestion; the cohort's answer at 1000 x 90 days",
        description="a scratch study of N participants with D days of adherence: the bulk "
        "writer's time per batch with adherence kept (and the refresh that merges it) "
        "against the writer without it, and the cohort's answer (participants x 14 and 92 "
        "days) against a bare read of the same cells; target: under 200 ms at 1000 x 90.",
    )
    add_database_flags(ba)
    ba.add_argument("--participants", type=int, default=1000, help="participants (1000)")
    ba.add_argument("--days", type=int, default=90, help="days of adherence (90)")
    ba.add_argument(
        "--batch-readings", type=int, default=6000, help="readings a batch stores (6000)"
    )
    ba.add_argument("--rounds", type=int, default=5, help="timed rounds per variant (5)")
    ba.add_argument("--queries", type=int, default=30, help="cohort answers timed (30)")
    ba.add_argument("--out", help="also write the JSON result to this file")
    ba.set_defaults(handler=_cmd_bench_adherence)
    bs = bench_sub.add_parser(
        "standby",
        help="what the synchronous standby costs: commit and receipt latency, on vs off",
        description="a PostgreSQL primary and standby under Patroni with etcd on this "
        "machine (needs patroni and etcd-server), the gateway on their multi-host URL: "
        "commit latency of single-row INSERTs and publish->receipt latency at a fixed rate, "
        "with Patroni's synchronous mode on, off and on again; the synchronous runs as "
        "ratios to the asynchronous one.",
    )
    bs.add_argument(
        "--seconds", type=seconds_in(2, 3600), default=20.0, help="latency run per mode (20)"
    )
    bs.add_argument(
        "--rate",
        type=float_in(1, 5000, "envelopes/s"),
        default=200.0,
        help="envelopes/s published (200)",
    )
    bs.add_argument(
        "--commits", type=int_in(10, 100_000), default=1000, help="commits timed (1000)"
    )
    bs.add_argument("--hubs", type=int_in(1, 2000), default=50, help="simulated hubs (50)")
    bs.add_argument("--workers", type=int_in(1, 16), default=2, help="gateway workers (2)")
    bs.add_argument("--out", help="also write the JSON result to this file")
    bs.set_defaults(handler=_cmd_bench_standby)
    bw = bench_sub.add_parser(
        "hub-wearables",
        help="the whole hub with N wearables at R Hz over minutes: CPU, memory, delivery",
        description="the hub as `trialstream-hub run` builds it (sessions, outbox, relay) in "
        "its own process, reading N virtual heart-rate straps at R Hz (radio in a child "
        "process, reached over HCI on TCP loopback) and relaying to a private Mosquitto "
        "whose envelopes this process receipts; sampled every --sample-s for --duration: "
        "CPU % of one core (mean, p95), RSS and its slope, notifications/s and readings/s "
        "delivered against N x R, outbox size; against plain bleak subscriptions to the same "
        "straps in a process of the same shape, run first. Each run streams for --warmup "
        "before its window opens. Targets: under 10% of one core at 20 x 10 Hz; memory "
        "flat over 10 minutes (the RSS slope less the baseline's would not reach the hub "
        "service's MemoryHigh within 30 days). Needs mosquitto on PATH; the defaults take "
        "about 32 minutes.",
    )
    bw.add_argument(
        "--wearables", type=int_in(1, 200), default=20, help="virtual wearables (default: 20)"
    )
    bw.add_argument(
        "--rate-hz",
        type=float_in(0.1, 100, "notifications/s"),
        default=10.0,
        help="notifications/s each (10)",
    )
    bw.add_argument(
        "--duration",
        type=seconds_in(1, 86_400),
        default=600.0,
        help="measured seconds (default: 600)",
    )
    bw.add_argument(
        "--baseline-duration",
        type=seconds_in(1, 86_400),
        help="measured seconds of the baseline (default: --duration, so RSS slopes compare)",
    )
    bw.add_argument(
        "--warmup",
        type=seconds_in(0, 86_400),
        help="seconds each run streams before its window opens, reported apart from the "
        "window (default: 300; why: docs/performance.md)",
    )
    bw.add_argument(
        "--sample-s",
        type=seconds_in(0.1, 600),
        default=5.0,
        help="seconds between samples (default: 5)",
    )
    bw.add_argument("--dir", help="where the hub's files go (default: the system temp dir)")
    bw.add_argument(
        "--out",
        default="bench/results/hub_wearables.json",
        help="also write the JSON result to this file, relative to the project's folder "
        "(default: bench/results/hub_wearables.json)",
    )
    bw.set_defaults(handler=_cmd_bench_hub_wearables)


def _cmd_bench_capacity(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from bench import capacity

    path = Path(args.ingest)
    if not path.is_file():
        raise ConfigError(f"--ingest {args.ingest!r}: no such file")
    load = capacity.Load(
        participants=args.participants,
        studies=args.studies,
        readings_per_participant_per_s=args.readings_per_s,
        seal_s=args.seal,
        hours_worn_per_day=args.hours_worn,
    )
    try:
        result = capacity.run(path, load, host_cores=args.host_cores, utilization=args.utilization)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"--ingest {args.ingest!r}: not a bench ingest --amqp result ({exc})"
        ) from None
    return _emit(result, args.out)


def _cmd_bench_standby(args: argparse.Namespace, settings: Settings) -> int:
    from bench import standby as standby_bench

    result = run(
        standby_bench.run(
            seconds=args.seconds,
            rate=args.rate,
            commits=args.commits,
            hubs=args.hubs,
            workers=args.workers,
            progress=sys.stderr,
        )
    )
    return _emit(result, args.out)


def _cmd_bench_adherence(args: argparse.Namespace, settings: Settings) -> int:
    from bench import adherence as adherence_bench

    for flag, value, low in (
        ("--participants", args.participants, 1),
        ("--days", args.days, 1),
        ("--batch-readings", args.batch_readings, 60),
        ("--rounds", args.rounds, 1),
        ("--queries", args.queries, 1),
    ):
        if value < low:
            raise ConfigError(f"{flag} {value}: must be at least {low}")
    result = run(
        adherence_bench.run(
            settings.require_database_url(),
            participants=args.participants,
            days=args.days,
            batch_readings=args.batch_readings,
            rounds=args.rounds,
            queries=args.queries,
            progress=sys.stderr,
        )
    )
    return _emit(result, args.out)


def _cmd_bench_storage(args: argparse.Namespace, settings: Settings) -> int:
    from bench import storage as storage_bench

    result = run(
        storage_bench.run(
            settings.require_database_url(),
            rows=args.rows,
            hour_readings=args.hour_readings,
            progress=sys.stderr,
        )
    )
    return _emit(result, args.out)


def _cmd_bench_drivers(args: argparse.Namespace, settings: Settings) -> int:
    from bench import drivers as drivers_bench

    result = run(
        drivers_bench.run(
            iterations=args.iterations,
            wearables=args.wearables,
            rate_hz=args.rate_hz,
            seconds=args.seconds,
            progress=sys.stderr,
        )
    )
    return _emit(result, args.out)


def _cmd_bench_export(args: argparse.Namespace, settings: Settings) -> int:
    from bench import export as export_bench

    result = run(
        export_bench.run(
            settings.require_database_url(),
            rows=args.rows,
            baseline_rows=args.baseline_rows,
            progress=sys.stderr,
        )
    )
    return _emit(result, args.out)


def _cmd_bench_ingest(args: argparse.Namespace, settings: Settings) -> int:
    from bench import ingest as ingest_bench

    try:
        sizes = tuple(int(s) for s in args.sizes.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"--sizes {args.sizes!r}: expected numbers like 1,10,100") from None
    if not sizes or any(not 1 <= s <= 1000 for s in sizes):
        raise ConfigError(f"--sizes {args.sizes!r}: each must be 1..1000")
    for flag, value in (
        ("--slow-seconds", args.slow_seconds),
        ("--latency-rate", args.latency_rate),
    ):
        if value is not None and not value > 0:
            raise ConfigError(f"{flag} {value}: must be > 0")
    result = run(
        ingest_bench.run(
            settings.require_database_url(),
            seconds=args.seconds,
            slow_seconds=args.slow_seconds,
            latency_rate=args.latency_rate,
            sizes=sizes,
            workers=args.workers,
            hubs=args.hubs,
            amqp=args.amqp,
            amqp_nodes=args.amqp_nodes,
            amqp_shards=args.amqp_shards,
            progress=sys.stderr,
        )
    )
    return _emit(result, args.out)


def _cmd_bench_memory(args: argparse.Namespace, settings: Settings) -> int:
    from bench import memory as memory_bench

    for name in ("envelopes", "ordinary_envelopes", "hubs"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    result = run(
        memory_bench.run(
            settings.require_database_url(),
            envelopes=args.envelopes,
            ordinary_envelopes=args.ordinary_envelopes,
            hubs=args.hubs,
            progress=sys.stderr,
        )
    )
    status = _emit(result, args.out)
    if not result["summary"]["all_stored"]:
        print("bench memory: not every envelope published was stored", file=sys.stderr)
        return 1
    return status


def _cmd_bench_hub(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from bench import hub as hub_bench

    if args.seal_envelopes < 1 or args.relay_envelopes < 1:
        raise ConfigError("--seal-envelopes and --relay-envelopes must be at least 1")
    result = run(
        hub_bench.run(
            seal_envelopes=args.seal_envelopes,
            relay_envelopes=args.relay_envelopes,
            workdir=Path(args.dir) if args.dir else None,
            progress=sys.stderr,
        )
    )
    return _emit(result, args.out)


def _cmd_bench_hub_wearables(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from bench import hub_wearables as hub_wearables_bench

    out = Path(args.out)
    if not out.is_absolute():
        out = hub_wearables_bench.PROJECT / out
    result = run(
        hub_wearables_bench.run(
            wearables=args.wearables,
            rate_hz=args.rate_hz,
            duration_s=args.duration,
            baseline_duration_s=args.baseline_duration,
            **({} if args.warmup is None else {"warmup_s": args.warmup}),
            sample_s=args.sample_s,
            workdir=Path(args.dir) if args.dir else None,
            progress=sys.stderr,
        )
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    return _emit(result, str(out))


def _cmd_bench_alerts(args: argparse.Namespace, settings: Settings) -> int:
    from bench import alerts as alerts_bench

    for name in ("hubs", "people", "probes"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be at least 1")
    result = run(
        alerts_bench.run(
            settings.require_database_url(),
            hubs=args.hubs,
            clients=args.people,
            probes=args.probes,
            seconds=args.seconds,
            progress=sys.stderr,
        )
    )
    return _emit(result, args.out)


def _cmd_bench_login_flood(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from bench import login_flood as login_flood_bench

    for flag, value in (
        ("--rate", args.rate),
        ("--seconds", args.seconds),
        ("--flood-rate", args.flood_rate),
        ("--flood-timeout", args.flood_timeout),
    ):
        if not value > 0:
            raise ConfigError(f"{flag} {value}: must be > 0")
    if not 1 <= args.size <= 1000:
        raise ConfigError(f"--size {args.size}: must be 1..1000")
    for name in ("workers", "hubs"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be at least 1")
    out = Path(args.out)
    if not out.is_absolute():
        out = login_flood_bench.PROJECT / out
    result = run(
        login_flood_bench.run(
            settings.require_database_url(),
            rate=args.rate,
            size=args.size,
            seconds=args.seconds,
            flood_rate=args.flood_rate,
            flood_timeout_s=args.flood_timeout,
            workers=args.workers,
            hubs=args.hubs,
            progress=sys.stderr,
        )
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    return _emit(result, str(out))


def _emit(result: object, out: str | None) -> int:
    """Print a benchmark's JSON result, and write it to ``out`` when asked."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0
