"""A PostgreSQL primary and its synchronous standby under Patroni, with etcd, on this machine
(docs/scaling.md): what the scaling tests and the cluster harness start.

- :class:`EtcdNode`: one etcd member on loopback ports of its own (the DCS Patroni keeps its
  leader key in).
- :class:`PatroniCluster`: ``size`` Patroni nodes (Debian's ``patroni``, the server's own
  PostgreSQL binaries), each its own data directory, PostgreSQL port and REST port, in
  synchronous mode (a commit waits for the standby while one is there; with two nodes the
  mode is not strict, so a lone survivor still takes writes). Patroni and PostgreSQL run as
  the ``postgres`` user when this process is root (initdb refuses root), else as this user.
- ``dsn()``: the multi-host connection string that finds the writable node
  (``target_session_attrs=read-write``) with a short ``connect_timeout`` per host.
- ``primary().kill()``: kill -9 the leader's Patroni and its postmaster, as a host lost;
  ``wait_for_primary`` then returns the node that took over once it takes writes.

Every process it starts it stops by its own process group (and the postmaster by the pid in
its data directory, since Patroni starts it in a session of its own).
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Final

from gateway.broker import free_port
from gateway.errors import GatewayError
from gateway.processes import attempts, log_tail, signal_group, stop_group

log = logging.getLogger(__name__)

PG_BIN_DIR: Final = Path("/usr/lib/postgresql/15/bin")
START_TIMEOUT_S: Final = 60.0
# Patroni's clock: the leader key lives ``TTL_S``; a lost leader is replaced after about that.
TTL_S: Final = 20
LOOP_WAIT_S: Final = 2
RETRY_TIMEOUT_S: Final = 5


class ClusterError(GatewayError):
    """A part of the database cluster could not be started or did not answer."""


def _need(binary: str, package: str) -> str:
    found = shutil.which(binary)
    if found is None:
        raise ClusterError(
            f"{binary} is not installed: apt-get install {package}"
            " (scripts/bootstrap does, as root)"
        )
    return found


class EtcdNode:
    """One etcd member in ``directory`` on free loopback ports."""

    def __init__(self, directory: Path) -> None:
        self.binary = _need("etcd", "etcd-server")
        self.directory = directory
        self.client_port = free_port()
        self.peer_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        with (self.directory / "etcd.log").open("ab") as out:
            self.process = subprocess.Popen(  # noqa: S603 - fixed binary, our own arguments
                [
                    self.binary,
                    "--name=e0",
                    f"--data-dir={self.directory / 'data'}",
                    f"--listen-client-urls={client}",
                    f"--advertise-client-urls={client}",
                    f"--listen-peer-urls={peer}",
                    f"--initial-advertise-peer-urls={peer}",
                    f"--initial-cluster=e0={peer}",
                    f"--initial-cluster-token=ts-{secrets.token_hex(4)}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        for _ in attempts(timeout, 0.1):
            if _http_ok(f"{client}/health"):
                return
            if self.process.poll() is not None:
                break
        self.stop()
        raise ClusterError(f"etcd did not start: {log_tail(self.directory / 'etcd.log', 600)}")

    def stop(self) -> None:
        stop_group(self.process, 10)


class PatroniNode:
    """One Patroni-managed PostgreSQL in ``directory``."""

    def __init__(self, directory: Path, name: str, scope: str, etcd: EtcdNode) -> None:
        self.binary = _need("patroni", "patroni")
        self.directory = directory
        self.name = name
        self.scope = scope
        self.etcd = etcd
        self.pg_port = free_port()
        self.rest_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    def _config(self) -> dict[str, object]:
        return {
            "scope": self.scope,
            "namespace": "/trialstream/",
            "name": self.name,
            "restapi": {
                "listen": f"127.0.0.1:{self.rest_port}",
                "connect_address": f"127.0.0.1:{self.rest_port}",
            },
            "etcd3": {"hosts": self.etcd.endpoint},
            "bootstrap": {
                "dcs": {
                    "ttl": TTL_S,
                    "loop_wait": LOOP_WAIT_S,
                    "retry_timeout": RETRY_TIMEOUT_S,
                    "maximum_lag_on_failover": 1048576,
                    "synchronous_mode": True,
                    "postgresql": {
                        "use_pg_rewind": False,
                        "parameters": {"wal_level": "replica", "max_wal_senders": 5},
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"auth": "trust"}],
                "pg_hba": [
                    "local all all trust",
                    "host all all 127.0.0.1/32 trust",
                    "host replication all 127.0.0.1/32 trust",
                ],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{self.pg_port}",
                "connect_address": f"127.0.0.1:{self.pg_port}",
                "data_dir": str(self.data_dir),
                "bin_dir": str(PG_BIN_DIR),
                "pgpass": str(self.directory / "pgpass"),
                "authentication": {
                    "superuser": {"username": "postgres", "password": "postgres"},
                    "replication": {"username": "replicator", "password": "replicator"},
                },
                "parameters": {"unix_socket_directories": str(self.directory)},
            },
        }

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "patroni.yml"
        config.write_text(json.dumps(self._config(), indent=2))  # JSON is YAML
        command = [self.binary, str(config)]
        if os.geteuid() == 0:  # initdb refuses root: Patroni and PostgreSQL as postgres
            account = pwd.getpwnam("postgres")
            for path in (self.directory, config):
                os.chown(path, account.pw_uid, account.pw_gid)
            command = ["runuser", "-u", "postgres", "--", *command]
        with (self.directory / "patroni.log").open("ab") as out:
            self.process = subprocess.Popen(  # noqa: S603 - fixed binaries, our own files
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def role(self) -> str | None:
        """``primary``, ``replica`` or None (not answering), from Patroni's REST API."""
        for role in ("primary", "replica"):
            if _http_ok(f"http://127.0.0.1:{self.rest_port}/{role}"):
                return role
        return None

    def writable(self) -> bool:
        """Whether its PostgreSQL answers and is out of recovery."""
        import psycopg

        try:
            with psycopg.connect(
                f"host=127.0.0.1 port={self.pg_port} user=postgres dbname=postgres"
                " connect_timeout=2",
                autocommit=True,
            ) as conn:
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        except psycopg.Error:
            return False
        return row is not None and row[0] is False

    def kill(self) -> None:
        """kill -9 Patroni and its postmaster (a host lost)."""
        signal_group(self.process, signal.SIGKILL)
        pid_file = self.data_dir / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split("\n", 1)[0])
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass
        if self.process is not None:
            self.process.wait(timeout=10)

    def stop(self) -> None:
        signal_group(self.process, signal.SIGTERM)
        if self.process is None:
            return
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()  # the postmaster too, which is not in Patroni's group


