"""`trialstream-hub pair` end to end on the virtual radio: the command in its own process,
its Bluetooth the hub's host stack on a simulated controller (``--simulated-radio``) whose
radio, with a cuff that shows a passkey and a strap that pairs with Just Works, runs in
another (RadioProcess). The passkey given with --passkey or typed at a terminal (a pty)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from bumble.pairing import PairingDelegate

from device_drivers import cli as hub_cli
from device_drivers.sim import RadioProcess, VirtualBloodPressureCuff, VirtualHeartRateStrap
from gateway.broker import free_port

ROOT = Path(__file__).resolve().parents[2]
PASSKEY = 314_159
CUFF_NAME = "TS-BPM-PIN"
STRAP_NAME = "TS-HRM-JW"
# Each command imports bleak and bumble and scans; a loaded 2-core machine takes seconds.
COMMAND_WITHIN_S = 90.0


@pytest.fixture
async def radio() -> AsyncIterator[RadioProcess]:
    """The cuff (passkey, authenticated pairing only, a clock to set) first, then the strap."""
    cuff = functools.partial(
        VirtualBloodPressureCuff,
        CUFF_NAME,
        interval_s=None,
        passkey=PASSKEY,
        io_capability=PairingDelegate.IoCapability.DISPLAY_OUTPUT_ONLY,
        require_authentication=True,
        clock_offset_s=-3 * 86_400.0,
    )
    strap = functools.partial(VirtualHeartRateStrap, STRAP_NAME)
    async with RadioProcess([cuff, strap], hci_port=free_port()) as process:
        yield process


def hub(
    radio: RadioProcess | None, hub_dir: Path, *args: str, stdin: int | None = None
) -> subprocess.CompletedProcess[str]:
    """``trialstream-hub ACTION --hub-dir ... ARGS`` (with the radio when given), its
    stdin a file descriptor (a pty's) or nothing at all."""
    action, *rest = args
    command = [sys.executable, "-m", "device_drivers.cli", action, "--hub-dir", str(hub_dir)]
    if radio is not None:
        command += ["--simulated-radio", radio.hci_spec, "--scan-seconds", "2"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIALSTREAM_")}
    return subprocess.run(
        [*command, *rest],
        stdin=subprocess.DEVNULL if stdin is None else stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=COMMAND_WITHIN_S,
        check=False,
    )


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The one ``error:`` line a failed command ends with (bumble may log before it)."""
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    assert done.stderr.rstrip().endswith(errors[0])
    return errors[0]


def recorded(hub_dir: Path) -> list[dict[str, object]]:
    path = hub_dir / "state.json"
    if not path.exists():
        return []
    wearables: list[dict[str, object]] = json.loads(path.read_text())["wearables"]
    return wearables


async def test_the_right_passkey_bonds_reads_the_cuff_sets_its_clock_and_records_it(
    radio: RadioProcess, tmp_path: Path
) -> None:
    cuff = radio.addresses[0]
    done = hub(
        radio,
        tmp_path,
        "pair",
        "--address",
        cuff,
        "--sensor",
        "bp-cuff",
        "--passkey",
        f"{PASSKEY:06d}",
        "--user",
        "1",
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"paired bp-cuff (blood_pressure) at {cuff}, participant is user 1"
    assert lines[1] == (
        "  device: Trialstream Simulated Devices TS-BPM-1, serial BPM-00000000, firmware 2.1.0"
    )
    assert lines[2] == "  battery: 100 %"
    assert lines[3] == "  clock: set to the hub's time (UTC)"
    assert recorded(tmp_path) == [
        {
            "address": cuff,
            "sensor": "bp-cuff",
            "profile": "blood_pressure",
            "bonded": True,
            "user": 1,
        }
    ]

    listed = hub(None, tmp_path, "wearables")
    assert listed.stdout.splitlines() == [f"{cuff}  bp-cuff  blood_pressure  bonded  user 1"]
    gone = hub(None, tmp_path, "unpair", "--address", cuff)
    assert gone.returncode == 0, gone.stderr
    assert recorded(tmp_path) == []


async def test_a_wrong_passkey_fails_in_one_line_and_records_nothing(
    radio: RadioProcess, tmp_path: Path
) -> None:
    wrong = f"{(PASSKEY + 1) % 1_000_000:06d}"
    done = hub(
        radio,
        tmp_path,
        "pair",
        "--address",
        radio.addresses[0],
        "--sensor",
        "bp-cuff",
        "--passkey",
        wrong,
    )
    assert error_line(done) == (
        "error: bp-cuff refused the passkey: not the 6 digits it shows (the one given with"
        " --passkey); read them off its display and pair again"
    )
    assert done.stdout == ""
    assert recorded(tmp_path) == []


async def test_without_a_terminal_or_passkey_it_says_to_pass_one(
    radio: RadioProcess, tmp_path: Path
) -> None:
    done = hub(radio, tmp_path, "pair", "--address", radio.addresses[0], "--sensor", "bp-cuff")
    assert error_line(done) == (
        "error: bp-cuff asked for the passkey it shows and got none, and there is no terminal"
        " to type it in: give it with --passkey NNNNNN"
    )
    assert recorded(tmp_path) == []


async def test_just_works_needs_no_passkey_and_names_the_strap_by_its_profile(
    radio: RadioProcess, tmp_path: Path
) -> None:
    strap = radio.addresses[1]
    done = hub(radio, tmp_path, "pair", "--address", strap.lower())
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"paired heart_rate (heart_rate) at {strap}"
    # The strap serves no Current Time.
    assert done.stdout.splitlines()[3] == "  clock: none the hub can set"
    assert recorded(tmp_path) == [
        {"address": strap, "sensor": "heart_rate", "profile": "heart_rate", "bonded": True}
    ]


async def test_the_scan_lists_name_address_signal_and_services(
    radio: RadioProcess, tmp_path: Path
) -> None:
    cuff, strap = radio.addresses
    listed = hub(radio, tmp_path, "pair", "--list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == [
        "wearables in pairing mode, strongest signal first:",
        f"  1  {CUFF_NAME}  {cuff}  -50 dBm  Blood Pressure",
        f"  2  {STRAP_NAME}  {strap}  -50 dBm  Heart Rate",
    ]
    assert not (tmp_path / "state.json").exists()

    unchosen = hub(radio, tmp_path, "pair")
    assert error_line(unchosen) == (
        "error: choose the wearable to pair: give its address with --address"
    )
    assert listed.stdout.splitlines()[1] in unchosen.stdout.splitlines()


@contextlib.contextmanager
def terminal(typed: bytes) -> Iterator[int]:
    """A pseudo-terminal with ``typed`` already typed at it (a line at a time is read);
    yields the end the command reads as its stdin."""
    controller, reader = os.openpty()
    try:
        os.write(controller, typed)
        yield reader
    finally:
        os.close(reader)
        os.close(controller)


async def test_at_a_terminal_it_asks_which_wearable_its_name_and_the_passkey(
    radio: RadioProcess, tmp_path: Path
) -> None:
    cuff = radio.addresses[0]
    with terminal(f"1\nbp-cuff\n{PASSKEY:06d}\n".encode()) as tty:
        done = hub(radio, tmp_path, "pair", stdin=tty)
    assert done.returncode == 0, done.stderr
    assert f"  1  {CUFF_NAME}  {cuff}  -50 dBm  Blood Pressure" in done.stdout
    assert "pair which one? [1-2]: " in done.stderr
    assert "name its readings carry [blood_pressure]: " in done.stderr
    assert "bp-cuff shows a 6-digit passkey; type it here: " in done.stderr
    assert f"paired bp-cuff (blood_pressure) at {cuff}" in done.stdout
    assert [w["sensor"] for w in recorded(tmp_path)] == ["bp-cuff"]


async def test_a_passkey_mistyped_at_the_terminal_is_asked_again(
    radio: RadioProcess, tmp_path: Path
) -> None:
    cuff = radio.addresses[0]
    with terminal(f"31415\n{PASSKEY:06d}\n".encode()) as tty:
        done = hub(radio, tmp_path, "pair", "--address", cuff, "--sensor", "bp", stdin=tty)
    assert done.returncode == 0, done.stderr
    assert "a passkey is the 6 digits (0-9) the wearable shows" in done.stderr
    assert done.stderr.count("type it here: ") == 2
    assert [w["sensor"] for w in recorded(tmp_path)] == ["bp"]


HOSTILE_PASSKEYS = [
    "",
    "12345",
    "1234567",
    "12345a",
    "abcdef",
    "-12345",
    " 123456",
    "123456\n",
    "12 456",
    "１２３４５６",  # fullwidth digits: str.isdigit() and int() take them  # noqa: RUF001
    "١٢٣٤٥٦",  # Arabic-Indic digits
    "0x1E240",
    "1e5",
    "9" * 100_000,
]


@pytest.mark.parametrize("passkey", HOSTILE_PASSKEYS, ids=range(len(HOSTILE_PASSKEYS)))
def test_a_malformed_passkey_is_refused_before_anything_is_sent(
    passkey: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as radio_port:  # a radio that would see any attempt to reach it
        radio_port.bind(("127.0.0.1", 0))
        radio_port.listen()
        radio_port.settimeout(0.2)
        spec = f"tcp-client:127.0.0.1:{radio_port.getsockname()[1]}"
        with pytest.raises(SystemExit) as info:
            hub_cli.main(
                [
                    "pair",
                    "--hub-dir",
                    str(tmp_path),
                    "--simulated-radio",
                    spec,
                    "--address",
                    "C0:5E:00:00:00:01",
                    "--passkey",
                    passkey,
                ]
            )
        with pytest.raises(TimeoutError):
            radio_port.accept()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --passkey: a passkey is the 6 digits (0-9) the wearable shows" in err
    assert len(err) < 1_000  # the value is not echoed back
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--sensor", "", "a sensor name is printable text"),
        ("--sensor", "bp\x1b[2Jcuff", "a sensor name is printable text"),
        ("--sensor", " bp", "a sensor name is printable text"),
        ("--sensor", "x" * 129, "a sensor name is at most 128 bytes"),
        ("--scan-seconds", "0", "seconds from 0.1 to 120"),
        ("--scan-seconds", "nan", "seconds from 0.1 to 120"),
        ("--simulated-radio", "usb:0", "expected tcp-client:HOST:PORT"),
        ("--simulated-radio", "file:/etc/passwd", "expected tcp-client:HOST:PORT"),
        ("--simulated-radio", "tcp-client:127.0.0.1:0", "a TCP port is 1-65535"),
    ],
)
def test_other_malformed_flags_are_refused_too(
    flag: str, value: str, says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        hub_cli.main(["pair", "--hub-dir", str(tmp_path), flag, value])
    assert info.value.code == 2
    assert f"argument {flag}: {says}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_passkey_is_for_the_hubs_own_stack_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = hub_cli.main(["pair", "--hub-dir", str(tmp_path), "--passkey", "123456"])
    assert code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: --passkey is answered by the hub's own Bluetooth host")
    assert list(tmp_path.iterdir()) == []
