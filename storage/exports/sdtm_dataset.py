"""One SDTM dataset written as CSV (streamed) and as SAS transport version 5 (XPT).

A dataset is described once (:class:`Dataset`: its name, label and variables with their
labels and types); the same description names the CSV header, the XPT labels and the
define.xml metadata (:mod:`storage.exports.define_xml`). XPT is written by pyreadstat
(ReadStat), which needs the whole dataset as one data frame, so the records are kept until
:meth:`DatasetWriter.finish` and memory grows with the dataset.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from storage.exports.output import OutputDir

Value = str | int | float | None
Record = tuple[Value, ...]


class DataType(StrEnum):
    """Define-XML data types of the variables written here."""

    TEXT = "text"
    INTEGER = "integer"
    FLOAT = "float"
    DATETIME = "datetime"
    DATE = "date"


NUMERIC = frozenset({DataType.INTEGER, DataType.FLOAT})


@dataclass(frozen=True, slots=True)
class Variable:
    """A dataset variable: name, label (SDTMIG wording, at most 40 characters for XPT v5),
    Define-XML data type and, where its values are controlled, the codelist's name."""

    name: str
    label: str
    data_type: DataType = DataType.TEXT
    codelist: str | None = None

    @property
    def numeric(self) -> bool:
        return self.data_type in NUMERIC


@dataclass(frozen=True, slots=True)
class Dataset:
    """An SDTM dataset: its name (``VS``, ``SUPPVS``, ``DM``), label, SDTM class, structure
    (one record per ...) and key variables, and its variables in order."""

    name: str
    label: str
    sdtm_class: str
    structure: str
    keys: tuple[str, ...]
    variables: tuple[Variable, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.variables)

    @property
    def csv_name(self) -> str:
        return f"{self.name.lower()}.csv"

    @property
    def xpt_name(self) -> str:
        return f"{self.name.lower()}.xpt"


@dataclass(frozen=True, slots=True)
class Shape:
    """What define.xml says of a variable's values: Length (characters of a text value,
    digits of a number) and, for floats, SignificantDigits (decimals)."""

    length: int
    significant_digits: int | None = None


def _digits(value: float) -> tuple[int, int]:
    """Digits in all and after the point of ``value`` as written with 15 significant ones."""
    text = format(abs(value), ".15g")
    if "e" in text:
        return 15, 15
    whole, _, fraction = text.partition(".")
    return len(whole) + len(fraction), len(fraction)


def shape(variable: Variable, values: Sequence[Value]) -> Shape:
    """The Length (at least 1) and SignificantDigits of a variable's written values."""
    present = [v for v in values if v is not None and v != ""]
    if variable.data_type is DataType.FLOAT:
        digits = [_digits(float(v)) for v in present]
        return Shape(max((d[0] for d in digits), default=1), max((d[1] for d in digits), default=0))
    if variable.data_type is DataType.INTEGER:
        return Shape(max((len(str(int(v))) for v in present), default=1))
    return Shape(max((len(str(v).encode()) for v in present), default=1))


class DatasetWriter:
    """Streams a dataset's records to CSV and keeps them for the XPT file."""

    def __init__(self, out: OutputDir, dataset: Dataset) -> None:
        self.dataset = dataset
        self._out = out
        self._binary = out.open(dataset.csv_name)
        self._text = io.TextIOWrapper(self._binary, encoding="utf-8", newline="")
        self._csv = csv.writer(self._text, lineterminator="\r\n")
        self._csv.writerow(dataset.names)
        self.records: list[Record] = []

    def write(self, records: Sequence[Record]) -> None:
        self._csv.writerows(records)
        self._out.count(self.dataset.csv_name, len(records))
        self.records.extend(records)

    def columns(self) -> list[Sequence[Value]]:
        return list(zip(*self.records, strict=True)) or [() for _ in self.dataset.variables]

    def shapes(self) -> dict[str, Shape]:
        return {
            v.name: shape(v, col)
            for v, col in zip(self.dataset.variables, self.columns(), strict=True)
        }

    def finish(self, *, write_xpt: bool = True) -> None:
        self._text.close()
        if write_xpt:
            self._write_xpt()

    def _write_xpt(self) -> None:
        import pandas as pd  # type: ignore[import-untyped]
        import pyreadstat

        frame = pd.DataFrame(
            {
                v.name: pd.Series(col, dtype="float64" if v.numeric else "object")
                for v, col in zip(self.dataset.variables, self.columns(), strict=True)
            }
        )
        pyreadstat.write_xport(
            frame,
            str(self._out.path(self.dataset.xpt_name)),
            file_label=self.dataset.label,
            column_labels={v.name: v.label for v in self.dataset.variables},
            table_name=self.dataset.name,
            file_format_version=5,
        )
        self._out.count(self.dataset.xpt_name, len(self.records))

    def discard(self) -> None:
        self._text.close()