class PatroniCluster:
    """etcd and ``size`` Patroni nodes in a directory of their own (readable by postgres)."""

    def __init__(self, size: int = 2) -> None:
        if size < 2:
            raise ValueError("a primary and at least one standby")
        if os.geteuid() == 0:
            _need("runuser", "util-linux")
        self.directory = Path(tempfile.mkdtemp(prefix="trialstream-patroni-"))
        self.directory.chmod(0o755)
        scope = f"ts{os.getpid()}{secrets.token_hex(2)}"
        self.etcd = EtcdNode(self.directory / "etcd")
        self.nodes = [
            PatroniNode(self.directory / f"pg{i}", f"pg{i}", scope, self.etcd) for i in range(size)
        ]

    def dsn(self, dbname: str = "postgres") -> str:
        hosts = ",".join("127.0.0.1" for _ in self.nodes)
        ports = ",".join(str(n.pg_port) for n in self.nodes)
        return (
            f"host={hosts} port={ports} user=postgres dbname={dbname} "
            "target_session_attrs=read-write connect_timeout=2"
        )

    def start(self, timeout: float = START_TIMEOUT_S * 2) -> None:
        """etcd, then every node; return once the primary has its synchronous standby and
        every other node replicates."""
        self.etcd.start()
        for node in self.nodes:
            node.start()
        for _ in attempts(timeout, 0.5):
            if self.synchronous():
                break
        else:
            logs = "; ".join(log_tail(n.directory / "patroni.log", 600) for n in self.nodes)
            self.stop()
            raise ClusterError(f"no primary and replicas in {timeout:.0f} s: {logs}")
        log.info("patroni cluster ready primary=%s", self.primary().name)

    def members(self) -> dict[str, str]:
        """Each node's role as Patroni's cluster view says (leader, sync_standby, replica)."""
        for node in self.nodes:
            view = _http_json(f"http://127.0.0.1:{node.rest_port}/cluster")
            if isinstance(view, dict) and isinstance(view.get("members"), list):
                return {
                    str(m.get("name")): str(m.get("role"))
                    for m in view["members"]
                    if isinstance(m, dict) and m.get("state") in ("running", "streaming")
                }
        return {}

    def synchronous(self) -> bool:
        """Whether there is a leader, a synchronous standby (a commit waits until it has
        it) and every other node replicating (Patroni keeps one standby synchronous)."""
        roles = sorted(self.members().values())
        return roles == sorted(["leader", "sync_standby", *["replica"] * (len(self.nodes) - 2)])

    def set_synchronous(self, on: bool, timeout: float = 30.0) -> None:
        """Turn Patroni's synchronous mode on or off (its dynamic configuration, through
        the REST API) and return once the primary's ``synchronous_standby_names`` says so:
        off, a commit waits for the primary's own disk only and the standby follows."""
        import psycopg

        self._patch_config({"synchronous_mode": on})
        for _ in attempts(timeout, 0.5):
            with psycopg.connect(self.dsn(), autocommit=True) as conn:
                row = conn.execute("SHOW synchronous_standby_names").fetchone()
            if row is not None and (row[0] != "") == on and (not on or self.synchronous()):
                return
        raise ClusterError(f"synchronous mode not {'on' if on else 'off'} in {timeout:.0f} s")

    def set_maintenance(self, on: bool, timeout: float = 30.0) -> None:
        """Patroni's maintenance mode ("pause") on or off, returned once every node says it
        sees it. Paused, Patroni leaves PostgreSQL alone: no failover, and a standby's WAL
        replay held by hand stays held (unpaused, each HA loop resumes it)."""
        self._patch_config({"pause": on})
        for _ in attempts(timeout, 0.2):
            views = [_http_json(f"http://127.0.0.1:{n.rest_port}/patroni") for n in self.nodes]
            if all(isinstance(v, dict) and bool(v.get("pause", False)) == on for v in views):
                return
        raise ClusterError(f"maintenance mode not {'on' if on else 'off'} in {timeout:.0f} s")

    def _patch_config(self, change: dict[str, object]) -> None:
        """Change Patroni's dynamic configuration through the primary's REST API."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.primary().rest_port}/config",
            data=json.dumps(change).encode(),
            method="PATCH",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310
            if not 200 <= int(resp.status) < 300:
                raise ClusterError(f"Patroni refused the configuration: {resp.status}")

    def primary(self) -> PatroniNode:
        for node in self.nodes:
            if node.role() == "primary":
                return node
        raise ClusterError("no node is primary now")

    def wait_for_primary(self, other_than: PatroniNode, timeout: float = 90.0) -> PatroniNode:
        """The node that took over from ``other_than``, once it takes writes (Patroni holds
        the leader key a moment before PostgreSQL has left recovery)."""
        for _ in attempts(timeout, 0.5):
            for node in self.nodes:
                if node is not other_than and node.role() == "primary" and node.writable():
                    return node
        raise ClusterError(f"no other node became primary in {timeout:.0f} s")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.etcd.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def _http_ok(url: str) -> bool:
    return _http_json(url) is not None


def _http_json(url: str) -> object | None:
    """The JSON of a 2xx answer (``{}`` if not JSON); None for any other answer or none."""
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - loopback http
            if not 200 <= int(resp.status) < 300:
                return None
            body = resp.read()
    except (urllib.error.URLError, OSError, ValueError):
        return None
    try:
        found: object = json.loads(body)
    except ValueError:
        return {}
    return found
