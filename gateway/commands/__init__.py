"""The command groups of ``trialstream``: each module's ``register`` adds its parsers, and
each parser's ``handler`` takes the parsed arguments and the one ``Settings``."""

from gateway.commands import (
    adherence,
    admin,
    alerts,
    audit,
    bench,
    broker,
    cluster,
    consent,
    db,
    decode,
    demo,
    export,
    hub,
    notify,
    queries,
    review,
    serve,
    site,
)

__all__ = [
    "adherence",
    "admin",
    "alerts",
    "audit",
    "bench",
    "broker",
    "cluster",
    "consent",
    "db",
    "decode",
    "demo",
    "export",
    "hub",
    "notify",
    "queries",
    "review",
    "serve",
    "site",
]
