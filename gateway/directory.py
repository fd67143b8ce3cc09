"""What the pipeline needs from the database for one batch: devices and consent.

Both are read fresh for every batch, for just the devices and participants in it (indexed
queries). A revocation or a withdrawal committed before a batch is read therefore applies to
that batch: no cache to invalidate, no notification to miss. Consent is read under the
shared consent lock (``consent.records.send_snapshot``), so a withdrawal being written is
either in what is read or effective only after the read (docs/consent.md). The whole read
(its transaction, the devices, the lock, the consent) is one round trip to the server: on a
loaded machine each round trip costs milliseconds of waiting for the server and then for
the interpreter lock. Parsed public keys are cached by their DER bytes, since parsing is the
only costly part.
"""

from __future__ import annotations

from collections.abc import Collection

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

from consent import records
from consent.gate import ConsentSnapshot
from ingest.pipeline import DeviceRecord
from storage.db import Conn
from storage.timeconv import to_ms

_DEVICES = """
SELECT d.device_id, d.participant_id, d.public_key, p.enrolled_at, d.revoked_at IS NOT NULL,
       s.backfill_days,
       (SELECT jsonb_object_agg(w.sensor, w.paired_user) FROM sensors w
        WHERE w.device_id = d.device_id AND w.paired_user IS NOT NULL) AS paired_users
FROM devices d JOIN participants p USING (participant_id) JOIN studies s USING (study_id)
WHERE d.device_id = ANY(%s)
"""
_DAY_MS = 86_400_000


class Directory:
    def __init__(self) -> None:
        self._keys: dict[bytes, ec.EllipticCurvePublicKey] = {}

    def _key(self, der: bytes) -> ec.EllipticCurvePublicKey:
        key = self._keys.get(der)
        if key is None:
            loaded = load_der_public_key(der)
            if not isinstance(loaded, ec.EllipticCurvePublicKey):
                raise TypeError("device key is not an EC key")
            key = self._keys[der] = loaded
        return key

    async def read(
        self, conn: Conn, ids: Collection[str]
    ) -> tuple[dict[str, DeviceRecord], ConsentSnapshot]:
        """The devices with these ids (those the database knows) and their participants'
        consent, read in one transaction and one round trip (``conn`` idle, outside a
        transaction; it is left so, with its autocommit setting unchanged)."""
        if not ids:
            return {}, ConsentSnapshot()
        wanted = list(ids)
        # In autocommit and pipeline mode, what is sent before the pipeline's one Sync runs
        # as a single implicit transaction, which holds the consent lock until the last
        # read. A transaction of psycopg's own would cost two more round trips: it syncs
        # after BEGIN and as the pipeline closes.
        was_autocommit = conn.autocommit
        await conn.set_autocommit(True)
        try:
            async with conn.pipeline():
                cur = await conn.execute(_DEVICES, (wanted,))
                consent = await records.send_snapshot(conn, devices=wanted)
        finally:
            if not conn.closed:
                await conn.set_autocommit(was_autocommit)
        out: dict[str, DeviceRecord] = {}
        for dev, pid, der, enrolled, revoked, backfill_days, paired in await cur.fetchall():
            out[str(dev)] = DeviceRecord(
                device_id=str(dev),
                participant_id=str(pid),
                public_key=self._key(bytes(der)),
                participant_enrolled_ms=to_ms(enrolled),
                revoked=bool(revoked),
                backfill_ms=int(backfill_days) * _DAY_MS,
                paired_users={str(k): int(v) for k, v in (paired or {}).items()},
            )
        return out, await consent.result()
