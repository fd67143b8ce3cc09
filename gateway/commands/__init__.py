"""The command groups of ``trialstream``: each module's ``register`` adds its parsers, and
each parser's ``handler`` takes the parsed arguments and the one ``Settings``."""

from gateway.commands import (
    alerts,
    audit,
    bench,
    broker,
    consent,
    db,
    decode,
    demo,
    hub,
    serve,
    site,
)

__all__ = [
    "alerts",
    "audit",
    "bench",
    "broker",
    "consent",
    "db",
    "decode",
    "demo",
    "hub",
    "serve",
    "site",
]
