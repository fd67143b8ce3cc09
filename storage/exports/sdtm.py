"""A CDISC SDTM export: VS (daily summaries by local day, and one record per reading),
SUPPVS (what the device said about a reading), DM (one record per exported participant),
DI (the wearables the readings were taken with, SDTMIG-MD), each as CSV and as SAS
transport (XPT v5), and define.xml describing them.

The records come from the database (:func:`storage.exports.source.stream_sdtm`: daily
summaries, then readings, from one snapshot; :func:`storage.exports.source.subjects` for DM,
:func:`storage.exports.source.descriptions` for DI) and are built by
:mod:`storage.exports.sdtm_vs`, :mod:`storage.exports.sdtm_dm` and
:mod:`storage.exports.sdtm_di`. Local
days and times are those of the participant's zone valid at each reading's time
(:mod:`storage.time_zones`). CSV is streamed; XPT is written by pyreadstat (ReadStat), which
needs each dataset as one data frame, so its memory grows with the dataset, and with the
per-reading records that is with the number of readings exported (docs/exports.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from storage.exports import sdtm_di, sdtm_dm
from storage.exports.define_xml import write as write_define_xml
from storage.exports.output import OutputDir
from storage.exports.sdtm_dataset import DatasetWriter
from storage.exports.sdtm_vs import (
    NAMES,
    NOT_DONE,
    READING,
    REASON_DOUBTED,
    STATISTICS,
    SUPPVS,
    VS,
    VsRecords,
    result_text,
    study_day,
    usubjid,
)
from storage.exports.source import Daily, Description, LocalReading, Subject

__all__ = [
    "NAMES",
    "NOT_DONE",
    "READING",
    "REASON_DOUBTED",
    "STATISTICS",
    "SdtmWriter",
    "result_text",
    "study_day",
    "usubjid",
]


class SdtmWriter:
    """Writes the VS, SUPPVS, DM and DI datasets and define.xml of one export."""

    def __init__(self, out: OutputDir) -> None:
        self._out = out
        self._build = VsRecords()
        self._vs = DatasetWriter(out, VS)
        self._supp = DatasetWriter(out, SUPPVS)
        self._dm = DatasetWriter(out, sdtm_dm.DM)
        self._di = DatasetWriter(out, sdtm_di.DI)

    @property
    def rows(self) -> int:
        """VS records written so far."""
        return len(self._vs.records)

    def write_daily(self, rows: Sequence[Daily]) -> None:
        self._vs.write(self._build.daily(rows))

    def write_readings(self, rows: Sequence[LocalReading]) -> None:
        vs, supp = self._build.readings(rows)
        self._vs.write(vs)
        self._supp.write(supp)

    @property
    def description_ids(self) -> list[int]:
        """The wearable descriptions the reading records written so far were taken under."""
        return sorted(self._build.described)

    def finish(
        self,
        subjects: Sequence[Subject],
        described: Sequence[Description],
        *,
        study_id: str,
    ) -> None:
        """Write DM of ``subjects`` and DI of ``described`` (the descriptions of
        :attr:`description_ids`), close every dataset and write define.xml."""
        self._dm.write(sdtm_dm.records(subjects))
        self._di.write(sdtm_di.records(study_id, described, self._build.described))
        writers = (self._vs, self._supp, self._dm, self._di)
        for w in writers:
            w.finish()
        write_define_xml(self._out, study_id, writers)

    def discard(self) -> None:
        """Close every dataset's file, even when closing one fails (a full disk fails the
        flush); the first such error is raised once all are closed."""
        failure: OSError | None = None
        for w in (self._vs, self._supp, self._dm, self._di):
            try:
                w.discard()
            except OSError as e:
                failure = failure or e
        if failure is not None:
            raise failure
