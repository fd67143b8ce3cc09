"""A private RabbitMQ node with its MQTT plugin, for tests, benchmarks and the cluster harness.

Its configuration is deploy/rabbitmq/ (what a production node gets) with its listeners and
files rewritten (``render_config``). It never touches the machine's own RabbitMQ: its own
node name, ports, data directory, configuration, plugins file and Erlang cookie, and the
server's scripts are called directly (``/usr/lib/rabbitmq/bin``), not through Debian's
wrappers, which switch to the system node's user and cookie. Hubs speak MQTT 3.1.1 to its
MQTT listener; envelopes published to ``dct/v1/<device>/up`` arrive on ``amq.topic`` with
the routing key ``dct.v1.<device>.up`` (docs/scaling.md). Stopped by its process group,
whose id it keeps.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from gateway.broker import free_port
from gateway.errors import BrokerError
from gateway.processes import attempts, log_tail, side_by_side, signal_group, stop_group
from ingest.transport import TlsFiles
from ingest.wire import DEVICE_ID_RE

log = logging.getLogger(__name__)

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
DEPLOY_DIR = Path(__file__).resolve().parent.parent / "deploy" / "rabbitmq"
# The deploy config's TLS settings: kept for a node given TLS files, dropped for one without.
_TLS_FILES = {
    "ssl_options.cacertfile": "cafile",
    "ssl_options.certfile": "certfile",
    "ssl_options.keyfile": "keyfile",
}
_TLS_ONLY = ("ssl_options.", "mqtt.listeners.ssl.", "mqtt.ssl_cert_login", "ssl_cert_login_from")
START_TIMEOUT_S = 60.0
CTL_TIMEOUT_S = 30.0
MAX_MESSAGE_BYTES = 1024 * 1024
TOPIC_EXCHANGE: Final = "amq.topic"


def find_rabbitmq(bin_dir: Path = RABBITMQ_BIN) -> Path:
    """The directory of RabbitMQ's own scripts, or BrokerError saying what to install."""
    if not (bin_dir / "rabbitmq-server").is_file():
        raise BrokerError(
            f"RabbitMQ is not installed ({bin_dir}/rabbitmq-server is missing):"
            " apt-get install rabbitmq-server (scripts/bootstrap does, as root)"
        )
    return bin_dir


def _check_device_id(device_id: str) -> None:
    if DEVICE_ID_RE.fullmatch(device_id) is None:
        raise BrokerError(f"not a device id: {device_id[:70]!r}")


@dataclass(frozen=True, slots=True)
class HubPermissions:
    """What a hub may do on RabbitMQ, as regular expressions: configure, write and read its
    own MQTT subscription queues (and write and read ``amq.topic``), and on ``amq.topic``
    publish only to its own ``up`` routing key and read only its own ``down`` one."""

    configure: str
    write: str
    read: str
    topic_write: str
    topic_read: str


def hub_permissions(device_id: str) -> HubPermissions:
    """The hub's permissions; the id is checked first (it becomes part of the patterns)."""
    _check_device_id(device_id)
    escaped = device_id.replace(".", r"\.")
    own_queues = rf"^mqtt-subscription-{escaped}qos[01]$"
    return HubPermissions(
        own_queues,
        rf"^amq\.topic$|{own_queues}",
        rf"^amq\.topic$|{own_queues}",
        rf"^dct\.v1\.{escaped}\.up$",
        rf"^dct\.v1\.{escaped}\.down$",
    )


def render_config(
    template: str,
    *,
    amqp_port: int,
    mqtt_port: int,
    tls: TlsFiles | None = None,
    mqtts_port: int | None = None,
    management_port: int | None = None,
) -> str:
    """deploy/rabbitmq/rabbitmq.conf for a private node: its listeners on loopback ports of
    its own, the certificate paths its own (TLS settings dropped without ``tls``), the
    management API only with ``management_port``; plus what only a private node has, MQTT
    over plain TCP on loopback, where tests and benchmarks log in with passwords."""
    out: list[str] = []
    for line in template.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            out.append(line)
            continue
        key = stripped.partition("=")[0].strip()
        if key == "listeners.tcp.default":
            out.append(f"listeners.tcp.default = 127.0.0.1:{amqp_port}")
        elif key.startswith(_TLS_ONLY):
            if tls is None:
                continue
            if key.startswith("mqtt.listeners.ssl."):
                out.append(f"{key} = 127.0.0.1:{mqtts_port}")
            elif key in _TLS_FILES:
                out.append(f"{key} = {getattr(tls, _TLS_FILES[key])}")
            else:
                out.append(line)
        elif key == "management.tcp.port":
            if management_port is not None:
                out.append(
                    f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {management_port}"
                )
        else:
            out.append(line)
    out.append(f"mqtt.listeners.tcp.default = 127.0.0.1:{mqtt_port}")
    out.append("loopback_users = none")
    return "\n".join(out) + "\n"


