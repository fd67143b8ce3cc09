"""Receipts are sealed after COMMIT: one that cannot be sealed must not stop the others."""

from __future__ import annotations

from gateway.judging import seal_each
from ingest import keys
from ingest.model import Receipt
from ingest.receipts import RECEIPT_ACCEPTED, open_receipt


def test_a_receipt_that_cannot_be_sealed_leaves_the_others_sealed() -> None:
    key = keys.generate_private_key()
    good = Receipt("hub-1", 1, RECEIPT_ACCEPTED, 3, 0, 1_780_000_000_000)
    bad = Receipt("not a device id!", 2, RECEIPT_ACCEPTED, 3, 0, 1_780_000_000_000)
    sealed = seal_each([good, bad, good], key)
    assert sealed[1] is None
    for data in (sealed[0], sealed[2]):
        assert data is not None
        assert open_receipt(data, key.public_key()) == good
