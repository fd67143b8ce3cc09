"""The whole cluster on one machine (gateway.harness): three RabbitMQ nodes, two gateway hosts
consuming over AMQP, a Patroni-managed primary with its synchronous standby, and three hubs
relaying over MQTT 3.1.1, each starting at a different broker node. While the hubs stream,
the drill kills (-9) the RabbitMQ node leading the uplink queue, a gateway host, and the
PostgreSQL primary. Afterwards every reading each hub made is stored exactly once (counted
here with the test's own queries as well as the harness's verdict), every envelope
receipted, nothing refused, and the hubs that were on the lost node went on elsewhere."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import psycopg
import pytest

from gateway.errors import BrokerError
from gateway.harness import Harness, HarnessError, drill, running_hubs
from gateway.patroni import ClusterError

pytestmark = pytest.mark.slow

HUBS = 3


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(tmp_path / "cluster")
    try:
        await asyncio.to_thread(h.start)
    except (HarnessError, BrokerError, ClusterError) as exc:
        pytest.fail(f"the cluster harness could not start: {exc}")
    try:
        yield h
    finally:
        await asyncio.to_thread(h.stop)


async def test_a_broker_node_a_gateway_host_and_the_primary_killed_lose_and_double_nothing(
    harness: Harness,
) -> None:
    lines: list[str] = []
    first_leader = harness.uplink_leader_index()
    async with running_hubs(harness, HUBS) as hubs:
        starts = [hub.relay.broker for hub in hubs]
        report = await drill(harness, hubs, lines.append)
    assert [f["fault"] for f in report.faults] == [
        "rabbitmq-uplink-leader",
        "gateway-host",
        "postgresql-primary",
    ], lines
    assert report.drained_after_s is not None, lines
    lost = harness.rabbit.nodes[first_leader]
    assert lost not in harness.rabbit.running()
    assert sum(h.alive() for h in harness.hosts) == len(harness.hosts) - 1
    for start, verdict in zip(starts, report.hubs, strict=True):
        assert verdict.ok, (verdict, lines)
        assert verdict.produced > 300
        if start[1] == lost.mqtt_port:
            assert verdict.broker != f"127.0.0.1:{lost.mqtt_port}", verdict
    assert any(start[1] == lost.mqtt_port for start in starts), "no hub was on the lost node"
    assert report.ok

    # The same, counted without the harness: each reading once, each envelope once.
    with psycopg.connect(harness.database_url) as conn:
        for verdict in report.hubs:
            row = conn.execute(
                "SELECT count(*), count(DISTINCT (seq, time)) FROM readings WHERE device_id = %s",
                (verdict.device_id,),
            ).fetchone()
            assert row == (verdict.produced, verdict.produced)
            row = conn.execute(
                "SELECT count(*), min(seq), max(seq) FROM envelopes WHERE device_id = %s",
                (verdict.device_id,),
            ).fetchone()
            assert row == (verdict.sealed, 1, verdict.sealed)
        assert conn.execute("SELECT count(*) FROM rejections").fetchone() == (0,)


def test_cluster_up_streams_reports_and_stops_everything_it_started(tmp_path: Path) -> None:
    """`trialstream cluster up`, as anyone would run it: the cluster's description, status
    lines while its hubs stream, and at the end no process of it left running."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIALSTREAM_")}
    command = ["cluster", "up", "--hubs", "2", "--duration", "6", "--every", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", *command, "--workdir", str(tmp_path / "up")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    described = json.loads(out[out.index("{\n") : out.index("\n}\n") + 2])
    assert len(described["rabbitmq"]) == 3
    assert len(described["gateway_hosts"]) == 2
    assert all(h["running"] for h in described["gateway_hosts"])
    status = [line for line in out.splitlines() if " produced " in line]
    assert len(status) >= 2, out[-2000:]
    assert "hubs connected 2/2" in status[-1]
    assert "rejections 0" in status[-1]
    assert "stopping every process the cluster started" in out
    pids = [n["pid"] for n in described["rabbitmq"]] + [
        h["pid"] for h in described["gateway_hosts"]
    ]
    assert not [p for p in pids if psutil.pid_exists(p)], "processes left running"
