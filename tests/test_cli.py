"""The command line: help everywhere, and one clear line (no traceback) for bad settings."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from gateway.cli import build_parser


def trialstream(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TRIALSTREAM_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        check=False,
    )


def _commands(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> list[tuple[str, ...]]:
    found = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.extend(_commands(sub, (*prefix, name)))
    return found


@pytest.mark.parametrize("command", _commands(build_parser()), ids=" ".join)
def test_every_command_has_help(command: tuple[str, ...]) -> None:
    result = trialstream(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: trialstream" in result.stdout
    assert len(result.stdout.splitlines()) >= 3


def assert_one_clear_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_unreachable_database() -> None:
    result = trialstream("db", "status", "--database-url", "postgresql://postgres@127.0.0.1:1/x")
    assert_one_clear_line(result, "cannot connect", "127.0.0.1:1", "TRIALSTREAM_DATABASE_URL")


def test_malformed_database_url() -> None:
    result = trialstream("db", "migrate", env={"TRIALSTREAM_DATABASE_URL": "host=x bogus_option=1"})
    assert_one_clear_line(result, "not valid", "bogus_option")


def test_missing_database_setting() -> None:
    assert_one_clear_line(trialstream("db", "status"), "TRIALSTREAM_DATABASE_URL", "--database-url")


def test_bad_number_in_environment() -> None:
    result = trialstream("broker", env={"TRIALSTREAM_MQTT_PORT": "eighty"})
    assert_one_clear_line(result, "TRIALSTREAM_MQTT_PORT", "eighty")


def test_missing_broker_binary(tmp_path: object) -> None:
    result = trialstream("broker", env={"TRIALSTREAM_MOSQUITTO": "/nonexistent/mosquitto"})
    assert_one_clear_line(result, "/nonexistent/mosquitto", "not an executable")
    no_path = trialstream("broker", env={"PATH": "/nonexistent"})
    assert_one_clear_line(no_path, "mosquitto not found", "apt-get install mosquitto")


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--latency-rate", "0"),
        ("--latency-rate", "-5"),
        ("--latency-rate", "nan"),
        ("--slow-seconds", "0"),
    ],
)
def test_bench_ingest_refuses_a_rate_or_window_that_is_not_positive(flag: str, value: str) -> None:
    url = "postgresql://postgres@127.0.0.1:1/x"  # never reached: the flags are checked first
    result = trialstream("bench", "ingest", "--database-url", url, flag, value)
    assert_one_clear_line(result, flag, "must be > 0")


@pytest.mark.parametrize(
    "value", ["0", "-1", "3651", "1e3", "nan", "99999999999999999999", "", "7\x00"]
)
def test_create_study_refuses_a_backfill_horizon_out_of_bounds(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["site", "create-study", "--study", "S1", "--name", "n", "--backfill-days", value]
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(args)
    assert info.value.code == 2
    assert "a whole number of days from 1 to 3650" in capsys.readouterr().err


def test_create_study_backfill_horizon_default_and_bounds() -> None:
    base = ["site", "create-study", "--study", "S1", "--name", "n"]
    assert build_parser().parse_args(base).backfill_days == 365
    assert build_parser().parse_args([*base, "--backfill-days", "3650"]).backfill_days == 3650
