"""SDTM DM (Demographics): one record per exported participant.

Only what the database holds truthfully: the study, the subject's identifiers, the site, the
enrollment (RFSTDTC) and the first informed consent (RFICDTC), both as local date-times with
their UTC offset in the zone valid at that time. No demographics (age, sex, race, country,
arm) are held, so those variables are left out rather than invented (docs/exports.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from storage.exports.sdtm_dataset import Dataset, DataType, Record, Variable
from storage.exports.sdtm_vs import usubjid
from storage.exports.source import Subject

DOMAIN = "DM"

DM = Dataset(
    name=DOMAIN,
    label="Demographics",
    sdtm_class="SPECIAL PURPOSE",
    structure="One record per subject",
    keys=("STUDYID", "USUBJID"),
    variables=(
        Variable("STUDYID", "Study Identifier"),
        Variable("DOMAIN", "Domain Abbreviation"),
        Variable("USUBJID", "Unique Subject Identifier"),
        Variable("SUBJID", "Subject Identifier for the Study"),
        Variable("RFSTDTC", "Subject Reference Start Date/Time", DataType.DATETIME),
        Variable("RFICDTC", "Date/Time of Informed Consent", DataType.DATETIME),
        Variable("SITEID", "Study Site Identifier"),
    ),
)


def records(subjects: Sequence[Subject]) -> list[Record]:
    return [
        (
            s.study_id,
            DOMAIN,
            usubjid(s.study_id, s.participant_id),
            s.participant_id,
            s.enrolled,
            s.consented or "",
            s.site_id,
        )
        for s in subjects
    ]
