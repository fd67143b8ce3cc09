"""A CDISC SDTM VS-style dataset of daily summaries, as CSV and as SAS transport (XPT v5).

One record per participant, vital-sign test, UTC day and statistic (mean, minimum, maximum,
count, doubtful count), the statistic in VSSCAT: see docs/exports.md for every variable. The
summaries are computed by the database over the readings the other exports would include (the
same consent windows) except those the device marked invalid or questionable
(``ingest.flags``): those are counted in DAILY DOUBTFUL COUNT instead. A day whose readings
the device all doubted has its mean, minimum and maximum records NOT DONE (VSSTAT), with the
reason in VSREASND and no result. CSV is streamed; XPT is written by pyreadstat (ReadStat),
which needs the whole dataset as one data frame, so its memory grows with the dataset (a
study-year of daily summaries is some hundred thousand records: small).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from datetime import date

from storage.exports.mapping import EXPORTED, VsTest
from storage.exports.output import OutputDir
from storage.exports.source import Daily

CSV_NAME = "vs.csv"
XPT_NAME = "vs.xpt"
DOMAIN = "VS"
CATEGORY = "WEARABLE"
DERIVED = "Y"

# (variable, label): labels as in the SDTMIG, at most 40 characters (XPT v5).
VARIABLES: tuple[tuple[str, str], ...] = (
    ("STUDYID", "Study Identifier"),
    ("DOMAIN", "Domain Abbreviation"),
    ("USUBJID", "Unique Subject Identifier"),
    ("VSSEQ", "Sequence Number"),
    ("VSTESTCD", "Vital Signs Test Short Name"),
    ("VSTEST", "Vital Signs Test Name"),
    ("VSCAT", "Category for Vital Signs"),
    ("VSSCAT", "Subcategory for Vital Signs"),
    ("VSORRES", "Result or Finding in Original Units"),
    ("VSORRESU", "Original Units"),
    ("VSSTRESC", "Character Result/Finding in Std Format"),
    ("VSSTRESN", "Numeric Result/Finding in Standard Units"),
    ("VSSTRESU", "Standard Units"),
    ("VSSTAT", "Completion Status"),
    ("VSREASND", "Reason Not Performed"),
    ("VSLOINC", "LOINC Code"),
    ("VSDRVFL", "Derived Flag"),
    ("VSDTC", "Date/Time of Measurements"),
    ("VSDY", "Study Day of Vital Signs"),
)
NAMES = tuple(v for v, _ in VARIABLES)
NUMERIC = frozenset({"VSSEQ", "VSSTRESN", "VSDY"})
MEAN = "DAILY MEAN"
MINIMUM = "DAILY MINIMUM"
MAXIMUM = "DAILY MAXIMUM"
COUNT = "DAILY COUNT"
DOUBTFUL_COUNT = "DAILY DOUBTFUL COUNT"
# The statistics, in the order they are written, as VSSCAT says them.
STATISTICS = (MEAN, MINIMUM, MAXIMUM, COUNT, DOUBTFUL_COUNT)
COUNTS = frozenset({COUNT, DOUBTFUL_COUNT})
# A day whose readings the device all marked invalid or questionable: no mean, minimum or
# maximum, said so in SDTM's terms.
NOT_DONE = "NOT DONE"
REASON_DOUBTED = "DEVICE MARKED INVALID OR QUESTIONABLE"

Record = tuple[str | int | float | None, ...]


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


class SdtmWriter:
    """Turns daily summaries (``source.Daily``) into VS records."""

    def __init__(self, out: OutputDir) -> None:
        self._out = out
        self._binary = out.open(CSV_NAME)
        self._text = io.TextIOWrapper(self._binary, encoding="utf-8", newline="")
        self._csv = csv.writer(self._text, lineterminator="\r\n")
        self._csv.writerow(NAMES)
        self._seq: dict[str, int] = {}
        self.records: list[Record] = []

    def write(self, rows: Sequence[Daily]) -> None:
        batch: list[Record] = []
        for d in rows:
            vs = EXPORTED[d.metric].vs
            if vs is None:
                continue
            for stat, value in _statistics(d).items():
                batch.append(self._record(d, vs, stat, value))
        self._csv.writerows(batch)
        self._out.count(CSV_NAME, len(batch))
        self.records.extend(batch)

    def _record(self, d: Daily, vs: VsTest, stat: str, value: float | int | None) -> Record:
        subject = usubjid(d.study_id, d.participant_id)
        seq = self._seq.get(subject, 0) + 1
        self._seq[subject] = seq
        # No value: the mean, minimum or maximum of a day the device doubted entirely.
        done = value is not None
        if value is None:
            text = ""
        elif stat in COUNTS:
            text = str(int(value))
        else:
            text = result_text(float(value))
        unit = vs.unit if done and stat not in COUNTS else ""
        record: dict[str, str | int | float | None] = {
            "STUDYID": d.study_id,
            "DOMAIN": DOMAIN,
            "USUBJID": subject,
            "VSSEQ": seq,
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
        }
        return tuple(record[name] for name in NAMES)

    def finish(self, *, write_xpt: bool = True) -> None:
        self._text.close()
        if write_xpt:
            self._write_xpt()

    def _write_xpt(self) -> None:
        import pandas as pd  # type: ignore[import-untyped]
        import pyreadstat

        columns = list(zip(*self.records, strict=True)) or [() for _ in NAMES]
        frame = pd.DataFrame(
            {
                name: pd.Series(col, dtype="float64" if name in NUMERIC else "object")
                for name, col in zip(NAMES, columns, strict=True)
            }
        )
        pyreadstat.write_xport(
            frame,
            str(self._out.path(XPT_NAME)),
            file_label="Vital Signs",
            column_labels=dict(VARIABLES),
            table_name=DOMAIN,
            file_format_version=5,
        )
        self._out.count(XPT_NAME, len(self.records))

    def discard(self) -> None:
        self._text.close()
