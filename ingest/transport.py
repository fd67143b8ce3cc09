"""How hub and gateway reach the broker: TLS with client certificates (MQTT over TLS 1.2+).

Only configuration lives here, shared by both sides; connecting is theirs to do.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A certificate, its private key, and the CA certificate that verifies the peer."""

    cafile: Path
    certfile: Path
    keyfile: Path


def configure_tls(files: TlsFiles | None) -> Callable[[mqtt.Client], None] | None:
    """A client configurator presenting ``files`` and verifying the broker, or None."""
    if files is None:
        return None

    def configure(client: mqtt.Client) -> None:
        client.tls_set(
            ca_certs=str(files.cafile),
            certfile=str(files.certfile),
            keyfile=str(files.keyfile),
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )

    return configure
