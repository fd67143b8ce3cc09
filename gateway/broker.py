"""A private Mosquitto started from the project's own configuration (deploy/mosquitto/).

Tests and the demo use it: the durable settings of ``deploy/mosquitto/mosquitto.conf`` pass
through unchanged; only the listener (a free loopback port) and the file paths (a working
directory) are rewritten. The process can be killed with SIGKILL and started again on the
same port and persistence file, which is what the fault tests do.

Without ``tls`` the broker listens on loopback without certificates and without the ACL
(identities come from certificates): a development mode only, never exposed beyond 127.0.0.1.
With ``tls`` and a ``crlfile`` (the study CA's CRL) the broker refuses revoked hubs' TLS
handshakes; it reads the CRL at start and again on SIGHUP (``reload``).

Telling a running broker about a revocation (``gateway/revocation.py`` uses these):
``reload_broker`` (SIGHUP to the pid in a pid file, or an operator's command such as
``systemctl reload mosquitto``), ``handshake_refused`` (does the broker refuse a
certificate?) and ``end_session`` (take over a client's MQTT session, which ends its open
connection). See docs/broker.md, "Revocation".
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
from pathlib import Path

from paho.mqtt.reasoncodes import ReasonCode

from gateway.errors import BrokerError
from gateway.processes import alive, attempts, log_tail
from ingest.transport import TlsFiles, configure_tls, make_client, stop_client

log = logging.getLogger(__name__)

DEPLOY_DIR = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto"
# How long a broker may take to load its persistence file and open its port.
START_TIMEOUT_S = 10.0

_TLS_KEYS = (
    "cafile",
    "certfile",
    "keyfile",
    "crlfile",
    "require_certificate",
    "use_identity_as_username",
    "tls_version",
)


def find_mosquitto(explicit: str | None = None) -> str:
    """Path of the mosquitto binary (``explicit``, else from PATH), or ``BrokerError`` saying
    how to get one."""
    if explicit:
        if os.access(explicit, os.X_OK) and Path(explicit).is_file():
            return explicit
        raise BrokerError(
            f"the mosquitto binary {explicit!r} (TRIALSTREAM_MOSQUITTO) is not an executable file"
        )
    found = shutil.which("mosquitto")
    if found:
        return found
    raise BrokerError(
        "mosquitto not found on PATH: install it with `apt-get install mosquitto` "
        "or set TRIALSTREAM_MOSQUITTO to its path"
    )


# Ports handed out by ``free_port`` come from below the kernel's ephemeral range: one taken
# there (binding port 0) is free only until the next outgoing connection of any process on
# the machine gets it as its local port, which, between picking a broker's port and the
# broker binding it, happened under load (a RabbitMQ node failing with
# could_not_start_listener).
PORT_FLOOR = 20_000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()
# Another process drawing from the same range (a second test worker, a benchmark, the
# cluster harness in a child process) can pick the same port before either server binds it
# (a RabbitMQ node failing with could_not_start_listener under two test workers): each port
# handed out is claimed machine-wide by a file named after it holding the claimer's pid,
# valid while that process lives.
PORT_CLAIMS = Path(tempfile.gettempdir()) / "trialstream-port-claims"


def _ephemeral_low() -> int:
    """The lowest port the kernel gives outgoing connections (Linux's default: 32768)."""
    try:
        first = _EPHEMERAL_RANGE.read_text()[:32].split()[0]
        return int(first) if first.isdigit() and len(first) <= 5 else 32_768
    except (OSError, IndexError):
        return 32_768


def _claim(port: int) -> bool:
    """Claim ``port`` for this process, machine-wide; False when a living process holds it.
    Claims are read and written under one exclusive lock (a reader could otherwise see a
    claim half written, take it for a dead process's and take it over); a claim whose
    process is gone, or that holds no pid, is taken over."""
    PORT_CLAIMS.mkdir(parents=True, exist_ok=True)
    with open(PORT_CLAIMS / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        path = PORT_CLAIMS / str(port)
        try:
            text = path.read_text()[:16]
        except FileNotFoundError:
            text = ""
        if text.isdigit() and alive(int(text)):
            return False
        path.write_text(str(os.getpid()))
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, for a server about to be started: a random one below
    the kernel's ephemeral range, never one this process or another living one handed out
    before (``PORT_CLAIMS``), bound once to check it is free. Where that range leaves no
    room, one the kernel picks."""
    low = _ephemeral_low()
    if low - PORT_FLOOR >= 1_000:
        for _ in range(100):
            port = random.randrange(PORT_FLOOR, low)  # noqa: S311 - spreading, not secrecy
            with _handed_out_lock:
                if port in _handed_out or not _claim(port):
                    continue
                _handed_out.add(port)
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    try:
                        s.bind((host, port))
                    except OSError:
                        continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def render_config(
    template: str,
    *,
    port: int,
    workdir: Path,
    tls: TlsFiles | None,
    crlfile: Path | None = None,
) -> str:
    """The deploy config with its listener and paths pointed at ``port`` and ``workdir``.

    ``crlfile`` replaces the template's (a broker with TLS but without a CRL has none)."""
    out: list[str] = []
    for line in template.splitlines():
        stripped = line.strip()
        key = stripped.split(None, 1)[0] if stripped and not stripped.startswith("#") else ""
        if key == "listener":
            out.append(f"listener {port} 127.0.0.1")
        elif key == "persistence_location":
            out.append(f"persistence_location {workdir}/")
        elif key == "pid_file":
            out.append(f"pid_file {workdir / 'mosquitto.pid'}")
        elif key == "acl_file":
            if tls is not None:
                out.append(f"acl_file {workdir / 'acl'}")
        elif key == "allow_anonymous" and tls is None:
            out.append("allow_anonymous true")
        elif key in _TLS_KEYS:
            if tls is None:
                continue
            if key in ("cafile", "certfile", "keyfile"):
                out.append(f"{key} {getattr(tls, key)}")
            elif key == "crlfile":
                if crlfile is not None:
                    out.append(f"crlfile {crlfile}")
            else:
                out.append(line)
        else:
            out.append(line)
    out.append(f"log_dest file {workdir / 'mosquitto.log'}")
    out.append("log_type error\nlog_type warning\nlog_type notice\nlog_type information")
    if os.geteuid() == 0:
        # Started as root, mosquitto switches to the "mosquitto" user, which cannot write a
        # private working directory; stay as the invoking user instead.
        out.append("user root")
    return "\n".join(out) + "\n"


class MosquittoBroker:
    """One private broker process; ``kill()`` and ``start()`` again keep port and persistence."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        tls: TlsFiles | None = None,
        crlfile: Path | None = None,
        deploy_dir: Path = DEPLOY_DIR,
        binary: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.tls = tls
        self.crlfile = crlfile
        self._deploy_dir = deploy_dir
        self._binary = find_mosquitto(binary)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def pid_path(self) -> Path:
        """Written by mosquitto itself (``pid_file``) while it runs."""
        return self.workdir / "mosquitto.pid"

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        template_path = self._deploy_dir / "mosquitto.conf"
        try:
            template = template_path.read_text(encoding="utf-8")
            self.workdir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self._deploy_dir / "acl", self.workdir / "acl")
        except OSError as exc:
            raise BrokerError(
                f"cannot prepare the broker config from {template_path}: {exc}"
            ) from exc
        self.config_path.write_text(
            render_config(
                template,
                port=self.port,
                workdir=self.workdir,
                tls=self.tls,
                crlfile=self.crlfile,
            ),
            encoding="utf-8",
        )
        self._proc = subprocess.Popen(  # noqa: S603 - fixed binary, our own config
            [self._binary, "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for _ in attempts(timeout, 0.05):
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                if self._proc.stderr:
                    self._proc.stderr.close()
                lines = (err + "\n" + log_tail(self.log_path, 500)).splitlines()
                errors = [ln.split(": ", 1)[-1] for ln in lines if "Error" in ln] or lines[-1:]
                raise BrokerError(
                    f"mosquitto exited with status {self._proc.returncode}: {'; '.join(errors)}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=0.2),
            ):
                log.info("mosquitto ready port=%d pid=%d", self.port, self._proc.pid)
                return
        self.kill()
        raise BrokerError(f"mosquitto did not open port {self.port} within {timeout:.0f} s")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.poll() is None else None

    def reload(self) -> None:
        """SIGHUP: mosquitto re-reads its config, certificates and CRL (new connections)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGHUP)

    def kill(self) -> None:
        """SIGKILL: no chance to save; what it held since the last autosave is gone."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its persistence file and exits."""
        self._signal(signal.SIGTERM)

    def _signal(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def restart(self) -> None:
        self.stop()
        self.start()


def reload_broker(*, pid_file: Path | None, command: str | None) -> str:
    """Make a running broker re-read its config and CRL; returns what was done.

    ``command`` (e.g. ``systemctl reload mosquitto``) wins; else SIGHUP goes to the pid in
    ``pid_file`` (mosquitto's own ``pid_file``). ``BrokerError`` if neither is given or
    the reload fails: the caller must say the broker does not know yet.
    """
    if command:
        argv = shlex.split(command)
        try:
            done = subprocess.run(  # noqa: S603 - the operator's own configured command
                argv, capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BrokerError(f"the broker reload command {command!r} failed: {exc}") from exc
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
            raise BrokerError(
                f"the broker reload command {command!r} exited with status "
                f"{done.returncode}: {detail[0]}"
            )
        return f"ran {command!r}"
    if pid_file is None:
        raise BrokerError(
            "no way to reload the broker is configured: set TRIALSTREAM_BROKER_RELOAD "
            "(e.g. 'systemctl reload mosquitto') or TRIALSTREAM_BROKER_PID_FILE"
        )
    try:
        pid = int(pid_file.read_text(encoding="ascii").strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        raise BrokerError(f"cannot send SIGHUP to the broker in {pid_file}: {exc}") from exc
    return f"sent SIGHUP to pid {pid} ({pid_file})"


def handshake_refused(host: str, port: int, files: TlsFiles, *, timeout: float = 2.0) -> bool:
    """Whether the broker refuses a TLS handshake with the certificate in ``files``.

    True when the broker rejects the certificate (an alert, or the connection closed);
    False when it accepts it and waits for an MQTT CONNECT. ``OSError`` when the broker
    cannot be reached at all, which says nothing about the certificate.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files.cafile))
    ctx.load_cert_chain(str(files.certfile), str(files.keyfile))
    with socket.create_connection((host, port), timeout=timeout) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                # TLS 1.3 reports a refused client certificate only after the handshake.
                tls.settimeout(min(timeout, 0.5))
                try:
                    return tls.recv(1) == b""
                except TimeoutError:
                    return False
        except (ssl.SSLError, ConnectionError):
            return True


def end_session(
    host: str, port: int, files: TlsFiles, client_id: str, *, timeout: float = 5.0
) -> None:
    """End the connection and the session of the client ``client_id``.

    Mosquitto 2.0 keeps a connection whose certificate a reloaded CRL revokes (the CRL is
    checked at the TLS handshake only). A second connection with the same client id takes
    the session over: the broker disconnects the first (MQTT 5 reason 0x8E, "session taken
    over"). Connecting with a clean start and a session expiry of 0, then disconnecting,
    leaves no session behind either. ``files`` must be a certificate the broker accepts
    (the gateway's).
    """
    client = make_client(client_id)
    configure = configure_tls(files)
    assert configure is not None
    configure(client)
    connected = threading.Event()
    result: list[ReasonCode] = []

    def on_connect(_c: object, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        result.append(rc)
        connected.set()

    client.on_connect = on_connect
    try:
        client.connect(host, port, clean_start=True)
    except (OSError, ssl.SSLError) as exc:
        stop_client(client)
        raise BrokerError(f"cannot reach the broker at {host}:{port}: {exc}") from exc
    client.loop_start()
    try:
        if not connected.wait(timeout):
            raise BrokerError(f"the broker did not answer CONNECT within {timeout:.0f} s")
        if result[0].is_failure:
            raise BrokerError(f"the broker refused the session take-over: {result[0]}")
    finally:
        stop_client(client)
