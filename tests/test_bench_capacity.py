"""`bench capacity` computes what it says from the measured result it is given: cores are
envelopes/s times CPU per envelope, hosts those cores over a host's at the target
utilization (never under the cluster's floor on RabbitMQ), the envelope size nearest the
load's is the one used, and a file that is not a `bench ingest --amqp` result is refused
with one clear line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import capacity
from tests.test_cli import assert_one_clear_line, trialstream


def cpu(consumer: float, broker: float, database: float) -> dict[str, float]:
    return {
        "consumer_us_per_envelope": consumer,
        "broker_us_per_envelope": broker,
        "database_us_per_envelope": database,
    }


def result(size: int, scale: float = 1.0) -> dict[str, Any]:
    return {
        "readings_per_envelope": size,
        "gateway": {"readings_per_s": 30_000, "cpu": cpu(400 * scale, 40 * scale, 100 * scale)},
        "gateway_amqp": {"readings_per_s": 11_000, "cpu": cpu(900 * scale, 300 * scale, 200)},
    }


INGEST = {"machine": {"cpus": 2}, "results": [result(1, 0.5), result(10), result(100, 3.0)]}


def test_cores_and_hosts_follow_from_the_measured_cpu_per_envelope() -> None:
    load = capacity.Load(participants=20_000, readings_per_participant_per_s=2.5, seal_s=5)
    out = capacity.model(INGEST, load, host_cores=2, utilization=0.5)
    assert out["load"]["envelopes_per_s"] == 4000.0
    assert out["load"]["readings_per_s"] == 50_000
    assert out["measured"]["readings_per_envelope_used"] == 10  # 12.5 is nearest 10
    rabbit = out["paths"]["rabbitmq"]["parts"]
    assert rabbit["consumer"]["cores"] == 3.6  # 4000/s x 900 us
    assert rabbit["consumer"]["hosts"] == 4  # 3.6 cores over 1 core a host may use
    assert rabbit["broker"]["cores"] == 1.2
    assert rabbit["broker"]["hosts"] == 3  # the quorum's floor, not the 2 the cores ask
    assert rabbit["database"]["hosts"] == 2  # a primary and its standby at least
    mosquitto = out["paths"]["mosquitto"]["parts"]
    assert mosquitto["broker"]["hosts"] == 1  # the single-machine path has no floor
    year = out["storage_per_year"]
    assert year["readings"] == 50_000 * 365 * 86_400
    assert year["tib_plain_postgresql"] == pytest.approx(
        year["readings"] / 1e6 * 183 / 1024 / 1024, rel=0.01
    )


def test_fewer_hours_worn_scale_the_load_down() -> None:
    half = capacity.Load(hours_worn_per_day=12)
    assert half.envelopes_per_s == capacity.Load().envelopes_per_s / 2


def test_a_result_without_the_rabbitmq_path_is_refused() -> None:
    with pytest.raises(ValueError, match="bench ingest --amqp"):
        capacity.model({"results": [{"readings_per_envelope": 10}]}, capacity.Load())


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"[1, 2, 3]",
        b'{"results": "no"}',
        b'{"results": [{"readings_per_envelope": 10, "gateway_amqp": {}}]}',
        b" " * (capacity.MAX_RESULT_BYTES + 1),
    ],
)
def test_a_file_that_is_not_a_result_is_one_clear_line(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "ingest.json"
    path.write_bytes(content)
    result = trialstream("bench", "capacity", "--ingest", str(path))
    assert_one_clear_line(result, "not a bench ingest --amqp result")


def test_a_missing_file_is_one_clear_line(tmp_path: Path) -> None:
    result = trialstream("bench", "capacity", "--ingest", str(tmp_path / "none.json"))
    assert_one_clear_line(result, "no such file")


def test_the_command_prints_the_model(tmp_path: Path) -> None:
    path = tmp_path / "ingest.json"
    path.write_text(json.dumps(INGEST))
    result = trialstream("bench", "capacity", "--ingest", str(path), "--participants", "1000")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["load"]["envelopes_per_s"] == 200.0
    assert out["measured"]["file"] == str(path)
