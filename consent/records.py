"""Consent documents, signatures, withdrawals and history: the functions behind the CLI and
the HTTP API. Each takes a connection and an :class:`Actor` and owns its transactions,
because a refused attempt is audited and that record must commit although the call fails:
call them on a connection with no transaction open.

Consent rows are only inserted (a trigger refuses UPDATE and DELETE). Every change takes the
exclusive consent lock and stamps its effective time with ``clock_timestamp()`` after taking
it; the gateway reads consent under the shared lock (:func:`snapshot`). So a batch whose
consent was read before a withdrawal committed was read before the withdrawal's effective
time, and holds no reading measured after it; and its write transaction checks, under the
same lock held to COMMIT, that no consent row was written since (:func:`confirm_unchanged`),
so a ``delete`` withdrawal never runs between a batch's judgement and its commit
(docs/consent.md).

This module is the public API of consent records; the code lives in ``consent.actors``
(who acts), ``consent.documents`` (document versions), ``consent.snapshots`` (the consent
the gate and the checks read), ``consent.signing``, ``consent.withdrawal``,
``consent.history`` (history and pending re-consents) and ``consent.common`` (the consent
lock and what the others share).
"""

from __future__ import annotations

from consent.actors import STAFF_ROLES, Actor
from consent.common import CONSENT_LOCK_KEY
from consent.documents import SCOPES, DocumentVersion, create_version, document_key
from consent.history import ConsentRecord, PendingReconsent, history, pending_reconsents
from consent.signing import MEANING_CONSENT, sign
from consent.snapshots import PendingSnapshot, confirm_unchanged, send_snapshot, snapshot
from consent.withdrawal import (
    MEANING_BY_PARTICIPANT,
    MEANING_BY_SITE,
    MEANING_REQUEST_RECORDED,
    Initiator,
    ReceivedVia,
    Withdrawal,
    WithdrawalSignature,
    withdraw,
)

__all__ = [
    "CONSENT_LOCK_KEY",
    "MEANING_BY_PARTICIPANT",
    "MEANING_BY_SITE",
    "MEANING_CONSENT",
    "MEANING_REQUEST_RECORDED",
    "SCOPES",
    "STAFF_ROLES",
    "Actor",
    "ConsentRecord",
    "DocumentVersion",
    "Initiator",
    "PendingReconsent",
    "PendingSnapshot",
    "ReceivedVia",
    "Withdrawal",
    "WithdrawalSignature",
    "confirm_unchanged",
    "create_version",
    "document_key",
    "history",
    "pending_reconsents",
    "send_snapshot",
    "sign",
    "snapshot",
    "withdraw",
]
