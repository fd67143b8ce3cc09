"""The demo as a newcomer runs it: everything starts, the scenario plays, and shutdown
leaves no process, port or file behind."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from device_drivers.outbox import Outbox
from gateway.broker import free_port
from storage import db


def run_demo(
    *args: str, env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TRIALSTREAM_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "--log-level", "WARNING", "demo", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
    )


def leftovers(marker: str) -> list[str]:
    found = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if marker in cmdline:
            found.append(f"{proc.info['pid']} {cmdline[:120]}")
    return found


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.slow
async def test_the_demo_plays_its_scenario_and_cleans_up(
    empty_database_url: str, tmp_path: Path
) -> None:
    port = free_port()
    data_dir = tmp_path / "demo"
    report_path = tmp_path / "report.json"
    result = run_demo(
        "--participants",
        "3",
        "--duration",
        "45",
        "--http-port",
        str(port),
        "--episode-after",
        "15",
        "--withdraw-after",
        "15",
        "--offline-after",
        "8",
        "--offline-for",
        "12",
        "--database-url",
        empty_database_url,
        "--into-database",
        "--data-dir",
        str(data_dir),
        "--report",
        str(report_path),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for step in ("[1/6]", "[2/6]", "[3/6]", "[4/6]", "[5/6]", "[6/6]", "stopping"):
        assert step in out
    assert f"http://127.0.0.1:{port}" in out
    report = json.loads(report_path.read_text())
    devices = report["devices"]
    withdrawn, offline = "P-002", "P-003"

    async with db.connection(empty_database_url) as conn:
        cur = await conn.execute("SELECT participant_id, count(*) FROM readings GROUP BY 1")
        per = {str(p): int(n) for p, n in await cur.fetchall()}
        cur = await conn.execute(
            "SELECT max(c.effective_at) FROM consents c WHERE c.participant_id = %s"
            " AND c.action = 'withdraw'",
            (withdrawn,),
        )
        (withdrawn_at,) = await cur.fetchone() or (None,)
        cur = await conn.execute(
            "SELECT count(*) FROM readings WHERE participant_id = %s AND time >= %s",
            (withdrawn, withdrawn_at),
        )
        (after_withdrawal,) = await cur.fetchone() or (None,)
        cur = await conn.execute(
            "SELECT sum(reading_count) FROM rejections WHERE participant_id = %s"
            " AND reason = 'no_consent'",
            (withdrawn,),
        )
        (refused,) = await cur.fetchone() or (None,)
        cur = await conn.execute(
            "SELECT (SELECT count(*) FROM readings WHERE device_id = %(d)s),"
            " (SELECT sum(stored_count) FROM envelopes WHERE device_id = %(d)s)",
            {"d": devices[offline]},
        )
        total, receipted = await cur.fetchone() or (0, 0)
        cur = await conn.execute(
            "SELECT a.participant_id, r.name FROM alerts a JOIN alert_rules r"
            " ON r.rule_id = a.rule_id WHERE r.name = 'tachycardia'"
        )
        tachycardia = await cur.fetchall()
        cur = await conn.execute(
            "SELECT array_agg(seq ORDER BY seq) FROM envelopes WHERE device_id = %s",
            (devices[offline],),
        )
        (seqs,) = await cur.fetchone() or ([],)

    # The abnormal episode raised the alert, for that participant only.
    assert tachycardia == [("P-001", "tachycardia")]
    # Readings arrive from every participant.
    assert set(per) == {"P-001", "P-002", "P-003"}
    assert all(n > 0 for n in per.values())
    # The withdrawn participant's later readings are rejected with no_consent, none stored.
    assert withdrawn_at is not None
    assert after_withdrawal == 0
    assert refused is not None
    assert refused > 0
    # The offline hub's backlog arrived, exactly once, with no hole in its envelopes.
    # (Each envelope is stored once by its primary key; its readings are exactly those counted.)
    assert total == receipted > 0
    with Outbox.open(data_dir / "hubs" / offline / "outbox.sqlite", devices[offline]) as outbox:
        waiting = {e.seq for e in outbox.due(2**62, 0, 10_000)}
        next_seq = outbox.stats().next_seq
    assert set(seqs) | waiting == set(range(1, next_seq))
    assert any(e["event"].startswith(f"{offline}: hub back online") for e in report["events"])
    # Shutdown leaves no process and no port behind.
    assert leftovers(str(data_dir)) == []
    assert port_free(port)


@pytest.mark.slow
def test_without_mosquitto_the_demo_runs_on_amqtt_and_says_so(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # A PATH without mosquitto, with what the demo needs besides: as root, the embedded
    # PostgreSQL runs under a system user of its own, which it creates with useradd.
    for tool in ("python3", *(("useradd",) if os.geteuid() == 0 else ())):
        found = shutil.which(tool)
        assert found, f"{tool} not found"
        (bin_dir / tool).symlink_to(found)
    data_dir = tmp_path / "demo"
    result = run_demo(
        "--participants",
        "2",
        "--duration",
        "12",
        "--http-port",
        str(free_port()),
        "--data-dir",
        str(data_dir),
        env={"PATH": f"{bin_dir}:{Path(sys.executable).parent}"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "amqtt" in result.stdout
    assert "REDUCED MODE" in result.stdout
    assert "stored" in result.stdout
    assert leftovers(str(data_dir)) == []


@pytest.mark.slow
def test_the_demo_starts_from_a_clean_checkout_with_a_fresh_virtualenv(tmp_path: Path) -> None:
    """The README's first command, as a newcomer runs it: a clone of what is committed, a
    virtualenv made by the script itself, the embedded database, nothing configured."""
    repo = Path(__file__).resolve().parents[1]
    checkout = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", str(repo), str(checkout)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIALSTREAM_")}
    env["TRIALSTREAM_VENV"] = str(tmp_path / "venv")
    result = subprocess.run(
        [
            str(checkout / "scripts" / "demo"),
            "--duration",
            "15",
            "--participants",
            "2",
            "--http-port",
            str(free_port()),
            "--episode-after",
            "5",
            "--withdraw-after",
            "8",
            "--offline-after",
            "3",
            "--offline-for",
            "5",
        ],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if result.returncode != 0:  # in full: an assertion's message would be cut short
        pytest.fail(
            f"scripts/demo exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
            f"\n--- stderr\n{result.stderr[-6000:]}",
            pytrace=False,
        )
    assert (tmp_path / "venv" / "bin" / "trialstream").exists()
    assert "embedded PostgreSQL" in result.stdout
    assert "[6/6] running" in result.stdout
    assert "stored" in result.stdout
    assert "stopping" in result.stdout
