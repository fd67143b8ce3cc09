"""`trialstream cluster`: every number it takes is checked before anything starts, and a drill
that could not survive its own faults is refused with one clear line; the drill's verdict
fails a hub for any reading lost, doubled or refused."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway.cli import build_parser
from gateway.harness import HubVerdict
from tests.test_cli import assert_one_clear_line, trialstream


@pytest.mark.parametrize(
    ("action", "flag", "value"),
    [
        ("drill", "--hubs", "0"),
        ("drill", "--hubs", "51"),
        ("drill", "--hubs", "3.5"),
        ("drill", "--hubs", "9" * 40),
        ("up", "--rabbit-nodes", "0"),
        ("up", "--rabbit-nodes", "-1"),
        ("up", "--database-nodes", "1"),
        ("up", "--gateway-hosts", "9"),
        ("up", "--workers", "x"),
        ("up", "--duration", "nan"),
        ("up", "--duration", "inf"),
        ("up", "--duration", "0"),
        ("up", "--duration", "1e999"),
        ("up", "--every", "-5"),
        ("drill", "--settle", "0.5"),
        ("drill", "--settle", "1" * 30),
    ],
)
def test_a_number_out_of_bounds_is_refused_by_the_parser(
    action: str, flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["cluster", action, flag, value])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err
    assert "Traceback" not in err


def test_defaults_are_the_drill_the_issue_asks_for() -> None:
    args = build_parser().parse_args(["cluster", "drill"])
    assert (args.rabbit_nodes, args.database_nodes, args.gateway_hosts, args.hubs) == (3, 2, 2, 3)


@pytest.mark.parametrize(
    "flags", [("--gateway-hosts", "1"), ("--rabbit-nodes", "2"), ("--rabbit-nodes", "1")]
)
def test_a_drill_that_would_kill_its_last_host_or_the_queues_majority_is_refused(
    flags: tuple[str, str],
) -> None:
    result = trialstream("cluster", "drill", *flags)
    assert_one_clear_line(result, "a drill needs at least 3 RabbitMQ nodes", "2 gateway hosts")


GOOD = HubVerdict("hub-1", 500, 25, 500, 25, 500, 0, 25, 0, "127.0.0.1:1")


@pytest.mark.parametrize(
    "change",
    [
        {"stored_readings": 520},  # a reading stored twice
        {"stored_readings": 490, "carried": 490},  # readings lost
        {"stored_envelopes": 24},  # an envelope sealed and never stored
        {"receipts_accepted": 24},  # an envelope stored and never receipted
        {"rejections": 1},
        {"receipts_rejected": 1},
    ],
)
def test_the_drills_verdict_fails_a_hub_for_anything_lost_doubled_or_refused(
    change: dict[str, int],
) -> None:
    assert GOOD.ok
    assert not replace(GOOD, **change).ok  # type: ignore[arg-type]
