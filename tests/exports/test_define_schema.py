"""The SDTM export's define.xml is valid against CDISC's Define-XML 2.0 schema, with and
without data, and the schema check is a real one: the faults a hand edit or a regression
would make are each refused."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest
import xmlschema

from storage.exports.output import OutputDir
from storage.exports.sdtm import SdtmWriter
from storage.exports.source import Daily, Description, LocalReading, Subject
from tests.exports.sdtm_define import define_schema

ENROLLED = date(2026, 2, 25)


def export(directory: Path, *, with_data: bool) -> Path:
    out = OutputDir(directory)
    writer = SdtmWriter(out)
    if with_data:
        writer.write_daily(
            [Daily("P1", "S1", ENROLLED, "heart_rate", date(2026, 2, 27), 70.5, 60.0, 81.0, 10, 1)]
        )
        writer.write_readings(
            [
                LocalReading(
                    "P1",
                    "S1",
                    ENROLLED,
                    "heart_rate",
                    71.0,
                    ["QUESTIONABLE"],
                    1,
                    date(2026, 2, 27),
                    "2026-02-27T20:00+01:00",
                    1,
                ),
                LocalReading(
                    "P1",
                    "S1",
                    ENROLLED,
                    "systolic_bp",
                    121.0,
                    None,
                    None,
                    date(2026, 2, 27),
                    "2026-02-27T20:05+01:00",
                    2,
                ),
            ]
        )
    writer.finish(
        [Subject("P1", "S1", "SITE-A", "2026-02-25T10:00+01:00", "2026-02-25T09:00+01:00")]
        if with_data
        else [],
        [Description(1, "hub-1", "hr", "Acme", "HR-1", "SN1", "1.0", "rev-B")] if with_data else [],
        study_id="S1",
    )
    out.commit()
    return directory / "define.xml"


@pytest.mark.parametrize("with_data", [True, False], ids=["with-data", "empty"])
def test_the_define_xml_is_valid_against_the_schema(tmp_path: Path, with_data: bool) -> None:
    define_schema().validate(str(export(tmp_path / "out", with_data=with_data)))


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param(' def:DefineVersion="2.0.0"', "", id="no-define-version"),
        pytest.param(' Mandatory="Yes"', ' Mandatory="Maybe"', id="mandatory-maybe"),
        pytest.param('ODMVersion="1.3.2"', 'ODMVersion="9.9"', id="odm-version"),
        pytest.param(' Repeating="No"', ' Repeating="Often"', id="repeating-often"),
    ],
)
def test_a_broken_define_xml_is_refused(tmp_path: Path, old: str, new: str) -> None:
    path = export(tmp_path / "out", with_data=True)
    text = path.read_text(encoding="utf-8")
    assert old in text
    broken = tmp_path / "broken.xml"
    broken.write_text(text.replace(old, new, 1), encoding="utf-8")
    with pytest.raises(xmlschema.XMLSchemaValidationError):
        define_schema().validate(str(broken))
