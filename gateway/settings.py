"""One frozen ``Settings``, built once in the entry point from the environment and flags.

Every variable is ``TRIALSTREAM_<NAME>``; a command-line flag of the same name wins.
Nothing here is read at import time: ``from_env`` is given the environment explicitly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device_drivers.settings import DEFAULT_DATA_DIR
from gateway.errors import ConfigError
from storage.migrate import ModeRequest

if TYPE_CHECKING:
    from gateway.notify import SmtpConfig

ENV_PREFIX = "TRIALSTREAM_"


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str | None = None
    # Where exports read their data (a standby of ``database_url``'s cluster, e.g. its
    # Patroni replica with ``target_session_attrs=standby``): the heavy reads leave the
    # primary, while the export's access check, audit rows and job state stay on it.
    read_database_url: str | None = None
    storage_mode: ModeRequest = ModeRequest.AUTO
    # The hub, installed alone, resolves the same default without importing the server.
    data_dir: Path = DEFAULT_DATA_DIR
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    # Other addresses of the same broker as hubs reach it (the nodes of a RabbitMQ cluster),
    # ``host:port`` comma separated: given to hubs at enrollment, tried in turn when one fails.
    mqtt_alternates: str = ""
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    workers: int = 1
    mosquitto: str | None = None
    # Shared subscription ($share/ingest/...) so several workers split the load; off only for
    # brokers without MQTT 5 (amqtt in the demo's reduced mode).
    mqtt_shared: bool = True
    # MQTT 5 (persistent sessions with expiry, Receive Maximum, shared subscriptions); off
    # only for an MQTT 3.1.1 broker such as amqtt, which also implies no shared subscription.
    mqtt_v5: bool = True
    gateway_key: Path | None = None
    # Names this gateway host in its workers' MQTT client ids, which must be stable across
    # restarts (to take back unacknowledged messages) and unique across hosts.
    node: str = "gw"
    # MQTT over TLS with the gateway's client certificate, issued by the study CA kept in
    # ``ca_dir``; off only for the loopback development broker and the amqtt demo mode.
    mqtt_tls: bool = False
    ca_dir: Path | None = None
    # The gateway's address as hubs and browsers reach it (enrollment QR codes, links).
    public_url: str | None = None
    # How `site revoke` makes the broker reload its CRL: a command (``systemctl reload
    # mosquitto``), else SIGHUP to the pid in the broker's pid file (docs/broker.md).
    broker_reload: str | None = None
    broker_pid_file: Path | None = None
    # Signed checkpoints of the audit chain, kept outside the database (docs/storage.md):
    # the signing key and the append-only JSON-lines file they are written to.
    audit_checkpoint_key: Path | None = None
    audit_checkpoints: Path | None = None
    # The bearer token a metrics scraper (Prometheus' ``authorization``) sends for
    # ``/metrics``; without it only a signed-in admin may read them.
    metrics_token: str | None = None
    # Reverse proxies whose X-Forwarded-For is believed (networks or addresses, comma
    # separated): the client address of rate limits and audit records (docs/api.md).
    trusted_proxies: str | None = None
    # Alert e-mail (docs/notifications.md): the SMTP server as a URL (smtp://, smtp+starttls://
    # or smtps://, with user:password@ if it wants a login) and the sender's address.
    smtp_url: str | None = None
    notify_from: str = "trialstream@localhost"
    # Where envelopes come from: ``mqtt`` (the broker above, the default) or ``amqp``:
    # RabbitMQ's uplink quorum queue (docs/scaling.md), at ``amqp_urls`` (the cluster's
    # nodes, comma separated; the first that answers is used).
    message_source: str = "mqtt"
    amqp_urls: str = "amqp://guest:guest@127.0.0.1:5672/"
    # The uplink's quorum queues: 1, or up to 16 shards behind a consistent-hash exchange
    # (docs/scaling.md). Every worker consumes all of them; set once per deployment.
    amqp_shards: int = 1
    # RabbitMQ's management API (http://admin:password@host:15672/): where set, enrollment
    # creates each hub's broker identity (certificate login) and revocation removes it
    # (gateway.rabbit_admin).
    rabbitmq_admin_url: str | None = None

    @property
    def gateway_url(self) -> str:
        return self.public_url or f"http://{self.http_host}:{self.http_port}"

    @property
    def ca_path(self) -> Path:
        return self.ca_dir or self.data_dir / "ca"

    @property
    def gateway_key_path(self) -> Path:
        """The receipt-signing key: ``TRIALSTREAM_GATEWAY_KEY``, else under the data dir."""
        return self.gateway_key or self.data_dir / "keys" / "gateway.key"

    @property
    def audit_checkpoint_key_path(self) -> Path:
        """The audit checkpoint key: ``TRIALSTREAM_AUDIT_CHECKPOINT_KEY``, else in the data dir."""
        return self.audit_checkpoint_key or self.data_dir / "keys" / "audit-checkpoint.key"

    @property
    def audit_checkpoints_path(self) -> Path:
        """The checkpoint file: ``TRIALSTREAM_AUDIT_CHECKPOINTS``, else in the data dir."""
        return self.audit_checkpoints or self.data_dir / "audit" / "checkpoints.jsonl"

    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: Any) -> Settings:
        """Settings from ``TRIALSTREAM_*`` variables, then ``overrides`` (flags) where not None."""
        values: dict[str, Any] = {
            f.name: _convert(f.name, raw)
            for f in fields(cls)
            if (raw := env.get(ENV_PREFIX + f.name.upper()))
        }
        values.update({name: value for name, value in overrides.items() if value is not None})
        return replace(cls(), **values)

    def amqp_url_list(self) -> list[str]:
        return [u.strip() for u in self.amqp_urls.split(",") if u.strip()]

    def smtp(self) -> SmtpConfig | None:
        """The SMTP server alert e-mail goes through, if one is configured."""
        from gateway.notify import SmtpConfig

        return None if not self.smtp_url else SmtpConfig.from_url(self.smtp_url, self.notify_from)

    def require_database_url(self) -> str:
        if not self.database_url:
            raise ConfigError(
                "no database configured: set TRIALSTREAM_DATABASE_URL or pass --database-url "
                "(for example postgresql://postgres@127.0.0.1:5432/trialstream)"
            )
        return self.database_url


MAX_BROKER_ADDRESSES = 16
_HOST_RE = re.compile(r"[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")


def broker_addresses(raw: str) -> list[tuple[str, int]]:
    """``host:port`` pairs, comma separated (IPv6 in brackets), as hubs will be given them."""
    out: list[tuple[str, int]] = []
    for part in (p.strip() for p in raw.split(",") if p.strip()):
        host, sep, port = part.rpartition(":")
        if not sep or _HOST_RE.fullmatch(host) is None or not port.isdigit() or len(port) > 5:
            raise ValueError(f"expected host:port, comma separated; not {part[:80]!r}")
        if not 1 <= int(port) <= 65535:
            raise ValueError(f"port out of range in {part[:80]!r}")
        out.append((host.strip("[]"), int(port)))
    if len(out) > MAX_BROKER_ADDRESSES:
        raise ValueError(f"at most {MAX_BROKER_ADDRESSES} addresses")
    return out


_INT_RANGES = {
    "mqtt_port": (1, 65535),
    "http_port": (0, 65535),
    "workers": (1, 256),
    "amqp_shards": (1, 16),
}


def _convert(name: str, raw: str) -> Any:
    var = ENV_PREFIX + name.upper()
    if name in _INT_RANGES:
        lo, hi = _INT_RANGES[name]
        try:
            value = int(raw)
        except ValueError:
            value = lo - 1
        if not lo <= value <= hi:
            raise ConfigError(f"{var}={raw!r} is not valid: expected a whole number {lo}..{hi}")
        return value
    if name == "storage_mode":
        try:
            return ModeRequest(raw)
        except ValueError:
            choices = ", ".join(m.value for m in ModeRequest)
            raise ConfigError(f"{var}={raw!r} is not valid: expected one of {choices}") from None
    if name in {
        "data_dir",
        "gateway_key",
        "ca_dir",
        "broker_pid_file",
        "audit_checkpoint_key",
        "audit_checkpoints",
    }:
        return Path(raw)
    if name == "mqtt_alternates":
        try:
            broker_addresses(raw)
        except ValueError as exc:
            raise ConfigError(f"{var}={raw[:200]!r} is not valid: {exc}") from None
        return raw
    if name == "rabbitmq_admin_url":
        from gateway.rabbit_admin import check_admin_url

        try:
            return check_admin_url(raw)
        except ValueError as exc:
            raise ConfigError(
                f"{var} is not valid: {exc} (not shown: it holds a password)"
            ) from None
    if name == "message_source":
        if raw not in {"mqtt", "amqp"}:
            raise ConfigError(f"{var}={raw[:40]!r} is not valid: expected mqtt or amqp")
        return raw
    if name == "amqp_urls":
        urls = [u.strip() for u in raw.split(",") if u.strip()]
        if (
            not urls
            or len(urls) > 16
            or any(not u.startswith(("amqp://", "amqps://")) for u in urls)
        ):
            raise ConfigError(
                f"{var} is not valid: expected up to 16 amqp:// or amqps:// URLs, comma separated"
                " (not shown: they may hold passwords)"
            )
        return raw
    if name in {"smtp_url", "notify_from"}:
        from gateway.notify import SmtpConfig

        probe = ("smtp://localhost", raw) if name == "notify_from" else (raw, "a@example.org")
        try:
            SmtpConfig.from_url(*probe)
        except ValueError as exc:
            shown = raw if name == "notify_from" else "(hidden: it may hold a password)"
            raise ConfigError(f"{var}={shown} is not valid: {exc}") from None
        return raw
    if name == "trusted_proxies":
        from gateway.web.ratelimit import parse_networks

        try:
            parse_networks(raw)
        except ValueError as exc:
            raise ConfigError(
                f"{var}={raw[:200]!r} is not valid: expected addresses or networks,"
                f" comma separated ({exc})"
            ) from None
        return raw
    if name in {"mqtt_shared", "mqtt_tls", "mqtt_v5"}:
        if raw.lower() in {"1", "true", "yes", "on"}:
            return True
        if raw.lower() in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{var}={raw!r} is not valid: expected true or false")
    return raw
