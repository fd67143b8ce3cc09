"""SDTM DI (Device Identifiers, SDTMIG-MD): one device per wearable description that a VS
reading record was taken under, and the SPDEVID that ties the reading to it.

A wearable is described by what it reported about itself (``sensor_descriptions``); a
strap replaced under the same sensor name, or a firmware update, is a new description and
so a new device here, as it is a new Device in FHIR. SPDEVID is ``SENSOR-<description id>``:
short (at most 26 characters), ASCII, the same in every export of the same database, and
not built from the hub's id or the sensor's name, which together may exceed what SAS
tools expect of an identifier. DI gives one record per parameter the wearable reported
(manufacturer, model, serial number, firmware and hardware versions) and its type where the
metrics of its exported readings name one kind of device; nothing it did not report is
written. docs/exports.md has every parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from storage.exports.sdtm_dataset import Dataset, DataType, Record, Variable
from storage.exports.source import Description

DOMAIN = "DI"
PREFIX = "SENSOR-"
# DISEQ: SDTMIG-MD numbers records within a parameter of a device; each parameter is
# written at most once per device, so it is 1 for every record.
SEQ = 1

DI = Dataset(
    name=DOMAIN,
    label="Device Identifiers",
    sdtm_class="STUDY REFERENCE",
    structure="One record per device identifier element per device",
    keys=("STUDYID", "SPDEVID", "DIPARMCD"),
    variables=(
        Variable("STUDYID", "Study Identifier"),
        Variable("DOMAIN", "Domain Abbreviation"),
        Variable("SPDEVID", "Sponsor Device Identifier"),
        Variable("DISEQ", "Sequence Number", DataType.INTEGER),
        Variable("DIPARMCD", "Device Identifier Element Short Name", codelist="DIPARMCD"),
        Variable("DIPARM", "Device Identifier Element Name"),
        Variable("DIVAL", "Device Identifier Element Value"),
    ),
)


@dataclass(frozen=True, slots=True)
class Parameter:
    """A DIPARMCD and its DIPARM; ``extended``: not a CDISC controlled term (a sponsor
    extension of the extensible DIPARMCD codelist)."""

    code: str
    name: str
    extended: bool = False


DEVTYPE = Parameter("DEVTYPE", "Device Type")
MANUF = Parameter("MANUF", "Manufacturer")
MODEL = Parameter("MODEL", "Model Number")
SERIAL = Parameter("SERIAL", "Serial Number")
FIRMVER = Parameter("FIRMVER", "Firmware Version", extended=True)
HARDVER = Parameter("HARDVER", "Hardware Version", extended=True)
# In the order they are written for a device.
PARAMETERS = (DEVTYPE, MANUF, MODEL, SERIAL, FIRMVER, HARDVER)

# The kind of wearable a metric is measured with. A pulse rate comes from a cuff, an
# oximeter or a strap alike, so it names no kind.
KINDS = {
    "heart_rate": "HEART RATE MONITOR",
    "systolic_bp": "BLOOD PRESSURE MONITOR",
    "diastolic_bp": "BLOOD PRESSURE MONITOR",
    "mean_bp": "BLOOD PRESSURE MONITOR",
    "spo2": "PULSE OXIMETER",
    "body_temperature": "THERMOMETER",
    "body_weight": "WEIGHING SCALE",
}


def spdevid(description_id: int | None) -> str:
    """The SPDEVID of a wearable description; empty for a wearable never described."""
    return "" if description_id is None else f"{PREFIX}{description_id}"


def kind(metrics: Iterable[str]) -> str | None:
    """The device type the metrics name, if they name exactly one."""
    kinds = {KINDS[m] for m in metrics if m in KINDS}
    return kinds.pop() if len(kinds) == 1 else None


def records(
    study_id: str, described: Sequence[Description], metrics: Mapping[int, Iterable[str]]
) -> list[Record]:
    """DI records of these descriptions, ``metrics`` being the metrics of each one's
    exported readings."""
    out: list[Record] = []
    for d in described:
        values = {
            DEVTYPE: kind(metrics.get(d.description_id, ())),
            MANUF: d.manufacturer,
            MODEL: d.model,
            SERIAL: d.serial,
            FIRMVER: d.firmware,
            HARDVER: d.hardware,
        }
        device = spdevid(d.description_id)
        for parameter in PARAMETERS:
            value = values[parameter]
            if value is None or value == "":
                continue
            out.append((study_id, DOMAIN, device, SEQ, parameter.code, parameter.name, value))
    return out
