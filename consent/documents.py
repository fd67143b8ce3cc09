"""Consent document versions: the scopes they cover, when they take effect, and creating
them (admins only)."""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from psycopg import errors as pg_errors

from consent import errors
from consent.actors import Actor
from consent.common import CONSENT_LOCK_KEY, _require_idle
from ingest.metrics import METRICS
from storage import audit, users
from storage.db import Conn

SCOPES = frozenset(m.scope for m in METRICS.values())


@dataclass(frozen=True, slots=True)
class DocumentVersion:
    document_id: int
    study_id: str
    title: str
    version: str
    language: str
    uri: str | None
    content_sha256: bytes
    scopes: frozenset[str]
    optional_scopes: frozenset[str]
    approved_on: date | None
    effective_at: datetime
    reconsent_by: datetime | None

    @property
    def required_scopes(self) -> frozenset[str]:
        return self.scopes - self.optional_scopes


def document_key(study_id: str, title: str) -> str:
    return f"{study_id}\x1f{title}"


# --- documents --------------------------------------------------------------------------

_DOC_BY_ID = """
SELECT document_id, study_id, title, version, language, uri, content_sha256, scopes,
       optional_scopes, approved_on, effective_at, reconsent_by
FROM consent_documents WHERE document_id = %s
"""
_DOCS_BY_TITLE = """
SELECT document_id, study_id, title, version, language, uri, content_sha256, scopes,
       optional_scopes, approved_on, effective_at, reconsent_by
FROM consent_documents WHERE study_id = %s AND title = %s ORDER BY effective_at
"""
_INSERT_DOC = """
INSERT INTO consent_documents (study_id, title, version, language, uri, body, content_sha256,
                               scopes, optional_scopes, approved_on, effective_at,
                               reconsent_by, created_by)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
RETURNING document_id, study_id, title, version, language, uri, content_sha256, scopes,
          optional_scopes, approved_on, effective_at, reconsent_by
"""


def _doc(row: tuple[Any, ...]) -> DocumentVersion:
    (did, study, title, version, lang, uri, sha, scopes, optional, approved, eff, recon) = row
    return DocumentVersion(
        int(did),
        str(study),
        str(title),
        str(version),
        str(lang),
        None if uri is None else str(uri),
        bytes(sha),
        frozenset(scopes),
        frozenset(optional),
        approved,
        eff,
        recon,
    )


async def create_version(
    conn: Conn,
    actor: Actor,
    *,
    study_id: str,
    title: str,
    version: str,
    scopes: Collection[str],
    effective_at: datetime,
    optional_scopes: Collection[str] = (),
    language: str = "en",
    text: str | None = None,
    pdf: bytes | None = None,
    uri: str | None = None,
    approved_on: date | None = None,
    reconsent_by: datetime | None = None,
) -> DocumentVersion:
    """Add a version (or a language of a version) of a study's consent document.

    Content is the text itself, or a PDF kept elsewhere (``uri``) whose bytes are hashed here.
    A new version takes effect after every earlier one; another language of an existing
    version must cover the same scopes from the same dates. ``reconsent_by`` makes everyone
    on an earlier version re-consent by that time.
    """
    _require_idle(conn)
    if actor.role is not users.Role.ADMIN:
        raise errors.NotPermitted("only an admin creates consent documents")
    if (text is None) == (pdf is None):
        raise errors.InvalidDocument("give the document's text or its PDF, not both")
    if pdf is not None and not uri:
        raise errors.InvalidDocument("a PDF document needs the uri where it is kept")
    content = text.encode() if text is not None else pdf
    assert content is not None
    if not content.strip():
        raise errors.InvalidDocument("the document is empty")
    scope_set, optional = frozenset(scopes), frozenset(optional_scopes)
    if not scope_set:
        raise errors.InvalidDocument("a consent document covers at least one scope")
    if unknown := (scope_set | optional) - SCOPES:
        raise errors.InvalidScopes(f"unknown scopes {sorted(unknown)}; known: {sorted(SCOPES)}")
    if not optional <= scope_set:
        raise errors.InvalidScopes("optional scopes must be among the document's scopes")
    if reconsent_by is not None and reconsent_by < effective_at:
        raise errors.InvalidDocument("reconsent_by must not be before effective_at")
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (CONSENT_LOCK_KEY,))
        cur = await conn.execute(_DOCS_BY_TITLE, (study_id, title))
        existing = [_doc(r) for r in await cur.fetchall()]
        same = [d for d in existing if d.version == version]
        if same:
            first = same[0]
            if (first.scopes, first.optional_scopes, first.effective_at, first.reconsent_by) != (
                scope_set,
                optional,
                effective_at,
                reconsent_by,
            ):
                raise errors.InvalidDocument(
                    f"version {version} exists: another language must have its scopes and dates"
                )
        elif existing and effective_at <= existing[-1].effective_at:
            raise errors.InvalidDocument(
                f"version {version} must take effect after version {existing[-1].version}"
            )
        try:
            cur = await conn.execute(
                _INSERT_DOC,
                (
                    study_id,
                    title,
                    version,
                    language,
                    uri,
                    text,
                    hashlib.sha256(content).digest(),
                    sorted(scope_set),
                    sorted(optional),
                    approved_on,
                    effective_at,
                    reconsent_by,
                    actor.user,
                ),
            )
        except pg_errors.UniqueViolation as exc:
            raise errors.InvalidDocument(
                f"{title} version {version} ({language}) exists in study {study_id}"
            ) from exc
        except pg_errors.ForeignKeyViolation as exc:
            raise errors.InvalidDocument(f"no study {study_id!r}") from exc
        row = await cur.fetchone()
        assert row is not None
        doc = _doc(row)
        await audit.append(
            conn,
            actor=actor.user,
            action="consent.document.create",
            entity="consent_document",
            entity_id=str(doc.document_id),
            detail={
                "study_id": study_id,
                "title": title,
                "version": version,
                "language": language,
                "content_sha256": doc.content_sha256.hex(),
                "scopes": sorted(scope_set),
                "optional_scopes": sorted(optional),
                "effective_at": effective_at,
                "reconsent_by": reconsent_by,
            },
        )
    return doc
