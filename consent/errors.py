"""The consent package's errors: callers (CLI, HTTP handlers) match these types, never text."""

from __future__ import annotations


class ConsentError(Exception):
    """Base of every error raised by ``consent``."""


class ConsentChanged(ConsentError):
    """A consent row of the batch's participants was written after its consent was read.

    Raised inside the gateway's write transaction (``records.confirm_unchanged``), which
    rolls back; the gateway judges the batch again on fresh consent.
    """


class UnknownConsentAction(ConsentError):
    """A consent event whose action the gate does not know: database and code disagree."""


class NotPermitted(ConsentError):
    """The actor's role or sites do not allow this on this participant or study."""


class UnknownParticipant(ConsentError):
    """No such participant."""


class UnknownVersion(ConsentError):
    """No such consent document version in the participant's study."""


class VersionNotEffective(ConsentError):
    """The version's effective date has not come yet."""


class SupersededVersion(ConsentError):
    """A newer version of the document is in effect: sign that one."""


class InvalidDocument(ConsentError):
    """A document version's fields are not acceptable (scopes, dates, content, conflicts)."""


class InvalidScopes(ConsentError):
    """Scopes not in the document, a required scope declined, or an unknown scope."""


class WitnessRequired(ConsentError):
    """The study requires a witness or verifier on every consent signature."""


class ReauthenticationFailed(ConsentError):
    """The signer did not re-authenticate with the participant's own credential."""


class IncompleteWithdrawal(ConsentError):
    """A withdrawal recorded by staff without its reason, or without how a participant's
    request was received (or with one where there is none)."""


class AlreadySigned(ConsentError):
    """The participant's consent in force is already this version with these scopes."""


class NotConsented(ConsentError):
    """Nothing to withdraw: no consent in force (for example, withdrawn already)."""


class ScopeNotGranted(ConsentError):
    """A partial withdrawal names a scope that is not granted now."""


class TransactionOpen(ConsentError):
    """The function owns its transactions and was called inside one."""
