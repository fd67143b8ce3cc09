"""FHIR R4 resources as NDJSON, in the FHIR Bulk Data layout: one file per resource type
(``Observation.ndjson``, ``Patient.ndjson``, ``Device.ndjson``) and a manifest shaped like
the Bulk Data completion response (``manifest.json``, with relative file names as ``url``).

- Observation: one per reading. LOINC code (and our own metric code), UCUM valueQuantity,
  effectiveDateTime (the reading's time), issued (when the gateway received it), subject
  (the Patient), device (the wearable's Device), category per metric (docs/exports.md).
  What the device said about the reading: one ``device-flag`` extension per flag and a
  ``device-user`` extension (:data:`FLAG_EXTENSION`, :data:`USER_EXTENSION`); a reading it
  marked invalid or questionable also has an ``interpretation`` saying so (a local code
  system, :data:`QUALITY_SYSTEM`, with text), and a measurement site or sample location
  flag gives ``bodySite.text``. The value stays, and ``status`` stays final.
- Patient: pseudonymous: the study's participant id as an identifier, nothing else about
  the person, and the PSEUDED security label.
- Device: the hub (``identifier`` = device id) and each description of a wearable seen
  through it that an exported reading was taken under (``sensor_history``): its reported
  manufacturer, model, serial and firmware, its ``parent`` the hub. A strap replaced under
  the same sensor name, or a firmware update, is another Device resource, and each
  Observation references the one valid at its effectiveDateTime.

Resource ids are derived (SHA-256, truncated) from what identifies the resource, so the same
reading gets the same id in every export, and ids stay inside FHIR's id alphabet whatever
characters a participant or sensor name holds. Observation lines are assembled from cached,
pre-encoded fragments (every string through ``json.dumps``): the per-reading cost is one
hash and one string join.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple

from psycopg.rows import RowMaker

from ingest.flags import IN_DOUBT, FlagClass, worst
from storage.exports import mapping, source
from storage.exports.output import OutputDir


class ObservationRow(NamedTuple):
    """What one Observation is made of: the export query's columns of these names."""

    participant_id: str
    study_id: str
    time_iso: str
    metric: str
    value: float
    unit: str
    device_id: str
    envelope_seq: int
    sensor: str
    received_at_iso: str
    sensor_description_id: int | None
    device_flags: list[str] | None
    device_user: int | None


COLUMNS = source.columns(ObservationRow._fields)


def observation_rows(cursor: object) -> RowMaker[ObservationRow]:
    """Row factory for :data:`COLUMNS`: each row as an :class:`ObservationRow`."""
    return ObservationRow._make


READING_SYSTEM = "urn:trialstream:reading"
DEVICE_SYSTEM = "urn:trialstream:device"
SENSOR_SYSTEM = "urn:trialstream:sensor"
PSEUDONYMIZED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "PSEUDED",
    "display": "pseudonymized",
}
RESOURCE_FILES = ("Patient", "Device", "Observation")
# What the device said about a reading (docs/exports.md, "What the device said"): one
# extension per flag (valueCode: the flag as stored) and one for its user index on a shared
# wearable (valueInteger, 0-255).
FLAG_EXTENSION = "https://trialstream.org/fhir/StructureDefinition/device-flag"
USER_EXTENSION = "https://trialstream.org/fhir/StructureDefinition/device-user"
# Observation.interpretation of a reading the device put in doubt: the class of its worst flag.
QUALITY_SYSTEM = "https://trialstream.org/fhir/CodeSystem/device-quality"
QUALITY_DISPLAY = {
    FlagClass.INVALID: "Device marked the measurement invalid",
    FlagClass.QUESTIONABLE: "Device marked the measurement questionable",
}
# Flag families that name where on the body the device measured (Temperature Type, the
# glucose sample location): the name after the prefix becomes bodySite.text.
BODY_SITE_PREFIXES = ("site_", "location_")
# Values of those families that name no place on the body.
NOT_A_BODY_SITE = ("control_solution", "reserved_")


