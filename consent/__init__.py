"""E-consent: which data a participant agreed to, and when.

Consent documents and their versions, consent records with their e-signatures, withdrawal
and re-consent, and the gate: a pure function that, given a consent snapshot, a participant,
a metric and the reading's own time, says whether the reading may be stored and, if not, why.
"""