def render_plugins(template: str, *, management: bool) -> str:
    """deploy/rabbitmq/enabled_plugins, without the management plugin unless asked for."""
    names = [n.strip() for n in template.strip().strip("[].").split(",") if n.strip()]
    if not management:
        names = [n for n in names if n != "rabbitmq_management"]
    return f"[{','.join(names)}].\n"


class RabbitNode:
    """One RabbitMQ node in ``directory``: AMQP on ``amqp_port``, MQTT on ``mqtt_port``, both
    on 127.0.0.1; distribution on a free port of its own, bound to loopback too."""

    def __init__(
        self,
        directory: Path,
        name: str | None = None,
        bin_dir: Path = RABBITMQ_BIN,
        *,
        cookie: str | None = None,
        tls: TlsFiles | None = None,
        management: bool = False,
        deploy_dir: Path = DEPLOY_DIR,
    ):
        self.bin_dir = find_rabbitmq(bin_dir)
        self.deploy_dir = deploy_dir
        # With ``tls``: MQTT over TLS on ``mqtts_port`` too, hubs logging in by their client
        # certificate alone (its common name is the user: their device id).
        self.tls = tls
        self.mqtts_port = free_port() if tls is not None else None
        # With ``management``: the HTTP management API (``management_url``), through which
        # the gateway keeps hubs' broker identities (gateway.rabbit_admin).
        self.management_port = free_port() if management else None
        self.directory = directory
        self.name = name or f"ts{os.getpid()}x{secrets.token_hex(3)}@localhost"
        # Nodes of one cluster share their Erlang cookie; a lone node makes its own.
        self.cookie = cookie or secrets.token_hex(16).upper()
        self.amqp_port = free_port()
        self.mqtt_port = free_port()
        self.dist_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def management_url(self) -> str | None:
        if self.management_port is None:
            return None
        return f"http://guest:guest@127.0.0.1:{self.management_port}/"

    @property
    def log_path(self) -> Path:
        return self.directory / "node.log"

    def _env(self) -> dict[str, str]:
        d = self.directory
        return {
            **os.environ,
            "HOME": str(d / "home"),  # the cookie: $HOME/.erlang.cookie
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_CONFIG_FILES": str(d / "conf.d"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(d / "node.pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def _write_files(self) -> None:
        d = self.directory
        for sub in ("home", "mnesia", "log", "conf.d"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        cookie = d / "home" / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(self.cookie)
            cookie.chmod(0o400)
        (d / "rabbitmq-env.conf").write_text("")
        (d / "advanced.config").write_text("[].\n")
        (d / "enabled_plugins").write_text(
            render_plugins(
                (self.deploy_dir / "enabled_plugins").read_text(),
                management=self.management_port is not None,
            )
        )
        (d / "rabbitmq.conf").write_text(
            render_config(
                (self.deploy_dir / "rabbitmq.conf").read_text(),
                amqp_port=self.amqp_port,
                mqtt_port=self.mqtt_port,
                tls=self.tls,
                mqtts_port=self.mqtts_port,
                management_port=self.management_port,
            )
        )

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start the node and return once its applications and plugins run."""
        self._write_files()
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(  # noqa: S603 - fixed script, our own files
                [str(self.bin_dir / "rabbitmq-server")],
                env=self._env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        for _ in attempts(timeout, 0.2):
            if self.process.poll() is not None:
                raise BrokerError(f"RabbitMQ node {self.name} exited: {log_tail(self.log_path)}")
            if (self.directory / "node.pid").exists():
                done = self.ctl(
                    "wait", str(self.directory / "node.pid"), "--timeout", "5", check=False
                )
                if done.returncode == 0:
                    break
        else:
            self.kill()
            raise BrokerError(f"RabbitMQ node {self.name} not up in {timeout:.0f} s")
        log.info(
            "rabbitmq ready node=%s amqp=%d mqtt=%d", self.name, self.amqp_port, self.mqtt_port
        )

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n <node> args``; with ``check``, a failure is BrokerError. One
        that does not return within ``CTL_TIMEOUT_S`` (its own Erlang VM starting on a busy
        machine) fails with status 124, as timeout(1) says it."""
        command = [str(self.bin_dir / "rabbitmqctl"), "-n", self.name, *args]
        try:
            done = subprocess.run(  # noqa: S603 - fixed script, our own arguments
                command,
                env=self._env(),
                capture_output=True,
                text=True,
                timeout=CTL_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            done = subprocess.CompletedProcess(
                command, 124, "", f"rabbitmqctl {args[0]}: no answer in {CTL_TIMEOUT_S:.0f} s"
            )
        if check and done.returncode != 0:
            raise BrokerError(f"rabbitmqctl {args[0]} failed: {done.stderr.strip()[-500:]}")
        return done

    def add_user(self, user: str, password: str) -> None:
        """A login of the node's (the cluster's: users are shared). ``--`` ends rabbitmqctl's
        options first: a password drawn from ``secrets.token_urlsafe`` starts with ``-``
        once in 64 and would otherwise be refused as an unknown option."""
        self.ctl("add_user", "--", user, password)

    def add_hub(self, device_id: str, password: str | None = None) -> None:
        """A hub's broker identity (``hub_permissions``). Without a password the hub can log
        in only by its certificate (a node with ``tls``)."""
        allowed = hub_permissions(device_id)
        self.add_user(device_id, password or secrets.token_urlsafe(32))
        if password is None:
            self.ctl("clear_password", device_id)
        self.ctl("set_permissions", device_id, allowed.configure, allowed.write, allowed.read)
        self.ctl(
            "set_topic_permissions",
            device_id,
            TOPIC_EXCHANGE,
            allowed.topic_write,
            allowed.topic_read,
        )

    def remove_hub(self, device_id: str, reason: str = "hub revoked") -> None:
        """Withdraw a hub's broker identity: it cannot log in again, and every connection it
        holds is closed. RabbitMQ 3.10 closes a deleted user's connections itself (seen in
        tests/gateway/test_rabbitmq_tls.py); any still open are closed with ``reason``."""
        _check_device_id(device_id)
        self.ctl("delete_user", device_id)
        self.ctl("close_all_user_connections", device_id, reason)

    def kill(self) -> None:
        """kill -9 the node (its whole process group)."""
        signal_group(self.process, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=10)

    def stop(self, timeout: float = 20.0) -> None:
        stop_group(self.process, timeout)


class RabbitCluster:
    """``size`` RabbitMQ nodes on this machine joined into one cluster: each a
    :class:`RabbitNode` with its own ports and files and the cluster's one cookie, the
    others joined to the first. Quorum queues declared on it have a member on every node."""

    def __init__(self, directory: Path, size: int = 3, bin_dir: Path = RABBITMQ_BIN) -> None:
        if size < 1:
            raise ValueError("a cluster has at least one node")
        cookie = secrets.token_hex(16).upper()
        stem = f"ts{os.getpid()}c{secrets.token_hex(2)}"
        self.nodes = [
            RabbitNode(directory / f"n{i}", f"{stem}n{i}@localhost", bin_dir, cookie=cookie)
            for i in range(size)
        ]

    @property
    def amqp_urls(self) -> list[str]:
        return [n.amqp_url for n in self.nodes]

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start every node (side by side), then join the others to the first."""
        try:
            side_by_side(*(functools.partial(n.start, timeout) for n in self.nodes))
        except BaseException:
            self.stop()
            raise
        first = self.nodes[0]
        try:
            for node in self.nodes[1:]:
                node.ctl("stop_app")
                node.ctl("join_cluster", first.name)
                node.ctl("start_app")
                node.ctl("await_startup")
        except BrokerError:
            self.stop()
            raise
        log.info("rabbitmq cluster ready nodes=%s", ",".join(n.name for n in self.nodes))

    def running(self) -> list[RabbitNode]:
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl`` on the first node still running (cluster-wide commands)."""
        return self.first_running().ctl(*args, check=check)

    def first_running(self) -> RabbitNode:
        """The first node still running: cluster-wide commands (users, policies) go there."""
        alive = self.running()
        if not alive:
            raise BrokerError("no node of the cluster is running")
        return alive[0]

    def add_user(self, user: str, password: str) -> None:
        """A login on every node (users are the cluster's)."""
        self.first_running().add_user(user, password)

    def add_hub(self, device_id: str, password: str) -> None:
        """The hub's identity, on every node (users are the cluster's)."""
        self.first_running().add_hub(device_id, password)

    def leader(self, queue: str) -> RabbitNode:
        """The node that leads quorum queue ``queue`` now."""
        out = self.ctl("list_queues", "name", "leader", "--quiet", "--no-table-headers").stdout
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == queue:
                for node in self.nodes:
                    if node.name == parts[1]:
                        return node
        raise BrokerError(f"no leader of queue {queue!r} in {out[-300:]!r}")

    def stop(self) -> None:
        """Stop every node it started, each by its own process group."""
        for node in self.nodes:
            node.stop()
