"""The whole cluster on one machine (gateway.harness): three RabbitMQ nodes, two gateway hosts
consuming over AMQP, a Patroni-managed primary with its synchronous standby, and three hubs
relaying over MQTT 3.1.1, each starting at a different broker node. While the hubs stream,
the drill kills (-9) the RabbitMQ node leading the uplink queue, a gateway host, and the
PostgreSQL primary. Afterwards every reading each hub made is stored exactly once (counted
here with the test's own queries as well as the harness's verdict), every envelope
receipted, nothing refused, and the hubs that were on the lost node went on elsewhere."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

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
