"""A private Mosquitto started from the project's own configuration (deploy/mosquitto/).

Tests and the demo use it: the durable settings of ``deploy/mosquitto/mosquitto.conf`` pass
through unchanged; only the listener (a free loopback port) and the file paths (a working
directory) are rewritten. The process can be killed with SIGKILL and started again on the
same port and persistence file, which is what the fault tests do.

Without ``tls`` the broker listens on loopback without certificates and without the ACL
(identities come from certificates): a development mode only, never exposed beyond 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from gateway.errors import BrokerError
from ingest.transport import TlsFiles

log = logging.getLogger(__name__)

DEPLOY_DIR = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto"
# How long a broker may take to load its persistence file and open its port.
START_TIMEOUT_S = 10.0

_TLS_KEYS = (
    "cafile",
    "certfile",
    "keyfile",
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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def render_config(template: str, *, port: int, workdir: Path, tls: TlsFiles | None) -> str:
    """The deploy config with its listener and paths pointed at ``port`` and ``workdir``."""
    out: list[str] = []
    for line in template.splitlines():
        stripped = line.strip()
        key = stripped.split(None, 1)[0] if stripped and not stripped.startswith("#") else ""
        if key == "listener":
            out.append(f"listener {port} 127.0.0.1")
        elif key == "persistence_location":
            out.append(f"persistence_location {workdir}/")
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
        deploy_dir: Path = DEPLOY_DIR,
        binary: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.tls = tls
        self._deploy_dir = deploy_dir
        self._binary = find_mosquitto(binary)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

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
            render_config(template, port=self.port, workdir=self.workdir, tls=self.tls),
            encoding="utf-8",
        )
        self._proc = subprocess.Popen(  # noqa: S603 - fixed binary, our own config
            [self._binary, "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                if self._proc.stderr:
                    self._proc.stderr.close()
                lines = (err + "\n" + self._log_tail()).splitlines()
                errors = [ln.split(": ", 1)[-1] for ln in lines if "Error" in ln] or lines[-1:]
                raise BrokerError(
                    f"mosquitto exited with status {self._proc.returncode}: {'; '.join(errors)}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    log.info("mosquitto ready port=%d pid=%d", self.port, self._proc.pid)
                    return
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise BrokerError(f"mosquitto did not open port {self.port} within {timeout:.0f} s")

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-500:]
        except OSError:
            return ""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.poll() is None else None

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
