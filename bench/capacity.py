"""``trialstream bench capacity``: the hosts, cores and storage a deployment needs, computed
from measurements, not guessed (docs/scaling.md).

Inputs: the JSON result of ``bench ingest --amqp`` (CPU microseconds per envelope by part,
for the gateway on Mosquitto and on RabbitMQ, at the envelope size nearest the load's), the
storage cost per million readings (docs/storage.md's measurement, or given), and the load:
participants, readings per participant per second, the hub's sealing interval.

For each part (gateway workers, broker, database) the cores it keeps busy are envelopes/s
times CPU per envelope; hosts are those cores over the cores a host has at the target
utilization (headroom for bursts, a lost host, a backlog to drain). Every figure used is
echoed in the result with the file it came from.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SECONDS_PER_YEAR = 365 * 86_400
# A bench ingest result is a few KiB; anything much larger is not one.
MAX_RESULT_BYTES = 1024 * 1024
# docs/storage.md, "What they cost, measured here": MiB per million readings at 10 readings
# per envelope, the readings' rows with their indexes and the signed originals.
STORAGE_MIB_PER_MILLION = {"readings": 146.0, "originals": 37.0}
PARTS = ("consumer", "broker", "database")
# The cluster's own floor, whatever the load: two gateway hosts (one may be lost), three
# RabbitMQ nodes (a quorum queue keeps a majority with one lost), a primary and its standby.
HA_MINIMUM = {"consumer": 2, "broker": 3, "database": 2}


@dataclass(frozen=True, slots=True)
class Load:
    participants: int = 20_000
    studies: int = 50
    readings_per_participant_per_s: float = 2.5
    seal_s: float = 5.0
    # Hours a day the wearables are worn and streaming (24: the upper bound).
    hours_worn_per_day: float = 24.0

    @property
    def readings_per_envelope(self) -> float:
        return self.readings_per_participant_per_s * self.seal_s

    @property
    def envelopes_per_s(self) -> float:
        return self.participants / self.seal_s * self.hours_worn_per_day / 24

    @property
    def readings_per_s(self) -> float:
        return self.envelopes_per_s * self.readings_per_envelope


def _nearest_size(results: list[dict[str, Any]], size: float) -> dict[str, Any]:
    with_amqp = [r for r in results if "gateway_amqp" in r]
    if not with_amqp:
        raise ValueError("the ingest result has no gateway_amqp figures: run bench ingest --amqp")
    return min(with_amqp, key=lambda r: abs(math.log(r["readings_per_envelope"] / size)))


def model(
    ingest: dict[str, Any],
    load: Load,
    *,
    host_cores: int = 2,
    utilization: float = 0.5,
    source: str = "",
) -> dict[str, Any]:
    """The capacity of ``load`` from the ``bench ingest --amqp`` result ``ingest``."""
    measured = _nearest_size(ingest["results"], load.readings_per_envelope)
    size = measured["readings_per_envelope"]
    rate = load.envelopes_per_s
    paths: dict[str, Any] = {}
    for path, key in (("mosquitto", "gateway"), ("rabbitmq", "gateway_amqp")):
        cpu = measured[key]["cpu"]
        parts: dict[str, Any] = {}
        for part in PARTS:
            # CPU per envelope scales with readings per envelope only weakly (the per-message
            # work dominates); the measured size nearest the load's is used as it is.
            us = float(cpu[f"{part}_us_per_envelope"])
            cores = rate * us / 1e6
            needed = max(1, math.ceil(cores / (host_cores * utilization)))
            parts[part] = {
                "us_per_envelope": us,
                "cores": round(cores, 2),
                "hosts": max(HA_MINIMUM[part], needed) if path == "rabbitmq" else needed,
            }
        paths[path] = {
            "measured_readings_per_s_on_this_machine": measured[key]["readings_per_s"],
            "parts": parts,
        }
    per_year = load.readings_per_s * SECONDS_PER_YEAR
    mib = sum(STORAGE_MIB_PER_MILLION.values()) * per_year / 1e6
    return {
        "load": {
            **asdict(load),
            "readings_per_envelope": round(load.readings_per_envelope, 1),
            "envelopes_per_s": round(rate, 1),
            "readings_per_s": round(load.readings_per_s),
        },
        "measured": {
            "file": source,
            "machine": ingest.get("machine"),
            "readings_per_envelope_used": size,
        },
        "hosts": {"cores_each": host_cores, "target_utilization": utilization},
        "paths": paths,
        "storage_per_year": {
            "readings": round(per_year),
            "tib_plain_postgresql": round(mib / 1024 / 1024, 1),
            "mib_per_million_readings": STORAGE_MIB_PER_MILLION,
            "source": "docs/storage.md (PostgreSQL 15, 10 readings per envelope)",
            "per_study_tib": round(mib / 1024 / 1024 / load.studies, 2),
        },
    }


def run(
    ingest_file: Path,
    load: Load,
    *,
    host_cores: int = 2,
    utilization: float = 0.5,
) -> dict[str, Any]:
    if ingest_file.stat().st_size > MAX_RESULT_BYTES:
        raise ValueError(f"larger than {MAX_RESULT_BYTES // 1024} KiB")
    ingest = json.loads(ingest_file.read_text())
    if not isinstance(ingest, dict):
        raise ValueError("not a JSON object")
    return {
        "benchmark": "capacity",
        **model(
            ingest, load, host_cores=host_cores, utilization=utilization, source=str(ingest_file)
        ),
    }
