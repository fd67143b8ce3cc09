"""The define.xml of an SDTM export checked against CDISC's Define-XML 2.0 schema (as the
odmlib package ships it, with ODM 1.3.2's) and against the datasets written beside it."""

from __future__ import annotations

import csv
import functools
import io
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pyreadstat
import xmlschema

from storage.exports.define_xml import DEF_NS, ODM_NS, XLINK_NS

NS = {"odm": ODM_NS, "def": DEF_NS}
LANG = "{http://www.w3.org/XML/1998/namespace}lang"
DATASETS = ("VS", "SUPPVS", "DM", "DI")


@functools.cache
def define_schema() -> xmlschema.XMLSchema:
    """Define-XML 2.0.0 (``define2-0-0.xsd`` and the ODM 1.3.2 schemas it includes),
    compiled once (about a second)."""
    xsd = resources.files("odmlib") / "schemas" / "define" / "2.0" / "define2-0-0.xsd"
    return xmlschema.XMLSchema(str(xsd))


def read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))


@dataclass(frozen=True)
class Define:
    """The parts of a parsed define.xml the checks below and their callers look at."""

    mdv: ET.Element
    items: dict[str | None, ET.Element]
    codelists: dict[str | None, ET.Element]
    groups: dict[str, ET.Element]


def check_define(exported: Path) -> Define:
    """define.xml describes exactly the datasets written: one ItemGroupDef per dataset with
    its XPT file, its variables in order as the CSV header and XPT columns, their labels,
    types and lengths, mandatory variables never empty, methods defined and controlled
    values in their codelists. First of all, it is valid against the schema."""
    define_schema().validate(str(exported / "define.xml"))
    root = ET.parse(exported / "define.xml").getroot()
    assert root.tag == f"{{{ODM_NS}}}ODM"
    assert root.get("ODMVersion") == "1.3.2"
    mdv = root.find("odm:Study/odm:MetaDataVersion", NS)
    assert mdv is not None
    assert mdv.get(f"{{{DEF_NS}}}DefineVersion") == "2.0.0"
    items = {i.get("OID"): i for i in mdv.findall("odm:ItemDef", NS)}
    codelists = {c.get("OID"): c for c in mdv.findall("odm:CodeList", NS)}
    methods = {m.get("OID") for m in mdv.findall("odm:MethodDef", NS)}
    groups = mdv.findall("odm:ItemGroupDef", NS)
    assert [g.get("Name") for g in groups] == list(DATASETS)
    for group in groups:
        name = str(group.get("Name"))
        leaf = group.find("def:leaf", NS)
        assert leaf is not None
        assert leaf.get(f"{{{XLINK_NS}}}href") == f"{name.lower()}.xpt"
        path = exported / f"{name.lower()}.csv"
        header = next(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
        rows = read_csv(path)
        frame, meta = pyreadstat.read_xport(str(exported / f"{name.lower()}.xpt"))
        labels = dict(zip(meta.column_names, meta.column_labels, strict=True))
        refs = group.findall("odm:ItemRef", NS)
        defs = [items[r.get("ItemOID")] for r in refs]
        # The variables, in order, are the CSV's header and the XPT's columns.
        assert [d.get("Name") for d in defs] == header == list(frame.columns)
        assert [int(str(r.get("OrderNumber"))) for r in refs] == list(range(1, len(refs) + 1))
        for ref, item in zip(refs, defs, strict=True):
            var = str(item.get("Name"))
            text = item.find("odm:Description/odm:TranslatedText", NS)
            assert text is not None
            assert text.get(LANG) == "en"
            assert text.text == labels[var]
            values = [r[var] for r in rows if r[var] != ""]
            kind = item.get("DataType")
            numeric = meta.readstat_variable_types[var] == "double"
            assert numeric == (kind in ("integer", "float")), var
            # Length: the longest value written (1 for a variable always empty).
            if kind in ("text", "datetime"):
                assert int(str(item.get("Length"))) == max(map(len, values), default=1), var
            if kind == "integer":
                digits = (len(str(int(float(v)))) for v in values)
                assert int(str(item.get("Length"))) == max(digits, default=1), var
            if ref.get("Mandatory") == "Yes":
                assert len(values) == len(rows), var
            method = ref.get("MethodOID")
            assert method is None or method in methods
            clref = item.find("odm:CodeListRef", NS)
            if clref is not None:
                codelist = codelists[clref.get("CodeListOID")]
                allowed = {str(c.get("CodedValue")) for c in codelist}
                assert set(values) <= allowed, var
    return Define(mdv, items, codelists, {str(g.get("Name")): g for g in groups})
