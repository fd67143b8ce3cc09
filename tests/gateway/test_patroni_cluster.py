"""A PostgreSQL primary and its synchronous standby under Patroni with etcd
(gateway.patroni.PatroniCluster): the multi-host connection string finds the writable node;
every commit acknowledged before the primary is killed (-9, Patroni and PostgreSQL together)
is on the standby that Patroni promotes, and the same connection string then writes there.
A gateway on that connection string, with a hub streaming through it, rides through the
failover with its own retries: every reading stored once and receipted."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psycopg
import pytest

from gateway.broker import MosquittoBroker
from gateway.patroni import PatroniCluster
from tests.fixtures.gateway import gateway_settings, running_gateway
from tests.fixtures.trial import Trial
from tests.fixtures.waiting import wait_until
from tests.test_hub_faults import running_hub, stored

pytestmark = pytest.mark.slow


def test_commits_survive_the_primary_killed_and_writes_go_on_at_the_standby(
    patroni: PatroniCluster,
) -> None:
    cluster = patroni
    assert sorted(cluster.members().values()) == ["leader", "sync_standby"]
    first = cluster.primary()
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        row = conn.execute("SHOW synchronous_standby_names").fetchone()
        assert row is not None
        assert row[0] != "", "commits would not wait for the standby"
        conn.execute("CREATE TABLE acknowledged (n int PRIMARY KEY)")
        for n in range(200):
            conn.execute("INSERT INTO acknowledged VALUES (%s)", (n,))
        port = conn.execute("SELECT inet_server_port()").fetchone()
    assert port == (first.pg_port,)

    first.kill()
    second = cluster.wait_for_primary(first)
    assert second is not first
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT inet_server_port()").fetchone() == (second.pg_port,)
        assert conn.execute("SELECT count(*), max(n) FROM acknowledged").fetchone() == (200, 199)
        conn.execute("INSERT INTO acknowledged VALUES (200)")


async def test_a_gateway_rides_through_the_primary_killed_while_a_hub_streams(
    patroni: PatroniCluster, trial_on_patroni: Trial, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """Nothing is receipted before both nodes have it, so nothing receipted is lost: every
    reading the hub made is stored once, on the promoted standby, and receipted."""
    cluster, trial = patroni, trial_on_patroni
    url = trial.url
    settings = gateway_settings(url, mosquitto, tmp_path / "gateway")
    (tmp_path / "hub").mkdir()
    async with (
        running_gateway(settings) as gw,
        running_hub(trial, mosquitto, gw, tmp_path / "hub", time.time) as hub,
    ):
        await hub.produce(20)
        await wait_until(hub.drained, "the first readings receipted")
        primary = cluster.primary()
        for step in range(40):  # ten readings every 0.1 s, the primary killed early on
            await hub.produce(10)
            if step == 5:
                await asyncio.to_thread(primary.kill)
            await asyncio.sleep(0.1)
        await asyncio.to_thread(cluster.wait_for_primary, primary)
        await wait_until(hub.drained, "every reading receipted after the failover", within=120)
        next_seq = hub.outbox.stats().next_seq
    result = await stored(url)
    assert result.readings == hub.produced == 420
    assert result.envelopes == (next_seq - 1, 1, next_seq - 1, hub.produced)
    assert result.rejections == 0
    assert hub.relay.stats.receipts_rejected == 0
