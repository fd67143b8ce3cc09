"""Answers with health data or session state are never kept by a browser or a proxy
(``Cache-Control: no-store``); the static files may be."""

from __future__ import annotations

import pytest

from tests.web.conftest import Web


@pytest.mark.parametrize(
    ("key", "path"),
    [
        ("clinician", "/api/v1/participants/P1/readings"),
        ("clinician", "/api/v1/participants/P1/rollups?days=2"),
        ("clinician", "/api/v1/participants/P1"),
        ("monitor", "/api/v1/alerts?site=SITE-A"),
        ("monitor", "/api/v1/session"),
        ("admin", "/api/v1/openapi.json"),
        ("monitor", "/api/v1/participants/NOBODY"),
        (None, "/healthz"),
    ],
)
async def test_answers_are_not_stored(web: Web, key: str | None, path: str) -> None:
    resp = await web.call(key, "GET", path)
    assert resp.headers.get("Cache-Control") == "no-store", (resp.status, dict(resp.headers))


async def test_an_export_file_is_not_stored(web: Web) -> None:
    job = await web.export_job("monitor")
    resp = await web.call("monitor", "GET", job["files"][0]["href"])
    assert resp.status == 200
    assert resp.headers.get("Cache-Control") == "no-store"


async def test_static_files_may_be_cached(web: Web) -> None:
    resp = await web.call(None, "GET", "/static/common.js")
    assert resp.status == 200
    assert resp.headers.get("Cache-Control") != "no-store"
