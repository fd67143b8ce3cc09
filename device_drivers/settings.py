"""The hub's own settings: where its directory is and how much it logs.

The hub installs without the server, so it reads its few ``TRIALSTREAM_*`` variables here
rather than through ``gateway.settings``. The hub's directory is ``--hub-dir``, else
``$TRIALSTREAM_HUB_DIR``, else ``hub`` under ``$TRIALSTREAM_DATA_DIR``, else under the
data directory the server uses by default (``DEFAULT_DATA_DIR``, which ``gateway.settings``
takes from here so the two cannot drift apart). Nothing is read at import time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

ENV_PREFIX: Final = "TRIALSTREAM_"
# The server's default data directory (relative: the working directory's).
DEFAULT_DATA_DIR: Final = Path(".trialstream")
HUB_SUBDIR: Final = "hub"
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True, slots=True)
class HubSettings:
    hub_dir: Path
    log_level: str = "INFO"

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str],
        *,
        hub_dir: str | Path | None = None,
        data_dir: Path | None = None,
        log_level: str | None = None,
    ) -> HubSettings:
        """Flags (``hub_dir``, ``log_level``) win over the environment; ``data_dir`` is the
        server's already resolved data directory when the hub runs as ``trialstream hub``.
        An empty variable counts as unset, as in ``gateway.settings``."""
        if hub_dir:
            directory = Path(hub_dir)
        elif raw := env.get(ENV_PREFIX + "HUB_DIR"):
            directory = Path(raw)
        else:
            base = data_dir or Path(env.get(ENV_PREFIX + "DATA_DIR") or DEFAULT_DATA_DIR)
            directory = base / HUB_SUBDIR
        level = log_level or env.get(ENV_PREFIX + "LOG_LEVEL") or "INFO"
        return cls(hub_dir=directory, log_level=level)
