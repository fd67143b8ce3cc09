"""One way to build a participant's hub from its enrolled identity.

The command line (`trialstream-hub run`), the demo and the tests build hubs here, so every
hub has the same parts: the outbox and the state file in the hub's directory, the relay on
the broker the enrollment named (over TLS when it said so), the certificate keeper that
renews the hub's certificate and stops it once the site has withdrawn it, and one session
per wearable (those named, and every wearable paired in the state file, which the hub reads
again while it runs: a wearable paired or unpaired meanwhile gains or loses its session).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from device_drivers.credentials import CertificateKeeper
from device_drivers.disk import on_disk
from device_drivers.driver import WearableSession, WearableSpec
from device_drivers.hub import Hub, OutboxSink, Pairings
from device_drivers.identity import HubIdentity
from device_drivers.local_zone import system_time_zone
from device_drivers.outbox import Outbox
from device_drivers.pairing import BleBackends
from device_drivers.relay import Relay, RelayConfig
from device_drivers.state import HubState, PairedWearable
from ingest.transport import configure_tls

OUTBOX_FILE = "outbox.sqlite"
STATE_FILE = "state.json"
STATUS_FILE = "status.json"


@dataclass
class HubParts:
    """A hub and the parts a caller may want to look at (the demo's status, tests)."""

    hub: Hub
    outbox: Outbox
    relay: Relay
    sink: OutboxSink
    state: HubState
    sessions: list[WearableSession]


async def open_hub(
    identity: HubIdentity,
    stack: contextlib.AsyncExitStack,
    *,
    wearables: Sequence[WearableSpec] = (),
    backends: BleBackends | None = None,
    mqtt5: bool | None = None,
    seal_max_age_s: float | None = None,
    time_zone: Callable[[], str | None] = system_time_zone,
) -> HubParts:
    """The hub of ``identity``; its outbox is closed when ``stack`` unwinds. ``time_zone``
    says the hub's zone, looked at now and then (device_drivers.local_zone). The broker's
    addresses and MQTT version are the enrollment's (``mqtt5`` overrides the version)."""
    directory = identity.directory
    outbox = await on_disk(Outbox.open, directory / OUTBOX_FILE, identity.device_id)
    stack.callback(outbox.close)
    state = await on_disk(HubState.open, directory / STATE_FILE)
    sink = OutboxSink(outbox)
    tls = configure_tls(identity.tls)
    config = RelayConfig(
        identity.device_id,
        identity.broker_host,
        identity.broker_port,
        mqtt5=identity.broker_mqtt5 if mqtt5 is None else mqtt5,
        alternates=identity.broker_alternates,
    )
    if seal_max_age_s is not None:
        config = dataclasses.replace(config, seal_max_age_s=seal_max_age_s)
    relay = Relay(
        config,
        outbox,
        identity.key(),
        identity.receipt_key(),
        configure_client=tls,
    )
    keeper = CertificateKeeper(
        identity,
        connect_failures=lambda: relay.stats.connect_failures,
        on_renewed=tls.reload if tls is not None else (lambda: None),
    )
    ble = backends or BleBackends()
    named = frozenset(w.address for w in wearables)

    def paired_session(wearable: PairedWearable) -> WearableSession:
        return WearableSession.for_paired(wearable, sink, state, backends=ble, clock=sink.clock)

    sessions = [
        WearableSession(spec, sink, ble, clock=sink.clock, state=state) for spec in wearables
    ] + [paired_session(w) for w in state.wearables if w.address not in named]
    hub = Hub(
        relay,
        sessions,
        sink,
        status_path=directory / STATUS_FILE,
        keeper=keeper,
        time_zone=time_zone,
        pairings=Pairings(state, paired_session, named),
    )
    return HubParts(hub, outbox, relay, sink, state, sessions)
