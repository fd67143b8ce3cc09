"""The command groups of ``trialstream``: each module's ``register`` adds its parsers, and
each parser's ``handler`` takes the parsed arguments and the one ``Settings``."""

from gateway.commands import bench, broker, db, decode, serve

__all__ = ["bench", "broker", "db", "decode", "serve"]
