"""A strap replaced under the same sensor name: readings ingested through the real gateway
keep the provenance of the strap that took them, in every export and on the participant's
history, instead of the newest strap's."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyreadstat
import pytest
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.observation import Observation

from gateway.broker import MosquittoBroker
from ingest.envelope import seal
from ingest.model import Payload, Reading, SensorReport
from ingest.pipeline import up_topic
from ingest.receipts import RECEIPT_ACCEPTED, open_receipt
from storage import db, sensors
from storage.exports import ExportKind, ExportRequest, export
from storage.timeconv import from_ms
from tests.exports.conftest import MONITOR_A, now_ms, read_dataset
from tests.fixtures.gateway import RunningGateway
from tests.fixtures.mqtt import MqttProbe
from tests.fixtures.trial import Trial

MINUTE = 60_000
STRAP_A = SensorReport("hr-strap", "Acme", "HRM-2", "S1", "1.0", "rev-B", 90)
# Another strap: it serves no manufacturer or hardware revision, and must not inherit A's.
STRAP_B = SensorReport("hr-strap", None, "HRM-3", "S2", "2.0", None, 100)


@pytest.fixture
async def probe(mosquitto: MosquittoBroker, gateway: RunningGateway) -> AsyncIterator[MqttProbe]:
    p = MqttProbe(mosquitto, "strap-swap-probe")
    p.subscribe("dct/v1/+/down")
    yield p
    p.close()


async def publish(probe: MqttProbe, gateway: RunningGateway, trial: Trial, p: Payload) -> None:
    probe.publish(up_topic(p.dev), seal(p, trial.hubs[p.dev].key))
    _, raw = await probe.next()
    receipt = open_receipt(raw, gateway.receipt_public_key)
    assert (receipt.seq, receipt.status, receipt.stored) == (
        p.seq,
        RECEIPT_ACCEPTED,
        len(p.readings),
    )


def beats(first_ms: int, n: int) -> tuple[Reading, ...]:
    return tuple(
        Reading(first_ms + i * 10_000, "heart_rate", 60.0 + i, "/min", "hr-strap") for i in range(n)
    )


@pytest.fixture
async def swapped(trial: Trial, gateway: RunningGateway, probe: MqttProbe) -> int:
    """Strap A reported, its readings; strap B reported later, its readings. Returns the
    time the hub reported B (the envelope's sealing time): readings before it are A's."""
    now = now_ms()
    sealed_a, swap, sealed_c = now - 30 * MINUTE, now - 20 * MINUTE, now - 5 * MINUTE
    await publish(
        probe,
        gateway,
        trial,
        # Readings taken before the first report are A's too: it is the only strap described.
        Payload("hub-1", 1, sealed_a, beats(sealed_a - 2 * MINUTE, 6), sensors=(STRAP_A,)),
    )
    # A's last readings travel with B's report; they were taken before B was reported.
    await publish(
        probe,
        gateway,
        trial,
        Payload("hub-1", 2, swap, beats(swap - MINUTE, 3), sensors=(STRAP_B,)),
    )
    await publish(probe, gateway, trial, Payload("hub-1", 3, sealed_c, beats(swap + MINUTE, 4)))
    # B reports itself again on its next connection (battery only changes): no new period.
    await publish(
        probe,
        gateway,
        trial,
        Payload("hub-1", 4, now - MINUTE, beats(sealed_c + MINUTE, 2), sensors=(STRAP_B,)),
    )
    return swap


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


async def test_parquet_rows_carry_the_strap_of_their_own_time(
    trial: Trial, swapped: int, tmp_path: Path
) -> None:
    out = tmp_path / "parquet"
    result = await export(trial.url, MONITOR_A, ExportRequest(ExportKind.PARQUET, "S1"), out)
    assert result.rows == 15  # each reading once: the history join adds no rows
    table = read_dataset(out).to_pylist()
    swap = from_ms(swapped)
    early = [r for r in table if r["time"] < swap]
    late = [r for r in table if r["time"] >= swap]
    assert (len(early), len(late)) == (9, 6)
    provenance = [
        f"sensor_{f}" for f in ("manufacturer", "model", "serial", "firmware", "hardware")
    ]
    assert {tuple(r[c] for c in provenance) for r in early} == {
        ("Acme", "HRM-2", "S1", "1.0", "rev-B")
    }
    assert {tuple(r[c] for c in provenance) for r in late} == {(None, "HRM-3", "S2", "2.0", None)}


async def test_fhir_observations_reference_the_device_of_their_own_time(
    trial: Trial, swapped: int, tmp_path: Path
) -> None:
    out = tmp_path / "fhir"
    result = await export(trial.url, MONITOR_A, ExportRequest(ExportKind.FHIR, "S1"), out)
    assert result.rows == 15
    observations = lines(out / "Observation.ndjson")
    devices = lines(out / "Device.ndjson")
    for model, resources in ((Observation, observations), (Device, devices)):
        for resource in resources:
            model.model_validate(resource)
    by_ref = {f"Device/{d['id']}": d for d in devices}
    hub = next(d for d in devices if d["identifier"][0]["value"] == "hub-1")
    straps = [d for d in devices if d is not hub]
    assert sorted(d["serialNumber"] for d in straps) == ["S1", "S2"]
    assert all(d["parent"]["reference"] == f"Device/{hub['id']}" for d in straps)
    swap = datetime.fromtimestamp(swapped / 1000, UTC)
    serials: dict[str, set[str]] = {"early": set(), "late": set()}
    for o in observations:
        t = datetime.fromisoformat(o["effectiveDateTime"])
        strap = by_ref[o["device"]["reference"]]
        serials["early" if t < swap else "late"].add(strap["serialNumber"])
    assert serials == {"early": {"S1"}, "late": {"S2"}}
    b = next(d for d in straps if d["serialNumber"] == "S2")
    assert "manufacturer" not in b
    assert [(v["type"]["text"], v["value"]) for v in b["version"]] == [("firmware", "2.0")]


async def test_sdtm_summaries_count_every_reading_once(
    trial: Trial, swapped: int, tmp_path: Path
) -> None:
    """SDTM carries daily summaries without sensor provenance (docs/exports.md); the history
    must neither drop nor repeat the readings they summarise."""
    out = tmp_path / "sdtm"
    await export(trial.url, MONITOR_A, ExportRequest(ExportKind.SDTM, "S1"), out)
    frame, _ = pyreadstat.read_xport(str(out / "vs.xpt"))
    counts = frame[frame["VSSCAT"] == "DAILY COUNT"]
    assert counts["VSSTRESN"].sum() == 15


async def test_the_participant_history_lists_which_strap_from_when_to_when(
    trial: Trial, swapped: int
) -> None:
    async with db.connection(trial.url) as conn:
        periods = await sensors.participant_history(conn, "P1")
    assert [
        (
            p.device_id,
            p.sensor,
            p.manufacturer,
            p.model,
            p.serial,
            p.firmware,
            p.valid_from,
            p.valid_to,
        )
        for p in periods
    ] == [
        ("hub-1", "hr-strap", "Acme", "HRM-2", "S1", "1.0", None, from_ms(swapped)),
        ("hub-1", "hr-strap", None, "HRM-3", "S2", "2.0", from_ms(swapped), None),
    ]
    assert periods[1].reported_at == from_ms(swapped)
