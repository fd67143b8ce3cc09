"""The private RabbitMQ nodes run the deploy configuration (deploy/rabbitmq/), rewritten only
where a node on this machine must differ: its listeners on loopback ports of its own, its
certificate files, the management API only when asked for, and a plain MQTT listener on
loopback for password logins. What production relies on stays as written."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import rabbitmq
from gateway.errors import BrokerError
from gateway.rabbitmq import (
    DEPLOY_DIR,
    MAX_MESSAGE_BYTES,
    RabbitNode,
    render_config,
    render_plugins,
)
from ingest.transport import TlsFiles

TEMPLATE = (DEPLOY_DIR / "rabbitmq.conf").read_text()
TLS = TlsFiles(Path("/t/ca.pem"), Path("/t/broker.pem"), Path("/t/broker.key"))


def settings(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_production_values_the_design_relies_on_are_in_the_deploy_file() -> None:
    deployed = settings(TEMPLATE)
    assert deployed["mqtt.ssl_cert_login"] == "true"
    assert deployed["ssl_cert_login_from"] == "common_name"
    assert deployed["ssl_options.fail_if_no_peer_cert"] == "true"
    assert deployed["mqtt.allow_anonymous"] == "false"
    assert deployed["mqtt.durable_queue_type"] == "quorum"
    assert int(deployed["max_message_size"]) == MAX_MESSAGE_BYTES
    assert "mqtt.listeners.tcp.default" not in deployed  # hubs only over TLS


def test_a_tls_node_keeps_the_tls_settings_with_its_own_files_and_ports() -> None:
    node = settings(
        render_config(
            TEMPLATE, amqp_port=1001, mqtt_port=1002, tls=TLS, mqtts_port=1003, management_port=1004
        )
    )
    assert node["listeners.tcp.default"] == "127.0.0.1:1001"
    assert node["mqtt.listeners.ssl.default"] == "127.0.0.1:1003"
    assert node["mqtt.listeners.tcp.default"] == "127.0.0.1:1002"
    assert node["ssl_options.cacertfile"] == "/t/ca.pem"
    assert node["ssl_options.certfile"] == "/t/broker.pem"
    assert node["ssl_options.keyfile"] == "/t/broker.key"
    assert node["mqtt.ssl_cert_login"] == "true"
    assert node["management.tcp.ip"] == "127.0.0.1"
    assert node["management.tcp.port"] == "1004"
    rendered = "\n".join(node.values())
    assert "/etc/rabbitmq" not in rendered
    assert "8883" not in rendered
    # Everything else exactly as deployed.
    rewritten = ("listeners.", "mqtt.listeners.", "ssl_options.c", "ssl_options.k", "management.")
    for key, value in settings(TEMPLATE).items():
        if not key.startswith(rewritten):
            assert node[key] == value, key


def test_a_node_without_tls_or_management_has_neither() -> None:
    node = settings(render_config(TEMPLATE, amqp_port=1001, mqtt_port=1002))
    assert not [k for k in node if "ssl" in k]
    assert not [k for k in node if k.startswith("management.")]
    assert node["mqtt.listeners.tcp.default"] == "127.0.0.1:1002"
    assert node["mqtt.durable_queue_type"] == "quorum"


def test_the_management_plugin_only_when_asked() -> None:
    plugins = (DEPLOY_DIR / "enabled_plugins").read_text()
    with_management = "[rabbitmq_mqtt,rabbitmq_consistent_hash_exchange,rabbitmq_management].\n"
    assert render_plugins(plugins, management=True) == with_management
    assert render_plugins(plugins, management=False) == (
        "[rabbitmq_mqtt,rabbitmq_consistent_hash_exchange].\n"
    )


def test_a_rabbitmqctl_that_never_answers_is_a_failure_not_an_exception(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node's start polls ``rabbitmqctl wait``, whose own Erlang VM could take longer than
    its timeout on a busy machine: that raised out of the start instead of waiting on."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for script in ("rabbitmq-server", "rabbitmqctl"):
        (bin_dir / script).write_text("#!/bin/sh\nexec sleep 30\n")
        (bin_dir / script).chmod(0o755)
    monkeypatch.setattr(rabbitmq, "CTL_TIMEOUT_S", 0.5)
    node = RabbitNode(tmp_path / "node", bin_dir=bin_dir)
    done = node.ctl("status", check=False)
    assert done.returncode == 124
    assert "no answer in" in done.stderr
    with pytest.raises(BrokerError, match="rabbitmqctl status failed"):
        node.ctl("status")
