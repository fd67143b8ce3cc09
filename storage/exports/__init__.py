"""Data out: Parquet with provenance, FHIR R4 for clinical systems, SDTM VS for statisticians.

Every export honours consent (a reading leaves only if consent covering its metric held at
its time, judged now by the consent gate), the actor's role and sites, and is audited with a
SHA-256 of each file written. Files appear under their final name whole or not at all.
Exports asked for through the API run as background jobs (:mod:`storage.exports.jobs`).
The formats, their columns and mappings are in docs/exports.md.
"""

from storage.exports.errors import (
    ExportError,
    ExportNotPermitted,
    ExportWriteFailed,
    InvalidExportRequest,
    JobNotFound,
    JobNotRunnable,
    OutputExists,
    UnknownParticipant,
    UnknownStudy,
)
from storage.exports.export import ExportResult, export
from storage.exports.output import WrittenFile
from storage.exports.selection import ExportKind, ExportRequest

__all__ = [
    "ExportError",
    "ExportKind",
    "ExportNotPermitted",
    "ExportRequest",
    "ExportResult",
    "ExportWriteFailed",
    "InvalidExportRequest",
    "JobNotFound",
    "JobNotRunnable",
    "OutputExists",
    "UnknownParticipant",
    "UnknownStudy",
    "WrittenFile",
    "export",
]
