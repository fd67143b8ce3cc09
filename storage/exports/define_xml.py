"""define.xml (CDISC Define-XML 2.0 on ODM 1.3.2) describing the SDTM datasets written.

Built from the same :class:`~storage.exports.sdtm_dataset.Dataset` descriptions that name the
CSV header and the XPT labels, and from the written records (Length and SignificantDigits are
the longest values written), so it cannot disagree with the datasets: one ItemGroupDef per
dataset (with its XPT file as ``def:leaf``), one ItemDef per variable, value-level metadata
for VSORRES (a daily statistic is derived, a reading collected), CodeLists for the
controlled variables (DIPARMCD's sponsor terms marked ``def:ExtendedValue``) and MethodDefs
for what is derived. Written with the standard library's
ElementTree: the document is a few hundred elements, built once.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from storage.exports.mapping import EXPORTED
from storage.exports.output import OutputDir
from storage.exports.sdtm_dataset import Dataset, DatasetWriter, Shape, Variable, shape
from storage.exports.sdtm_di import DI, PARAMETERS
from storage.exports.sdtm_vs import (
    NOT_DONE,
    QUALIFIER_LABELS,
    READING,
    STATISTICS,
    SUBCATEGORIES,
    VS,
)

FILE_NAME = "define.xml"
ODM_NS = "http://www.cdisc.org/ns/odm/v1.3"
DEF_NS = "http://www.cdisc.org/ns/def/v2.0"
XLINK_NS = "http://www.w3.org/1999/xlink"
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
STANDARD_NAME = "SDTM-IG"
STANDARD_VERSION = "3.2"

ET.register_namespace("", ODM_NS)
ET.register_namespace("def", DEF_NS)
ET.register_namespace("xlink", XLINK_NS)

# Required variables (Mandatory="Yes"); the others may be empty.
REQUIRED = frozenset(
    {
        "STUDYID",
        "DOMAIN",
        "RDOMAIN",
        "USUBJID",
        "SUBJID",
        "SITEID",
        "VSSEQ",
        "VSTESTCD",
        "VSTEST",
        "IDVAR",
        "IDVARVAL",
        "QNAM",
        "QLABEL",
        "QVAL",
        "QORIG",
        "DISEQ",
        "DIPARMCD",
        "DIPARM",
        "DIVAL",
    }
)
# Required in these datasets only (VS's SPDEVID is empty where no device is known).
REQUIRED_IN = {DI.name: frozenset({"SPDEVID"})}
REFERENCE_DATA = frozenset({DI.name})

# Methods: OID, name, type, description.
METHODS = {
    "MT.VS.DAILY": (
        "Daily statistic",
        "Computation",
        "Mean, minimum, maximum and count of the subject's readings of the test on one local"
        " day (in the time zone valid at each reading's time) that the device did not mark"
        " invalid or questionable; DAILY DOUBTFUL COUNT counts the readings it did mark.",
    ),
    "MT.VS.STRES": (
        "Standard result",
        "Computation",
        "Equal to VSORRES: original and standard units have the same scale.",
    ),
    "MT.DY": (
        "Study day",
        "Computation",
        "Local date of VSDTC minus the local date of enrollment (RFSTDTC), plus 1 on or after"
        " it; no day 0.",
    ),
    "MT.VS.SPDEVID": (
        "Device of a reading",
        "Computation",
        "The SPDEVID (in DI) of the wearable's description valid at the reading's time: the"
        " last one the hub reported for that sensor before the reading, or its first one for"
        " readings before any report. Empty for a daily statistic (its readings may come from"
        " more than one device) and for a wearable that never described itself.",
    ),
    "MT.LOCALDTC": (
        "Local date/time",
        "Computation",
        "The instant in the subject's time zone valid at that instant: a reading as local"
        " date-time with its UTC offset (seconds truncated), a daily statistic as the local"
        " date.",
    ),
}
# Variables derived by a method (the others are assigned, or collected: below).
DERIVED = {
    "VSSEQ": None,
    "VSSTRESC": "MT.VS.STRES",
    "VSSTRESN": "MT.VS.STRES",
    "VSDTC": "MT.LOCALDTC",
    "VSDY": "MT.DY",
    "RFSTDTC": "MT.LOCALDTC",
    "RFICDTC": "MT.LOCALDTC",
    "USUBJID": None,
    "DISEQ": None,
}
# Derived in this dataset only: (dataset, variable) -> method.
DERIVED_IN = {("VS", "SPDEVID"): "MT.VS.SPDEVID"}
COLLECTED = frozenset({"QVAL", "DIVAL"})
ORRES_DAILY = "IT.VS.VSORRES.DAILY"
ORRES_READING = "IT.VS.VSORRES.READING"


def _e(parent: ET.Element, tag: str, attrs: dict[str, str] | None = None) -> ET.Element:
    return ET.SubElement(parent, tag, attrs or {})


def _odm(name: str) -> str:
    return f"{{{ODM_NS}}}{name}"


def _def(name: str) -> str:
    return f"{{{DEF_NS}}}{name}"


def _text(parent: ET.Element, tag: str, text: str) -> None:
    """An ODM element holding one English TranslatedText."""
    _e(_e(parent, _odm(tag)), _odm("TranslatedText"), {XML_LANG: "en"}).text = text


def item_oid(dataset: Dataset, variable: Variable) -> str:
    return f"IT.{dataset.name}.{variable.name}"


CodeItem = tuple[str, str | None, bool]


def _codelists() -> dict[str, list[CodeItem]]:
    """Each codelist's name and its (coded value, decode or None, sponsor extension) items."""
    tests = sorted({(e.vs.testcd, e.vs.test) for e in EXPORTED.values() if e.vs is not None})
    return {
        "VSTESTCD": [(code, test, False) for code, test in tests],
        "VSSCAT": [(s, None, False) for s in SUBCATEGORIES],
        "VSSTAT": [(NOT_DONE, None, False)],
        "QNAM": [(q, label, False) for q, label in QUALIFIER_LABELS.items()],
        "DIPARMCD": [(p.code, p.name, p.extended) for p in PARAMETERS],
    }


