"""Parquet: readings ingested through the real pipeline come back with the provenance of the
envelope that carried them, partitioned by participant and day, with the schema documented."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest

from gateway.broker import MosquittoBroker
from ingest.envelope import seal
from ingest.metrics import METRICS
from ingest.model import Payload, Reading, SensorReport
from ingest.pipeline import up_topic
from ingest.receipts import RECEIPT_ACCEPTED, open_receipt
from storage import db
from storage.exports import ExportKind, ExportRequest, export
from storage.exports.parquet import SCHEMA, SCHEMA_NAME
from tests.exports.conftest import MONITOR_A, consent_id_of, hr, ms, now_ms, read_dataset, store
from tests.fixtures.gateway import RunningGateway
from tests.fixtures.mqtt import MqttProbe
from tests.fixtures.trial import Trial


@pytest.fixture
async def probe(mosquitto: MosquittoBroker, gateway: RunningGateway) -> AsyncIterator[MqttProbe]:
    p = MqttProbe(mosquitto, "export-probe")
    p.subscribe("dct/v1/+/down")
    yield p
    p.close()


async def publish(
    probe: MqttProbe, gateway: RunningGateway, trial: Trial, payload: Payload
) -> bytes:
    """Seal and publish one envelope; wait for its receipt; return the sealed bytes."""
    data = seal(payload, trial.hubs[payload.dev].key)
    probe.publish(up_topic(payload.dev), data)
    _, raw = await probe.next()
    receipt = open_receipt(raw, gateway.receipt_public_key)
    assert (receipt.seq, receipt.status, receipt.refused) == (payload.seq, RECEIPT_ACCEPTED, 0)
    return data


async def test_round_trip_every_provenance_column_matches_its_envelope(
    trial: Trial, gateway: RunningGateway, probe: MqttProbe, tmp_path: Path
) -> None:
    now = now_ms()
    two_days_ago = now - 2 * 86_400_000
    await trial.add_participant(
        "P2",
        "hub-2",
        consent_at=datetime.now(UTC) - timedelta(days=3),
        enrolled_at=datetime.now(UTC) - timedelta(days=4),
    )
    strap = SensorReport("hr-strap", "Acme", "HRM-9", "SN-0042", "4.1.7", "rev-B")
    oximeter = SensorReport("ox-1", None, "OX-2", None, "0.9", None)
    payloads = [
        Payload(
            "hub-1",
            1,
            now,
            tuple(
                Reading(now - 60_000 + i * 1000, "heart_rate", 70.0 + i, "/min", "hr-strap")
                for i in range(3)
            ),
            sensors=(strap,),
        ),
        Payload(
            "hub-2",
            7,
            now,
            (
                Reading(two_days_ago, "spo2", 97.5, "%", "ox-1"),
                Reading(now - 30_000, "spo2", 96.0, "%", "ox-1"),
                # A wearable the hub never described: its provenance columns stay null.
                Reading(now - 20_000, "body_temperature", 36.6, "Cel", "thermo"),
            ),
            sensors=(oximeter,),
        ),
        Payload(
            "hub-1",
            2,
            now,
            (Reading(now - 10_000, "rr_interval", 812.5, "ms", "hr-strap"),),
        ),
    ]
    sealed = {(p.dev, p.seq): await publish(probe, gateway, trial, p) for p in payloads}
    async with db.connection(trial.url) as conn:
        cur = await conn.execute("SELECT device_id, seq, received_at FROM envelopes")
        received = {(str(d), int(s)): r for d, s, r in await cur.fetchall()}
        cur = await conn.execute(
            "SELECT c.participant_id, d.version FROM consents c JOIN consent_documents d"
            " USING (document_id)"
        )
        versions = dict(await cur.fetchall())

    out = tmp_path / "export"
    result = await export(trial.url, MONITOR_A, ExportRequest(ExportKind.PARQUET, "S1"), out)
    assert result.rows == 7
    assert result.participants == ("P1", "P2")
    table = read_dataset(out)
    assert table.num_rows == 7

    reports = {("hub-1", "hr-strap"): strap, ("hub-2", "ox-1"): oximeter}

    def reported(dev: str, sensor: str, field: str) -> object:
        report = reports.get((dev, sensor))
        return None if report is None else getattr(report, field)

    expected = sorted(
        (
            {
                "participant_id": "P1" if p.dev == "hub-1" else "P2",
                "date": datetime.fromtimestamp(r.t_ms / 1000, UTC).date(),
                "time": datetime.fromtimestamp(r.t_ms / 1000, UTC),
                "metric": r.metric,
                "loinc": METRICS[r.metric].loinc,
                "value": r.value,
                "unit": r.unit,
                # A hub that says nothing about its readings: no flags, no device user.
                "device_flags": None,
                "device_quality": None,
                "device_user": None,
                "device_id": p.dev,
                "envelope_seq": p.seq,
                "envelope_sha256": hashlib.sha256(sealed[(p.dev, p.seq)]).digest(),
                "envelope_sent_at": datetime.fromtimestamp(p.sent_ms / 1000, UTC),
                "received_at": received[(p.dev, p.seq)],
                "sensor": r.sensor,
                "sensor_manufacturer": reported(p.dev, r.sensor, "manufacturer"),
                "sensor_model": reported(p.dev, r.sensor, "model"),
                "sensor_serial": reported(p.dev, r.sensor, "serial"),
                "sensor_firmware": reported(p.dev, r.sensor, "firmware"),
                "sensor_hardware": reported(p.dev, r.sensor, "hardware"),
                "consent_version": versions["P1" if p.dev == "hub-1" else "P2"],
                "consent_document": "Main ICF",
                "study_id": "S1",
                "site_id": "SITE-A",
            }
            for p in payloads
            for r in p.readings
        ),
        key=lambda row: (row["participant_id"], row["time"]),
    )
    got = table.drop_columns(["consent_id"]).to_pylist()
    assert [sorted(row) for row in got] == [sorted(row) for row in expected]
    assert got == expected
    assert all(c is not None for c in table.column("consent_id").to_pylist())


async def test_files_are_one_per_participant_and_day_with_the_documented_schema(
    trial: Trial, tmp_path: Path
) -> None:
    await trial.add_participant(
        "P3",
        "hub-3",
        consent_at=datetime(2026, 1, 1, tzinfo=UTC),
        enrolled_at=datetime(2025, 12, 1, tzinfo=UTC),
    )
    cid = await consent_id_of(trial.url, "P3")
    times = [
        datetime(2026, 3, 1, 23, 59, 59, 999000, tzinfo=UTC),
        datetime(2026, 3, 2, 0, 0, 0, tzinfo=UTC),
        datetime(2026, 3, 2, 12, 0, 0, tzinfo=UTC),
        datetime(2026, 3, 2, 23, 0, 0, tzinfo=UTC),
    ]
    await store(trial.url, "P3", "hub-3", 1, [hr(ms(t), 60.0) for t in times], consent_id=cid)
    await store(trial.url, "P1", "hub-1", 1, [hr(now_ms() - 1000, 61.0)])
    out = tmp_path / "layout"
    # Chunks of 2 rows: a day's rows arrive in several chunks and still make one file.
    result = await export(
        trial.url,
        MONITOR_A,
        ExportRequest(ExportKind.PARQUET, "S1", "P3"),
        out,
        export_id="e-123",
        chunk_rows=2,
    )
    assert result.rows == 4
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert names == [
        "participant_id=P3/date=2026-03-01/part-0.parquet",
        "participant_id=P3/date=2026-03-02/part-0.parquet",
    ]
    assert [(f.path, f.rows) for f in result.files] == [
        (n, r) for n, r in zip(names, (1, 3), strict=True)
    ]
    for f in result.files:
        data = (out / f.path).read_bytes()
        assert (f.sha256, f.bytes) == (hashlib.sha256(data).hexdigest(), len(data))
    one = pq.read_table(out / names[1])
    assert one.schema.remove_metadata() == SCHEMA
    assert one.schema.metadata[b"trialstream.schema"] == SCHEMA_NAME
    assert one.schema.metadata[b"trialstream.export_id"] == b"e-123"
    assert one.column("time").to_pylist() == times[1:]
    assert read_dataset(out).column("date").to_pylist() == [
        date(2026, 3, 1),
        date(2026, 3, 2),
        date(2026, 3, 2),
        date(2026, 3, 2),
    ]


async def test_window_and_participant_filters(trial: Trial, tmp_path: Path) -> None:
    start = now_ms() - 3_600_000
    await store(trial.url, "P1", "hub-1", 1, [hr(start + i * 60_000, 60.0 + i) for i in range(10)])
    lo = datetime.fromtimestamp((start + 3 * 60_000) / 1000, UTC)
    hi = datetime.fromtimestamp((start + 6 * 60_000) / 1000, UTC)
    out = tmp_path / "window"
    result = await export(
        trial.url,
        MONITOR_A,
        ExportRequest(ExportKind.PARQUET, "S1", "P1", from_time=lo, to_time=hi),
        out,
    )
    assert result.rows == 3
    assert read_dataset(out).column("value").to_pylist() == [63.0, 64.0, 65.0]
