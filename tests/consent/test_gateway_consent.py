"""Consent governs every reading, through the real gateway: envelopes published to Mosquitto,
verified, gated by consent read fresh for each batch, stored or refused with the reason."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from consent import records
from consent.records import Initiator
from gateway.broker import MosquittoBroker
from ingest.envelope import seal
from ingest.model import AcceptedEnvelope, Batch, Payload, Reading, Receipt
from ingest.pipeline import up_topic
from ingest.receipts import RECEIPT_ACCEPTED, open_receipt
from storage import db
from storage.timeconv import to_ms
from tests.consent.conftest import ADMIN, CHEAP_HASHER, COORDINATOR, PASSWORD, Accounts
from tests.fixtures import signers
from tests.fixtures.gateway import RunningGateway
from tests.fixtures.mqtt import MqttProbe
from tests.fixtures.trial import ALL_SCOPES, Hub, Trial
from tests.fixtures.waiting import wait_until

MIN = 60_000


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
async def probe(mosquitto: MosquittoBroker, gateway: RunningGateway) -> AsyncIterator[MqttProbe]:
    p = MqttProbe(mosquitto, "consent-probe")
    p.subscribe("dct/v1/+/down")
    yield p
    p.close()


async def send(
    probe: MqttProbe,
    gateway: RunningGateway,
    hub: Hub,
    seq: int,
    readings: Sequence[tuple[int, str]],
) -> Receipt:
    units = {"heart_rate": "/min", "glucose": "mg/dL", "spo2": "%"}
    values = {"heart_rate": 70.0, "glucose": 100.0, "spo2": 97.0}
    payload = Payload(
        dev=hub.device_id,
        seq=seq,
        sent_ms=now_ms(),
        readings=tuple(Reading(t, m, values[m], units[m], "sensor") for t, m in readings),
    )
    probe.publish(up_topic(hub.device_id), seal(payload, hub.key))
    _, data = await probe.next()
    r = open_receipt(data, gateway.receipt_public_key)
    assert (r.dev, r.seq, r.status) == (hub.device_id, seq, RECEIPT_ACCEPTED)
    return r


async def rows(url: str, query: str, *params: object) -> list[tuple[Any, ...]]:
    async with db.connection(url) as conn:
        cur = await conn.execute(query.encode(), params)
        return list(await cur.fetchall())


async def rejections(url: str, device: str) -> list[tuple[Any, ...]]:
    return await rows(
        url,
        "SELECT reason, metric, sum(reading_count)::int FROM rejections WHERE device_id = %s"
        " GROUP BY 1, 2 ORDER BY 1, 2",
        device,
    )


async def withdraw(trial: Trial, **kw: object) -> records.Withdrawal:
    async with db.connection(trial.url, autocommit=True) as conn:
        return await signers.withdraw(
            conn, COORDINATOR, participant_id="P2", initiated_by=Initiator.SITE, **kw
        )


async def test_before_during_after_withdrawal_and_declined_scope(
    trial: Trial, gateway: RunningGateway, probe: MqttProbe
) -> None:
    now = datetime.now(UTC)
    hub = await trial.add_participant(
        "P2", "hub-2", scopes=ALL_SCOPES - {"glucose"}, consent_at=now - timedelta(hours=1)
    )
    t = to_ms(now)
    r = await send(
        probe,
        gateway,
        hub,
        1,
        [(t - 90 * MIN, "heart_rate"), (t - 30 * MIN, "heart_rate"), (t - 30 * MIN, "glucose")],
    )
    assert (r.stored, r.refused) == (1, 2)

    w = await withdraw(trial, reason="participant asked by phone")
    after = to_ms(w.effective_at) + 1
    late = t - 20 * MIN  # measured while consented, arriving after the withdrawal
    r = await send(probe, gateway, hub, 2, [(after, "heart_rate"), (late, "heart_rate")])
    assert (r.stored, r.refused) == (1, 1)

    assert await rejections(trial.url, "hub-2") == [
        ("no_consent", "heart_rate", 2),
        ("scope_not_consented", "glucose", 1),
    ]
    stored = await rows(
        trial.url, "SELECT time, consent_id IS NOT NULL FROM readings ORDER BY time"
    )
    assert [(to_ms(s[0]), s[1]) for s in stored] == [
        (t - 30 * MIN, True),
        (late, True),
    ]


async def test_partial_withdrawal_stops_one_scope(
    trial: Trial, gateway: RunningGateway, probe: MqttProbe
) -> None:
    hub = await trial.add_participant("P2", "hub-2")
    w = await withdraw(trial, scopes={"spo2"})
    t = to_ms(w.effective_at) + 1
    r = await send(probe, gateway, hub, 1, [(t, "spo2"), (t, "heart_rate")])
    assert (r.stored, r.refused) == (1, 1)
    assert await rejections(trial.url, "hub-2") == [("scope_not_consented", "spo2", 1)]


async def test_delete_policy_deletes_held_data_and_refuses_late_arrivals(
    trial: Trial, gateway: RunningGateway, probe: MqttProbe
) -> None:
    async with db.connection(trial.url, autocommit=True) as conn:
        await conn.execute("UPDATE studies SET withdrawal_policy = 'delete'")
    hub = await trial.add_participant("P2", "hub-2")
    t = now_ms()
    r = await send(probe, gateway, hub, 1, [(t - 30 * MIN, "heart_rate")] * 3)
    assert r.stored == 3
    originals = "SELECT count(*) FROM envelope_originals WHERE device_id = 'hub-2'"
    assert await rows(trial.url, originals) == [(1,)]
    w = await withdraw(trial)
    assert w.readings_deleted == 3
    # The signed original held those readings' values: it goes with them.
    assert await rows(trial.url, originals) == [(0,)]
    r = await send(probe, gateway, hub, 2, [(t - 20 * MIN, "heart_rate")])
    assert (r.stored, r.refused) == (0, 1)
    assert await rows(trial.url, "SELECT count(*) FROM readings") == [(0,)]
    assert await rows(
        trial.url,
        "SELECT readings_deleted FROM withdrawal_deletions WHERE consent_id = %s",
        w.consent_id,
    ) == [(3,)]


async def _delete_policy_with_held_data(trial: Trial, probe: MqttProbe, gw: RunningGateway) -> Hub:
    async with db.connection(trial.url, autocommit=True) as conn:
        await conn.execute("UPDATE studies SET withdrawal_policy = 'delete'")
    hub = await trial.add_participant("P2", "hub-2")
    r = await send(probe, gw, hub, 1, [(now_ms() - 30 * MIN, "heart_rate")] * 2)
    assert r.stored == 2
    return hub


async def test_delete_withdrawal_between_judging_and_committing_a_batch(
    trial: Trial, gateway: RunningGateway, probe: MqttProbe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch's consent is read, then a delete-policy withdrawal commits, then the batch
    writes: it must be judged again (its readings refused), not stored after the deletion."""
    hub = await _delete_policy_with_held_data(trial, probe, gateway)
    consumer = gateway.consumer
    real_write = consumer._writer.write
    withdrawals: list[records.Withdrawal] = []

    async def withdraw_first(batch: Batch, **kw: Any) -> Any:
        if not withdrawals and any(e.dev == "hub-2" for e in batch.accepted):
            withdrawals.append(await withdraw(trial))
        return await real_write(batch, **kw)

    monkeypatch.setattr(consumer._writer, "write", withdraw_first)
    r = await send(probe, gateway, hub, 2, [(now_ms() - 20 * MIN, "heart_rate")] * 3)

    assert withdrawals[0].readings_deleted == 2
    assert (r.stored, r.refused) == (0, 3)
    assert consumer.stats.consent_rechecks == 1
    assert await rows(trial.url, "SELECT count(*) FROM readings WHERE device_id = 'hub-2'") == [
        (0,)
    ]
    assert await rejections(trial.url, "hub-2") == [("no_consent", "heart_rate", 3)]