def _method(dataset: Dataset, name: str) -> str | None:
    return DERIVED_IN.get((dataset.name, name), DERIVED.get(name))


def _derived(dataset: Dataset, name: str) -> bool:
    return (dataset.name, name) in DERIVED_IN or name in DERIVED


def _mandatory(dataset: Dataset, name: str) -> bool:
    return name in REQUIRED or name in REQUIRED_IN.get(dataset.name, frozenset())


def _shape_attrs(variable: Variable, s: Shape) -> dict[str, str]:
    attrs = {"DataType": variable.data_type.value, "Length": str(s.length)}
    if s.significant_digits is not None:
        attrs["SignificantDigits"] = str(s.significant_digits)
    return attrs


def _origin(item: ET.Element, dataset: Dataset, name: str) -> None:
    if _derived(dataset, name):
        kind = "Derived"
    elif name in COLLECTED:
        kind = "eDT"
    else:
        kind = "Assigned"
    _e(item, _def("Origin"), {"Type": kind})


def build(study_id: str, writers: Sequence[DatasetWriter]) -> ET.ElementTree[ET.Element]:
    now = datetime.now(UTC).isoformat(timespec="seconds")
    odm = ET.Element(
        _odm("ODM"),
        {
            "FileType": "Snapshot",
            "FileOID": f"DEFINE.{study_id}",
            "CreationDateTime": now,
            "ODMVersion": "1.3.2",
            "Originator": "trialstream",
            "SourceSystem": "trialstream",
        },
    )
    study = _e(odm, _odm("Study"), {"OID": f"ST.{study_id}"})
    globals_ = _e(study, _odm("GlobalVariables"))
    _e(globals_, _odm("StudyName")).text = study_id
    _e(globals_, _odm("StudyDescription")).text = f"Study {study_id}: wearable vital signs"
    _e(globals_, _odm("ProtocolName")).text = study_id
    mdv = _e(
        study,
        _odm("MetaDataVersion"),
        {
            "OID": f"MDV.{study_id}.SDTMIG.{STANDARD_VERSION}",
            "Name": f"{study_id} SDTM",
            "Description": "SDTM datasets of wearable readings",
            _def("DefineVersion"): "2.0.0",
            _def("StandardName"): STANDARD_NAME,
            _def("StandardVersion"): STANDARD_VERSION,
        },
    )
    vs_writer = next((w for w in writers if w.dataset is VS), None)
    if vs_writer is not None:
        _value_level(mdv, vs_writer)
    for w in writers:
        _item_group(mdv, w.dataset)
    for w in writers:
        for variable, s in zip(w.dataset.variables, w.shapes().values(), strict=True):
            _item_def(mdv, w.dataset, variable, s)
    if vs_writer is not None:
        for oid, subset in ((ORRES_DAILY, STATISTICS), (ORRES_READING, (READING,))):
            item = _e(
                mdv,
                _odm("ItemDef"),
                {
                    "OID": oid,
                    "Name": "VSORRES",
                    "SASFieldName": "VSORRES",
                    **_shape_attrs(_variable(VS, "VSORRES"), _orres_shape(vs_writer, subset)),
                },
            )
            _text(item, "Description", "Result or Finding in Original Units")
            _e(item, _def("Origin"), {"Type": "Derived" if oid == ORRES_DAILY else "eDT"})
    for name, items in _codelists().items():
        _codelist(mdv, name, items)
    for oid, (name, kind, description) in METHODS.items():
        method = _e(mdv, _odm("MethodDef"), {"OID": oid, "Name": name, "Type": kind})
        _text(method, "Description", description)
    tree: ET.ElementTree[ET.Element] = ET.ElementTree(odm)
    ET.indent(tree)
    return tree


