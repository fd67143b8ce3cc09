"""Read queries behind the consent pages: the consent document versions a participant of a
study may sign now, the re-consent deadlines the study set, and whether signing needs a
witness.

Nothing here decides who may see what (``gateway.web.access`` does); every function takes the
ids it is allowed to read.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from storage.db import Conn


@dataclass(frozen=True, slots=True)
class ConsentDocumentRow:
    """A consent document version in effect now (a study's newest effective version of a
    document, in each of its languages), with its rank among the document's versions."""

    document_id: int
    title: str
    version: str
    language: str
    text: str | None
    uri: str | None
    sha256: bytes
    scopes: tuple[str, ...]
    optional_scopes: tuple[str, ...]
    effective_at: datetime
    reconsent_by: datetime | None
    rank: int


@dataclass(frozen=True, slots=True)
class ReconsentDeadline:
    title: str
    rank: int
    reconsent_by: datetime


# Ranks as consent.records ranks versions: by effective time within (study, title).
_RANKED_DOCUMENTS = """
WITH ranked AS (
    SELECT d.*, dense_rank() OVER (PARTITION BY d.title ORDER BY d.effective_at) AS rank
    FROM consent_documents d WHERE d.study_id = %(study)s
), newest AS (
    SELECT title, max(effective_at) AS effective_at FROM ranked
    WHERE effective_at <= now() GROUP BY title
)
SELECT r.document_id, r.title, r.version, r.language, r.body, r.uri, r.content_sha256,
       r.scopes, r.optional_scopes, r.effective_at, r.reconsent_by, r.rank
FROM ranked r JOIN newest n ON n.title = r.title AND n.effective_at = r.effective_at
ORDER BY r.title, r.language, r.document_id
"""


async def consent_documents_in_effect(conn: Conn, study_id: str) -> list[ConsentDocumentRow]:
    """The versions a participant of the study may sign now: for each document, its newest
    version already in effect (every language of it)."""
    cur = await conn.execute(_RANKED_DOCUMENTS, {"study": study_id})
    return [
        ConsentDocumentRow(
            int(did),
            str(title),
            str(version),
            str(lang),
            body,
            uri,
            bytes(sha),
            tuple(sorted(scopes)),
            tuple(sorted(optional or ())),
            eff,
            recon,
            int(rank),
        )
        for did, title, version, lang, body, uri, sha, scopes, optional, eff, recon, rank in (
            await cur.fetchall()
        )
    ]


async def reconsent_deadlines(conn: Conn, study_id: str) -> list[ReconsentDeadline]:
    """Every version of the study's documents that set a re-consent deadline."""
    cur = await conn.execute(
        "SELECT DISTINCT title, rank, reconsent_by FROM ("
        " SELECT title, reconsent_by,"
        " dense_rank() OVER (PARTITION BY title ORDER BY effective_at) AS rank"
        " FROM consent_documents WHERE study_id = %s) d WHERE reconsent_by IS NOT NULL"
        " ORDER BY title, rank",
        (study_id,),
    )
    return [ReconsentDeadline(str(t), int(r), by) for t, r, by in await cur.fetchall()]


async def consent_witness_required(conn: Conn, study_id: str) -> bool:
    cur = await conn.execute(
        "SELECT consent_witness_required FROM studies WHERE study_id = %s", (study_id,)
    )
    row = await cur.fetchone()
    return bool(row and row[0])


async def consent_document_of(conn: Conn, consent_id: int) -> int | None:
    """The document version a consent row is about."""
    cur = await conn.execute(
        "SELECT document_id FROM consents WHERE consent_id = %s", (consent_id,)
    )
    row = await cur.fetchone()
    return None if row is None else int(row[0])
