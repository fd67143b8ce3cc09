"""What the pipeline needs from the database for one batch: devices and consent.

Both are read fresh for every batch, for just the devices and participants in it (indexed
queries). A revocation or a withdrawal committed before a batch is read therefore applies to
that batch: no cache to invalidate, no notification to miss. Consent is read under the
shared consent lock (``consent.records.snapshot``), so a withdrawal being written is either
in what is read or effective only after the read (docs/consent.md). Parsed public keys are
cached by their DER bytes, since parsing is the only costly part.
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
SELECT d.device_id, d.participant_id, d.public_key, p.enrolled_at, d.revoked_at IS NOT NULL
FROM devices d JOIN participants p USING (participant_id)
WHERE d.device_id = ANY(%s)
"""


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

    async def devices(self, conn: Conn, ids: Collection[str]) -> dict[str, DeviceRecord]:
        if not ids:
            return {}
        cur = await conn.execute(_DEVICES, (list(ids),))
        out: dict[str, DeviceRecord] = {}
        for dev, pid, der, enrolled, revoked in await cur.fetchall():
            out[str(dev)] = DeviceRecord(
                device_id=str(dev),
                participant_id=str(pid),
                public_key=self._key(bytes(der)),
                participant_enrolled_ms=to_ms(enrolled),
                revoked=bool(revoked),
            )
        return out

    async def consent(self, conn: Conn, participants: Collection[str]) -> ConsentSnapshot:
        return await records.snapshot(conn, participants)
