"""A CDISC SDTM VS-style dataset of daily summaries, as CSV and as SAS transport (XPT v5).

One record per participant, vital-sign test, UTC day and statistic (mean, minimum, maximum,
count), the statistic in VSSCAT: see docs/exports.md for every variable. The summaries are
computed by the database over exactly the readings the other exports would include (the same
consent windows). CSV is streamed; XPT is written by pyreadstat (ReadStat), which needs the
whole dataset as one data frame, so its memory grows with the dataset (a study-year of
daily summaries is some hundred thousand records: small).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from datetime import date

from storage.exports.mapping import EXPORTED
from storage.exports.output import OutputDir
from storage.exports.source import Row

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
    ("VSLOINC", "LOINC Code"),
    ("VSDRVFL", "Derived Flag"),
    ("VSDTC", "Date/Time of Measurements"),
    ("VSDY", "Study Day of Vital Signs"),
)
NAMES = tuple(v for v, _ in VARIABLES)
NUMERIC = frozenset({"VSSEQ", "VSSTRESN", "VSDY"})
# The statistics, in the order they are written, as VSSCAT says them.
STATISTICS = ("DAILY MEAN", "DAILY MINIMUM", "DAILY MAXIMUM", "DAILY COUNT")


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


class SdtmWriter:
    """Turns daily summary rows (``source.DAILY_COLUMNS``) into VS records."""

    def __init__(self, out: OutputDir) -> None:
        self._out = out
        self._binary = out.open(CSV_NAME)
        self._text = io.TextIOWrapper(self._binary, encoding="utf-8", newline="")
        self._csv = csv.writer(self._text, lineterminator="\r\n")
        self._csv.writerow(NAMES)
        self._seq: dict[str, int] = {}
        self.records: list[tuple[str | int | float | None, ...]] = []

    def write(self, rows: Sequence[Row]) -> None:
        batch: list[tuple[str | int | float | None, ...]] = []
        for participant, study, enrolled_on, metric, day, mean, low, high, n in rows:
            vs = EXPORTED[metric].vs
            if vs is None:
                continue
            subject = usubjid(study, participant)
            loinc = EXPORTED[metric].metric.loinc or ""
            dy = study_day(day, enrolled_on)
            for stat, value in zip(STATISTICS, (mean, low, high, n), strict=True):
                seq = self._seq.get(subject, 0) + 1
                self._seq[subject] = seq
                is_count = stat == "DAILY COUNT"
                text = str(int(value)) if is_count else result_text(float(value))
                unit = "" if is_count else vs.unit
                batch.append(
                    (
                        study,
                        DOMAIN,
                        subject,
                        seq,
                        vs.testcd,
                        vs.test,
                        CATEGORY,
                        stat,
                        text,
                        unit,
                        text,
                        float(value),
                        unit,
                        loinc,
                        DERIVED,
                        day.isoformat(),
                        dy,
                    )
                )
        self._csv.writerows(batch)
        self._out.count(CSV_NAME, len(batch))
        self.records.extend(batch)

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