def fhir_id(*parts: str) -> str:
    """A resource id in FHIR's alphabet ([A-Za-z0-9-.], at most 64), stable for ``parts``."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def participant_system(study_id: str) -> str:
    return f"urn:trialstream:study:{study_id}:participant"


def patient_id(study_id: str, participant_id: str) -> str:
    return fhir_id("Patient", study_id, participant_id)


def hub_device_id(device_id: str) -> str:
    return fhir_id("Device", device_id)


def sensor_device_id(device_id: str, sensor: str, description_id: int | None = None) -> str:
    """A wearable's Device: one per description of it (``sensor_descriptions`` row), or one
    for a wearable the hub never described."""
    if description_id is None:
        return fhir_id("Device", device_id, sensor)
    return fhir_id("Device", device_id, sensor, str(description_id))


# A wearable seen through a hub under one description: (device id, sensor, description id,
# None when never described).
SensorKey = tuple[str, str, int | None]


def _j(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _code_fragment(metric: str) -> str:
    e = mapping.EXPORTED[metric]
    codings: list[dict[str, str]] = []
    if e.metric.loinc is not None:
        codings.append({"system": mapping.LOINC_SYSTEM, "code": e.metric.loinc})
    codings.append({"system": mapping.METRIC_SYSTEM, "code": metric})
    category = [{"coding": [{"system": mapping.OBSERVATION_CATEGORY_SYSTEM, "code": e.category}]}]
    return f'"category":{_j(category)},"code":{_j({"coding": codings, "text": e.text})}'


def body_site(flags: Iterable[str]) -> str | None:
    """The measurement site the device named, as text (``site_armpit`` -> ``armpit``)."""
    sites = []
    for flag in flags:
        if flag.startswith(BODY_SITE_PREFIXES):
            name = flag.split("_", 1)[1]
            if not name.startswith(NOT_A_BODY_SITE):
                sites.append(name.replace("_", " "))
    return ", ".join(sites) or None


def device_statement(flags: Sequence[str], user: int | None) -> dict[str, Any]:
    """The Observation elements that carry what the device said: ``extension`` (flags and
    user), ``interpretation`` (invalid or questionable only) and ``bodySite``."""
    out: dict[str, Any] = {}
    extensions: list[dict[str, Any]] = [{"url": FLAG_EXTENSION, "valueCode": f} for f in flags]
    if user is not None:
        extensions.append({"url": USER_EXTENSION, "valueInteger": user})
    if extensions:
        out["extension"] = extensions
    quality = worst(flags)
    if quality is not None and quality is not FlagClass.INFO:
        doubted = ", ".join(f for f in flags if f in IN_DOUBT)
        display = QUALITY_DISPLAY[quality]
        out["interpretation"] = [
            {
                "coding": [{"system": QUALITY_SYSTEM, "code": quality.value, "display": display}],
                "text": f"{display}: {doubted}",
            }
        ]
    site = body_site(flags)
    if site is not None:
        out["bodySite"] = {"text": site}
    return out


@functools.lru_cache(maxsize=4096)
def _statement_fragments(flags: tuple[str, ...], user: int | None) -> tuple[str, str]:
    """:func:`device_statement` as two pre-encoded fragments: the one that goes before
    ``identifier`` and the one after ``valueQuantity`` (FHIR's element order)."""
    elements = device_statement(flags, user)
    head = f'"extension":{_j(elements["extension"])},' if "extension" in elements else ""
    tail = "".join(
        f',"{name}":{_j(elements[name])}'
        for name in ("interpretation", "bodySite")
        if name in elements
    )
    return head, tail


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """A hub and one description of a wearable seen through it (``description_id`` and the
    sensor fields None when never reported)."""

    device_id: str
    participant_id: str
    study_id: str
    revoked: bool
    sensor: str
    manufacturer: str | None
    model: str | None
    serial: str | None
    firmware: str | None
    hardware: str | None
    description_id: int | None


def patient(study_id: str, participant_id: str) -> dict[str, object]:
    return {
        "resourceType": "Patient",
        "id": patient_id(study_id, participant_id),
        "meta": {"security": [PSEUDONYMIZED]},
        "identifier": [{"system": participant_system(study_id), "value": participant_id}],
    }


def hub_device(info: DeviceInfo) -> dict[str, object]:
    return {
        "resourceType": "Device",
        "id": hub_device_id(info.device_id),
        "identifier": [{"system": DEVICE_SYSTEM, "value": info.device_id}],
        "status": "inactive" if info.revoked else "active",
        "type": {"text": "trialstream hub"},
        "patient": {"reference": f"Patient/{patient_id(info.study_id, info.participant_id)}"},
    }


def sensor_device(info: DeviceInfo) -> dict[str, object]:
    resource: dict[str, object] = {
        "resourceType": "Device",
        "id": sensor_device_id(info.device_id, info.sensor, info.description_id),
        "identifier": [{"system": SENSOR_SYSTEM, "value": f"{info.device_id}/{info.sensor}"}],
        "deviceName": [{"name": info.sensor, "type": "user-friendly-name"}],
        "patient": {"reference": f"Patient/{patient_id(info.study_id, info.participant_id)}"},
        "parent": {"reference": f"Device/{hub_device_id(info.device_id)}"},
    }
    if info.manufacturer:
        resource["manufacturer"] = info.manufacturer
    if info.model:
        resource["modelNumber"] = info.model
    if info.serial:
        resource["serialNumber"] = info.serial
    versions = [
        {"type": {"text": kind}, "value": value}
        for kind, value in (("firmware", info.firmware), ("hardware", info.hardware))
        if value
    ]
    if versions:
        resource["version"] = versions
    return resource


class FhirWriter:
    """Observation lines as chunks arrive; Patients, Devices and the manifest at the end."""

    def __init__(self, out: OutputDir) -> None:
        self._out = out
        self._observations: BinaryIO = out.open("Observation.ndjson")
        self._codes: dict[str, str] = {}
        self._subjects: dict[tuple[str, str], str] = {}
        self._devices: dict[SensorKey, str] = {}
        self.counts: dict[str, int] = dict.fromkeys(RESOURCE_FILES, 0)

    @property
    def seen_participants(self) -> list[tuple[str, str]]:
        """(study, participant) of every Observation written, in order."""
        return sorted(self._subjects)

    @property
    def seen_sensors(self) -> list[SensorKey]:
        """(device id, sensor, description id) of every Observation written, in order."""
        return sorted(self._devices, key=lambda k: (k[0], k[1], -1 if k[2] is None else k[2]))

    def write(self, rows: Sequence[ObservationRow]) -> None:
        lines: list[str] = []
        for r in rows:
            code = self._codes.get(r.metric)
            if code is None:
                code = self._codes[r.metric] = _code_fragment(r.metric)
            who = (r.study_id, r.participant_id)
            subject = self._subjects.get(who)
            if subject is None:
                subject = self._subjects[who] = patient_id(r.study_id, r.participant_id)
            wearable = (r.device_id, r.sensor, r.sensor_description_id)
            device = self._devices.get(wearable)
            if device is None:
                device = self._devices[wearable] = sensor_device_id(
                    r.device_id, r.sensor, r.sensor_description_id
                )
            if r.device_flags is None and r.device_user is None:
                head = tail = ""
            else:
                head, tail = _statement_fragments(tuple(r.device_flags or ()), r.device_user)
            key = f"{r.device_id}/{r.envelope_seq}/{r.sensor}/{r.metric}/{r.time_iso}"
            v = repr(r.value)
            u = _j(r.unit)
            lines.append(
                f'{{"resourceType":"Observation","id":"{fhir_id("Observation", key, v)}",{head}'
                f'"identifier":[{{"system":"{READING_SYSTEM}","value":{_j(key)}}}],'
                f'"status":"final",{code},"subject":{{"reference":"Patient/{subject}"}},'
                f'"effectiveDateTime":"{r.time_iso}","issued":"{r.received_at_iso}",'
                f'"valueQuantity":{{"value":{v},"unit":{u},'
                f'"system":"{mapping.UCUM_SYSTEM}","code":{u}}}{tail},'
                f'"device":{{"reference":"Device/{device}"}}}}\n'
            )
        self._observations.write("".join(lines).encode())
        self._out.count("Observation.ndjson", len(rows))
        self.counts["Observation"] += len(rows)

    def _write_resources(self, name: str, resources: Iterable[Mapping[str, object]]) -> None:
        with self._out.open(f"{name}.ndjson") as f:
            for r in resources:
                f.write((_j(r) + "\n").encode())
                self._out.count(f"{name}.ndjson", 1)
                self.counts[name] += 1

    def finish(self, devices: Sequence[DeviceInfo], *, transaction_time: str, request: str) -> None:
        self._observations.close()
        self._write_resources("Patient", (patient(s, p) for s, p in self.seen_participants))
        hubs = {d.device_id: d for d in devices}
        self._write_resources(
            "Device",
            [*(hub_device(h) for _, h in sorted(hubs.items())), *map(sensor_device, devices)],
        )
        manifest = {
            "transactionTime": transaction_time,
            "request": request,
            "requiresAccessToken": False,
            "output": [
                {"type": name, "url": f"{name}.ndjson", "count": self.counts[name]}
                for name in RESOURCE_FILES
            ],
            "error": [],
        }
        with self._out.open("manifest.json") as f:
            f.write(json.dumps(manifest, indent=2).encode() + b"\n")

    def discard(self) -> None:
        self._observations.close()
