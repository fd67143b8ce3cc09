"""The exports' errors: callers (CLI, HTTP handlers, the job runner) match these types."""

from __future__ import annotations

from storage.errors import StorageError


class ExportError(StorageError):
    """Base of every error raised by ``storage.exports``."""


class InvalidExportRequest(ExportError):
    """The request itself is not acceptable (time window, naive times, unknown kind)."""


class UnknownStudy(ExportError):
    """No such study."""


class UnknownParticipant(ExportError):
    """No such participant in the study."""


class ExportNotPermitted(ExportError):
    """The actor's role or sites do not allow exporting this study or participant."""


class OutputExists(ExportError):
    """The output directory exists and is not empty: an export never overwrites files."""


class ExportWriteFailed(ExportError):
    """Writing the output failed; nothing was left under the output's final name."""


class JobNotFound(ExportError):
    """No export job with that id that this actor may see."""


class JobNotRunnable(ExportError):
    """The job is not queued (it runs, ran, or failed already)."""
