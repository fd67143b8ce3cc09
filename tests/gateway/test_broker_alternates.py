"""A broker with several addresses (the nodes of a RabbitMQ cluster): the gateway's setting
(TRIALSTREAM_MQTT_ALTERNATES) is checked before use, enrollment hands the addresses and the
broker's MQTT version to the hub, and the hub keeps them and builds its relay with them;
whatever the gateway's answer holds is checked by the hub before it is trusted."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import pytest

from device_drivers.hub_factory import open_hub
from device_drivers.identity import HubIdentity, HubIdentityError, enroll
from gateway.broker import MosquittoBroker
from gateway.errors import ConfigError
from gateway.settings import Settings, broker_addresses
from tests.fixtures.gateway import gateway_settings, running_gateway
from tests.fixtures.trial import Trial
from tests.gateway.test_enrollment import new_code, ticket


def test_the_setting_takes_host_port_pairs_and_refuses_anything_else() -> None:
    assert broker_addresses("") == []
    assert broker_addresses(" mq-b.example.org:1883, 10.0.0.3:8883 ,[fd00::3]:1883") == [
        ("mq-b.example.org", 1883),
        ("10.0.0.3", 8883),
        ("fd00::3", 1883),
    ]
    settings = Settings.from_env({"TRIALSTREAM_MQTT_ALTERNATES": "mq-b:1883,mq-c:1883"})
    assert settings.mqtt_alternates == "mq-b:1883,mq-c:1883"
    for bad in (
        "mq-b",  # no port
        "mq-b:0",
        "mq-b:65536",
        "mq-b:18x3",
        "mq b:1883",
        "mq-b:1883/path",
        "mq-b:188300",
        "x" * 254 + ":1883",
        "\x00:1883",
        ",".join(f"mq-{i}:1883" for i in range(17)),
    ):
        with pytest.raises(ConfigError, match="TRIALSTREAM_MQTT_ALTERNATES"):
            Settings.from_env({"TRIALSTREAM_MQTT_ALTERNATES": bad})


async def test_enrollment_gives_the_hub_the_brokers_addresses_and_its_relay_uses_them(
    trial: Trial, database_url: str, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    settings = dataclasses.replace(
        gateway_settings(database_url, mosquitto, tmp_path / "gateway"),
        mqtt_alternates="127.0.0.1:18831,mq-c.example.org:1883",
    )
    async with running_gateway(settings) as gw:
        identity = await enroll(tmp_path / "hub", ticket(gw, await new_code(trial)))
    assert identity.broker_alternates == (("127.0.0.1", 18831), ("mq-c.example.org", 1883))
    assert identity.broker_mqtt5 is True
    again = HubIdentity.load(tmp_path / "hub")
    assert again.broker_alternates == identity.broker_alternates
    async with contextlib.AsyncExitStack() as stack:
        parts = await open_hub(again, stack)
        assert parts.relay.config.alternates == identity.broker_alternates
        assert parts.relay.config.mqtt5 is True


def _hub_json(directory: Path, broker: dict[str, object]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hub.json").write_text(
        json.dumps(
            {
                "device_id": "hub-9",
                "participant_id": "P9",
                "study_id": "S1",
                "broker": {"host": "127.0.0.1", "port": 1883, "tls": False, **broker},
                "topics": {},
                "gateway_url": "http://127.0.0.1:8080",
            }
        )
    )


def test_an_identity_enrolled_before_alternates_speaks_mqtt5_to_one_address(
    tmp_path: Path,
) -> None:
    _hub_json(tmp_path, {})
    identity = HubIdentity.load(tmp_path)
    assert (identity.broker_alternates, identity.broker_mqtt5) == ((), True)
    _hub_json(tmp_path, {"alternates": [{"host": "mq-b", "port": 1883}], "mqtt5": False})
    identity = HubIdentity.load(tmp_path)
    assert (identity.broker_alternates, identity.broker_mqtt5) == ((("mq-b", 1883),), False)


@pytest.mark.parametrize(
    "alternates",
    [
        "mq-b:1883",
        [{"host": "mq-b"}],
        [{"port": 1883}],
        [{"host": "", "port": 1883}],
        [{"host": "mq-b", "port": 0}],
        [{"host": "mq-b", "port": 70000}],
        [{"host": "mq-b", "port": "1883"}],
        [{"host": "mq-b", "port": True}],
        [{"host": 7, "port": 1883}],
        [{"host": "mq\nb", "port": 1883}],
        [{"host": "x" * 254, "port": 1883}],
        [{"host": f"mq-{i}", "port": 1883} for i in range(17)],
        ["mq-b:1883"],
    ],
)
def test_hostile_broker_addresses_in_the_identity_are_refused(
    tmp_path: Path, alternates: object
) -> None:
    _hub_json(tmp_path, {"alternates": alternates})
    with pytest.raises(HubIdentityError, match="is incomplete"):
        HubIdentity.load(tmp_path)
