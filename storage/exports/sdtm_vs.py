"""SDTM VS records (daily summaries and one per reading) and their SUPPVS qualifiers.

Daily summaries: one record per participant, vital-sign test, local day and statistic (the
statistic in VSSCAT), over the readings the device did not put in doubt; a day whose readings
it all doubted has its mean, minimum and maximum NOT DONE with the reason. Readings: one
record per reading (VSSCAT ``READING``), VSDTC its local date-time with offset; a reading
keeps its result whatever the device said, and what it said (its flags, its user index on a
shared device) goes to SUPPVS, keyed by the reading's VSSEQ. A reading's SPDEVID is the
wearable description valid at its time (:mod:`storage.exports.sdtm_di`), empty when the
wearable never described itself; a daily summary's is empty, as its readings may come from
more than one device. docs/exports.md has every variable.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date

from storage.exports.mapping import EXPORTED, VsTest
from storage.exports.sdtm_dataset import Dataset, DataType, Record, Value, Variable
from storage.exports.sdtm_di import spdevid
from storage.exports.source import Daily, LocalReading

DOMAIN = "VS"
CATEGORY = "WEARABLE"
DERIVED = "Y"

MEAN = "DAILY MEAN"
MINIMUM = "DAILY MINIMUM"
MAXIMUM = "DAILY MAXIMUM"
COUNT = "DAILY COUNT"
DOUBTFUL_COUNT = "DAILY DOUBTFUL COUNT"
# The statistics, in the order they are written, as VSSCAT says them.
STATISTICS = (MEAN, MINIMUM, MAXIMUM, COUNT, DOUBTFUL_COUNT)
COUNTS = frozenset({COUNT, DOUBTFUL_COUNT})
# A record of one reading as the device gave it.
READING = "READING"
SUBCATEGORIES = (*STATISTICS, READING)
# A day whose readings the device all marked invalid or questionable: no mean, minimum or
# maximum, said so in SDTM's terms.
NOT_DONE = "NOT DONE"
REASON_DOUBTED = "DEVICE MARKED INVALID OR QUESTIONABLE"

VS = Dataset(
    name=DOMAIN,
    label="Vital Signs",
    sdtm_class="FINDINGS",
    structure=(
        "One record per vital sign reading, and per vital sign test, local day and daily"
        " statistic, per subject"
    ),
    keys=("STUDYID", "USUBJID", "VSTESTCD", "VSSCAT", "VSDTC", "VSSEQ"),
    variables=(
        Variable("STUDYID", "Study Identifier"),
        Variable("DOMAIN", "Domain Abbreviation"),
        Variable("USUBJID", "Unique Subject Identifier"),
        Variable("SPDEVID", "Sponsor Device Identifier"),
        Variable("VSSEQ", "Sequence Number", DataType.INTEGER),
        Variable("VSTESTCD", "Vital Signs Test Short Name", codelist="VSTESTCD"),
        Variable("VSTEST", "Vital Signs Test Name"),
        Variable("VSCAT", "Category for Vital Signs"),
        Variable("VSSCAT", "Subcategory for Vital Signs", codelist="VSSCAT"),
        Variable("VSORRES", "Result or Finding in Original Units"),
        Variable("VSORRESU", "Original Units"),
        Variable("VSSTRESC", "Character Result/Finding in Std Format"),
        Variable("VSSTRESN", "Numeric Result/Finding in Standard Units", DataType.FLOAT),
        Variable("VSSTRESU", "Standard Units"),
        Variable("VSSTAT", "Completion Status", codelist="VSSTAT"),
        Variable("VSREASND", "Reason Not Performed"),
        Variable("VSLOINC", "LOINC Code"),
        Variable("VSDRVFL", "Derived Flag"),
        Variable("VSDTC", "Date/Time of Measurements", DataType.DATETIME),
        Variable("VSDY", "Study Day of Vital Signs", DataType.INTEGER),
    ),
)
NAMES = VS.names

# Supplemental qualifiers of a reading record: what the device said about it.
DEVICE_FLAGS = "VSDEVFL"
DEVICE_USER = "VSDEVUSR"
QUALIFIER_LABELS = {DEVICE_FLAGS: "Device Flags", DEVICE_USER: "Device User Index"}
# The device sent them with the reading.
ORIGIN = "COLLECTED"

SUPPVS = Dataset(
    name="SUPPVS",
    label="Supplemental Qualifiers for VS",
    sdtm_class="RELATIONSHIP",
    structure="One record per IDVAR, IDVARVAL, and QNAM value per subject",
    keys=("STUDYID", "RDOMAIN", "USUBJID", "IDVAR", "IDVARVAL", "QNAM"),
    variables=(
        Variable("STUDYID", "Study Identifier"),
        Variable("RDOMAIN", "Related Domain Abbreviation"),
        Variable("USUBJID", "Unique Subject Identifier"),
        Variable("IDVAR", "Identifying Variable"),
        Variable("IDVARVAL", "Identifying Variable Value"),
        Variable("QNAM", "Qualifier Variable Name", codelist="QNAM"),
        Variable("QLABEL", "Qualifier Variable Label"),
        Variable("QVAL", "Data Value"),
        Variable("QORIG", "Origin"),
        Variable("QEVAL", "Evaluator"),
    ),
)


def usubjid(study_id: str, participant_id: str) -> str:
    return f"{study_id}-{participant_id}"


def study_day(day: date, reference: date) -> int:
    """SDTM study day: day 1 is the reference date, the day before it is -1 (there is no 0)."""
    delta = (day - reference).days
    return delta + 1 if delta >= 0 else delta


def result_text(value: float) -> str:
    """A result as characters: at most 4 decimals, no trailing zeros."""
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _statistics(d: Daily) -> dict[str, float | int | None]:
    return {
        MEAN: d.mean,
        MINIMUM: d.minimum,
        MAXIMUM: d.maximum,
        COUNT: d.counted,
        DOUBTFUL_COUNT: d.doubted,
    }


def _as_record(dataset: Dataset, values: dict[str, Value]) -> Record:
    return tuple(values[name] for name in dataset.names)


class VsRecords:
    """Turns daily summaries and readings into VS records (VSSEQ 1, 2, ... per subject over
    both) and readings' device statements into SUPPVS records."""

    def __init__(self) -> None:
        self._seq: dict[str, int] = {}
        # The metrics of the reading records taken under each wearable description.
        self.described: dict[int, set[str]] = {}

    def _next(self, subject: str) -> int:
        seq = self._seq.get(subject, 0) + 1
        self._seq[subject] = seq
        return seq

    def daily(self, rows: Sequence[Daily]) -> list[Record]:
        out: list[Record] = []
        for d in rows:
            vs = EXPORTED[d.metric].vs
            if vs is None:
                continue
            for stat, value in _statistics(d).items():
                out.append(self._daily_record(d, vs, stat, value))
        return out

    def _daily_record(self, d: Daily, vs: VsTest, stat: str, value: float | int | None) -> Record:
        subject = usubjid(d.study_id, d.participant_id)
        # No value: the mean, minimum or maximum of a day the device doubted entirely.
        done = value is not None
        if value is None:
            text = ""
        elif stat in COUNTS:
            text = str(int(value))
        else:
            text = result_text(float(value))
        unit = vs.unit if done and stat not in COUNTS else ""
        return _as_record(
            VS,
            {
                "STUDYID": d.study_id,
                "DOMAIN": DOMAIN,
                "USUBJID": subject,
                "SPDEVID": "",
                "VSSEQ": self._next(subject),
                "VSTESTCD": vs.testcd,
                "VSTEST": vs.test,
                "VSCAT": CATEGORY,
                "VSSCAT": stat,
                "VSORRES": text,
                "VSORRESU": unit,
                "VSSTRESC": text,
                "VSSTRESN": None if value is None else float(value),
                "VSSTRESU": unit,
                "VSSTAT": "" if done else NOT_DONE,
                "VSREASND": "" if done else REASON_DOUBTED,
                "VSLOINC": EXPORTED[d.metric].metric.loinc or "",
                "VSDRVFL": DERIVED,
                "VSDTC": d.day.isoformat(),
                "VSDY": study_day(d.day, d.enrolled_on),
            },
        )

    def readings(self, rows: Sequence[LocalReading]) -> tuple[list[Record], list[Record]]:
        """VS records of the readings, and SUPPVS records of what their devices said."""
        vs_out: list[Record] = []
        supp_out: list[Record] = []
        for r in rows:
            vs = EXPORTED[r.metric].vs
            if vs is None:
                continue
            subject = usubjid(r.study_id, r.participant_id)
            seq = self._next(subject)
            text = result_text(r.value)
            if r.description_id is not None:
                self.described.setdefault(r.description_id, set()).add(r.metric)
            vs_out.append(
                _as_record(
                    VS,
                    {
                        "STUDYID": r.study_id,
                        "DOMAIN": DOMAIN,
                        "USUBJID": subject,
                        "SPDEVID": spdevid(r.description_id),
                        "VSSEQ": seq,
                        "VSTESTCD": vs.testcd,
                        "VSTEST": vs.test,
                        "VSCAT": CATEGORY,
                        "VSSCAT": READING,
                        "VSORRES": text,
                        "VSORRESU": vs.unit,
                        "VSSTRESC": text,
                        "VSSTRESN": r.value,
                        "VSSTRESU": vs.unit,
                        "VSSTAT": "",
                        "VSREASND": "",
                        "VSLOINC": EXPORTED[r.metric].metric.loinc or "",
                        "VSDRVFL": "",
                        "VSDTC": r.local_time,
                        "VSDY": study_day(r.day, r.enrolled_on),
                    },
                )
            )
            if r.device_flags:
                supp_out.append(_qualifier(r, subject, seq, DEVICE_FLAGS, " ".join(r.device_flags)))
            if r.device_user is not None:
                supp_out.append(_qualifier(r, subject, seq, DEVICE_USER, str(r.device_user)))
        return vs_out, supp_out


def _qualifier(r: LocalReading, subject: str, seq: int, qnam: str, qval: str) -> Record:
    return _as_record(
        SUPPVS,
        {
            "STUDYID": r.study_id,
            "RDOMAIN": DOMAIN,
            "USUBJID": subject,
            "IDVAR": "VSSEQ",
            "IDVARVAL": str(seq),
            "QNAM": qnam,
            "QLABEL": QUALIFIER_LABELS[qnam],
            "QVAL": qval,
            "QORIG": ORIGIN,
            "QEVAL": "",
        },
    )