async def test_delete_withdrawal_waits_for_a_batch_being_committed(
    trial: Trial, gateway: RunningGateway, probe: MqttProbe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A withdrawal started while a batch's transaction is open waits for its COMMIT, and
    then deletes that batch's readings with the rest."""
    hub = await _delete_policy_with_held_data(trial, probe, gateway)
    consumer = gateway.consumer
    real_write = consumer._writer.write
    pending: list[asyncio.Task[records.Withdrawal]] = []

    async def withdraw_during(batch: Batch, **kw: Any) -> Any:
        also = kw.pop("also", None)

        async def start_withdrawal(conn: db.Conn, fresh: Sequence[AcceptedEnvelope]) -> None:
            if also is not None:
                await also(conn, fresh)
            if not pending and any(e.dev == "hub-2" for e in fresh):
                pending.append(asyncio.create_task(withdraw(trial)))
                await asyncio.sleep(0.5)  # long enough for the withdrawal to block on the lock
                assert not pending[0].done(), "the withdrawal did not wait for the batch"

        return await real_write(batch, also=start_withdrawal, **kw)

    monkeypatch.setattr(consumer._writer, "write", withdraw_during)
    r = await send(probe, gateway, hub, 2, [(now_ms() - 20 * MIN, "heart_rate")] * 3)
    assert (r.stored, r.refused) == (3, 0)
    w = await pending[0]

    assert w.readings_deleted == 5
    assert consumer.stats.consent_rechecks == 0
    assert await rows(trial.url, "SELECT count(*) FROM readings WHERE device_id = 'hub-2'") == [
        (0,)
    ]


async def test_after_a_reconsent_deadline_until_the_new_version_is_signed(
    trial: Trial, gateway: RunningGateway, probe: MqttProbe, accounts: Accounts
) -> None:
    now = datetime.now(UTC)
    hub = trial.hubs["hub-1"]
    p1 = await accounts.participant("P1")
    async with db.connection(trial.url, autocommit=True) as conn:
        v2 = await records.create_version(
            conn,
            ADMIN,
            study_id="S1",
            title="Main ICF",
            version="2.0",
            scopes=ALL_SCOPES,
            effective_at=now - timedelta(days=10),
            reconsent_by=now - timedelta(hours=1),
            text="Version 2: a new data use.",
        )
        pending = await records.pending_reconsents(conn, COORDINATOR)
    assert [(p.participant_id, p.overdue) for p in pending] == [("P1", True)]
    t = to_ms(now)
    r = await send(probe, gateway, hub, 1, [(t - 2 * 60 * MIN, "heart_rate"), (t, "heart_rate")])
    assert (r.stored, r.refused) == (1, 1)
    assert await rejections(trial.url, "hub-1") == [("reconsent_required", "heart_rate", 1)]

    async with db.connection(trial.url, autocommit=True) as conn:
        signed = await records.sign(
            conn,
            p1,
            participant_id="P1",
            document_id=v2.document_id,
            scopes=ALL_SCOPES,
            printed_name="Participant P1",
            username="user-P1",
            password=PASSWORD,
            hasher=CHEAP_HASHER,
        )
        assert await records.pending_reconsents(conn, COORDINATOR) == []
    after = to_ms(signed.signed_at) + 1
    r = await send(probe, gateway, hub, 2, [(after, "heart_rate"), (t - 10 * MIN, "heart_rate")])
    assert (r.stored, r.refused) == (1, 1)
    stored = await rows(trial.url, "SELECT consent_id FROM readings ORDER BY time")
    assert stored[-1] == (signed.consent_id,)


async def test_withdrawal_committed_while_three_hubs_stream(
    trial: Trial, gateway: RunningGateway, probe: MqttProbe
) -> None:
    await trial.add_participant("P2", "hub-2")
    await trial.add_participant("P3", "hub-3")
    hubs = [trial.hubs[d] for d in ("hub-1", "hub-2", "hub-3")]
    seqs = dict.fromkeys((h.device_id for h in hubs), 0)
    withdrawn = asyncio.Event()
    per_envelope = 5

    async def stream() -> None:
        rounds_after = 0
        while rounds_after < 20:
            for hub in hubs:
                seqs[hub.device_id] += 1
                t = now_ms()
                payload = Payload(
                    dev=hub.device_id,
                    seq=seqs[hub.device_id],
                    sent_ms=t,
                    readings=tuple(
                        Reading(t - per_envelope + 1 + i, "heart_rate", 70.0, "/min", "s")
                        for i in range(per_envelope)
                    ),
                )
                probe.publish(up_topic(hub.device_id), seal(payload, hub.key))
            if withdrawn.is_set():
                rounds_after += 1
            await asyncio.sleep(0.01)  # pacing only: the assertions count, never time

    async def withdraw_mid_stream() -> records.Withdrawal:
        async def p2_stored() -> bool:
            got = await rows(trial.url, "SELECT count(*) FROM readings WHERE device_id='hub-2'")
            return bool(got[0][0] >= 50)

        await wait_until(p2_stored, "hub-2 streaming")
        w = await withdraw(trial)
        withdrawn.set()
        return w

    async with asyncio.TaskGroup() as tg:
        tg.create_task(stream(), name="stream")
        pending_withdrawal = tg.create_task(withdraw_mid_stream(), name="withdraw")
    w = pending_withdrawal.result()
    total = sum(seqs.values())
    await wait_until(lambda: probe.messages.qsize() >= total, f"{total} receipts")

    after = await rows(
        trial.url,
        "SELECT count(*) FROM readings WHERE participant_id = 'P2'"
        " AND time >= date_trunc('milliseconds', %s::timestamptz)",
        w.effective_at,
    )
    assert after == [(0,)]
    counts: dict[str, int] = dict(
        await rows(trial.url, "SELECT device_id, count(*)::int FROM readings GROUP BY 1")
    )
    refused: dict[str, int] = dict(
        await rows(
            trial.url,
            "SELECT device_id, sum(reading_count)::int FROM rejections"
            " WHERE reason = 'no_consent' GROUP BY 1",
        )
    )
    # The stream ran on both sides of the withdrawal, and nothing was dropped unrecorded.
    assert counts["hub-2"] >= 50
    assert refused["hub-2"] >= per_envelope * 20
    assert counts["hub-2"] + refused["hub-2"] == per_envelope * seqs["hub-2"]
    for other in ("hub-1", "hub-3"):
        assert counts[other] == per_envelope * seqs[other]
        assert other not in refused
