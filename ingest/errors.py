"""The one exception base of the ingest package: callers match on types, never on text."""

from __future__ import annotations


class IngestError(Exception):
    """Base of every error raised by ``ingest``."""
