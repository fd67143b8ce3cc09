"""Shared fixtures: real PostgreSQL and Mosquitto (see tests/fixtures/)."""

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.broker",
    "tests.fixtures.pki",
    "tests.fixtures.trial",
    "tests.fixtures.gateway",
    "tests.fixtures.uplink",
    "tests.fixtures.notify",
    "tests.fixtures.rabbitmq",
    "tests.fixtures.patroni",
    "tests.fixtures.watchdog",
]