def _variable(dataset: Dataset, name: str) -> Variable:
    return next(v for v in dataset.variables if v.name == name)


def _orres_shape(w: DatasetWriter, subcategories: Iterable[str]) -> Shape:
    names = w.dataset.names
    scat, orres = names.index("VSSCAT"), names.index("VSORRES")
    wanted = frozenset(subcategories)
    values = [r[orres] for r in w.records if r[scat] in wanted]
    return shape(_variable(w.dataset, "VSORRES"), values)


def _value_level(mdv: ET.Element, w: DatasetWriter) -> None:
    value_list = _e(mdv, _def("ValueListDef"), {"OID": "VL.VS.VSORRES"})
    for order, (oid, where, method) in enumerate(
        ((ORRES_DAILY, "WC.VS.DAILY", "MT.VS.DAILY"), (ORRES_READING, "WC.VS.READING", None)), 1
    ):
        attrs = {"ItemOID": oid, "OrderNumber": str(order), "Mandatory": "No"}
        if method is not None:
            attrs["MethodOID"] = method
        ref = _e(value_list, _odm("ItemRef"), attrs)
        _e(ref, _def("WhereClauseRef"), {"WhereClauseOID": where})
    for oid, comparator, values in (
        ("WC.VS.DAILY", "IN", STATISTICS),
        ("WC.VS.READING", "EQ", (READING,)),
    ):
        clause = _e(mdv, _def("WhereClauseDef"), {"OID": oid})
        check = _e(
            clause,
            _odm("RangeCheck"),
            {"Comparator": comparator, "SoftHard": "Soft", _def("ItemOID"): "IT.VS.VSSCAT"},
        )
        for v in values:
            _e(check, _odm("CheckValue")).text = v


def _item_group(mdv: ET.Element, dataset: Dataset) -> None:
    reference = dataset.name in REFERENCE_DATA
    # One record per subject (DM) or not per subject at all (reference data): not repeating.
    repeating = dataset.name != "DM" and not reference
    group = _e(
        mdv,
        _odm("ItemGroupDef"),
        {
            "OID": f"IG.{dataset.name}",
            "Domain": dataset.name.removeprefix("SUPP"),
            "Name": dataset.name,
            "Repeating": "Yes" if repeating else "No",
            "IsReferenceData": "Yes" if reference else "No",
            "SASDatasetName": dataset.name,
            "Purpose": "Tabulation",
            _def("Structure"): dataset.structure,
            _def("Class"): dataset.sdtm_class,
            _def("ArchiveLocationID"): f"LF.{dataset.name}",
        },
    )
    _text(group, "Description", dataset.label)
    for order, v in enumerate(dataset.variables, 1):
        attrs = {
            "ItemOID": item_oid(dataset, v),
            "OrderNumber": str(order),
            "Mandatory": "Yes" if _mandatory(dataset, v.name) else "No",
        }
        if v.name in dataset.keys:
            attrs["KeySequence"] = str(dataset.keys.index(v.name) + 1)
        method = _method(dataset, v.name)
        if method is not None:
            attrs["MethodOID"] = method
        _e(group, _odm("ItemRef"), attrs)
    leaf = _e(
        group, _def("leaf"), {"ID": f"LF.{dataset.name}", f"{{{XLINK_NS}}}href": dataset.xpt_name}
    )
    _e(leaf, _def("title")).text = dataset.xpt_name


def _item_def(mdv: ET.Element, dataset: Dataset, variable: Variable, s: Shape) -> None:
    item = _e(
        mdv,
        _odm("ItemDef"),
        {
            "OID": item_oid(dataset, variable),
            "Name": variable.name,
            "SASFieldName": variable.name,
            **_shape_attrs(variable, s),
        },
    )
    _text(item, "Description", variable.label)
    if variable.codelist is not None:
        _e(item, _odm("CodeListRef"), {"CodeListOID": f"CL.{variable.codelist}"})
    _origin(item, dataset, variable.name)
    if dataset is VS and variable.name == "VSORRES":
        _e(item, _def("ValueListRef"), {"ValueListOID": "VL.VS.VSORRES"})


def _codelist(mdv: ET.Element, name: str, items: list[CodeItem]) -> None:
    codelist = _e(mdv, _odm("CodeList"), {"OID": f"CL.{name}", "Name": name, "DataType": "text"})
    for code, decode, extended in items:
        attrs = {"CodedValue": code}
        if extended:
            attrs[_def("ExtendedValue")] = "Yes"
        if decode is None:
            _e(codelist, _odm("EnumeratedItem"), attrs)
        else:
            item = _e(codelist, _odm("CodeListItem"), attrs)
            _text(item, "Decode", decode)


def write(out: OutputDir, study_id: str, writers: Sequence[DatasetWriter]) -> None:
    tree = build(study_id, writers)
    with out.open(FILE_NAME) as f:
        tree.write(f, encoding="UTF-8", xml_declaration=True)
    out.count(FILE_NAME, len(writers))
