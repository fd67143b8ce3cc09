"""Export jobs through the API: a monitor submits, polls until the background runner is done,
and downloads files whose bytes hash to what the job lists; other sites see nothing; bad
input gets problem details and queues nothing; jobs left running by a dead runner are failed
when a runner starts; the monitor board's Exports panel runs a job and links its files."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By

from gateway.broker import MosquittoBroker
from storage import db, partitions
from storage.timeconv import to_ms
from tests.fixtures.gateway import gateway_settings, running_gateway
from tests.fixtures.postgres import ensure_test_partitions
from tests.fixtures.waiting import wait_until
from tests.web.browser import Browser
from tests.web.conftest import PASSWORD, Web

JOB_OF_NOBODY = "00000000-0000-4000-8000-000000000000"


async def store_readings(
    url: str, participant_id: str, device_id: str, values: list[float]
) -> None:
    """Readings of the last minutes for a participant, as the writer stores them."""
    now = datetime.now(UTC)
    start = now - timedelta(minutes=len(values) + 1)
    async with db.connection(url) as conn, conn.transaction():
        await ensure_test_partitions(
            conn, {partitions.partition_start_ms(to_ms(start)), *partitions.ahead(to_ms(now))}
        )
        seq = to_ms(now)
        await conn.execute(
            "INSERT INTO envelopes (device_id, seq, participant_id, sent_at, received_at,"
            " envelope_sha256, reading_count, stored_count, refused_count)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 0)",
            (
                device_id,
                seq,
                participant_id,
                now,
                now,
                hashlib.sha256(f"{device_id}{seq}".encode()).digest(),
                len(values),
                len(values),
            ),
        )
        for i, v in enumerate(values):
            await conn.execute(
                "INSERT INTO readings (time, participant_id, metric, value, unit, device_id, seq,"
                " sensor, received_at) VALUES (%s, %s, 'heart_rate', %s, '/min', %s, %s,"
                " 'hr-strap-1', %s)",
                (start + timedelta(minutes=i), participant_id, v, device_id, seq, now),
            )


async def audit_actions(url: str, actor: str) -> list[str]:
    async with db.connection(url) as conn:
        cur = await conn.execute(
            "SELECT action FROM audit_log WHERE actor = %s AND action LIKE 'export.%%'"
            " ORDER BY audit_id",
            (actor,),
        )
        return [str(r[0]) for r in await cur.fetchall()]


async def test_a_monitor_exports_in_the_background_and_downloads_matching_files(
    web: Web,
) -> None:
    url = web.trial.url
    await store_readings(url, "P1", "hub-1", [70.0, 71.0, 72.0, 73.0, 74.0])
    await store_readings(url, "P2", "hub-2", [90.0, 91.0])  # SITE-B: not the monitor's

    job = await web.export_job("monitor", {"kind": "parquet", "study_id": "S1"})
    assert job["state"] == "done", job
    assert job["rows_written"] == 5
    assert job["requested_by"] == "monitor"
    assert job["files"], job
    assert all(f["path"].startswith("participant_id=P1/") for f in job["files"])

    rows = 0
    for f in job["files"]:
        resp = await web.call("monitor", "GET", f["href"])
        assert resp.status == 200, await resp.text()
        body = await resp.read()
        digest = hashlib.sha256(body)
        assert digest.hexdigest() == f["sha256"] == resp.headers["X-Content-SHA256"]
        assert resp.headers["Repr-Digest"] == (
            f"sha-256=:{base64.b64encode(digest.digest()).decode()}:"
        )
        assert resp.headers["Content-Type"] == "application/octet-stream"
        assert len(body) == f["bytes"] == int(resp.headers["Content-Length"])
        table = pq.read_table(io.BytesIO(body))
        assert table.num_rows == f["rows"]
        rows += table.num_rows
        assert sorted(table.column("value").to_pylist()) == [70.0, 71.0, 72.0, 73.0, 74.0]
    assert rows == 5
    assert await audit_actions(url, "monitor") == [
        "export.submitted",
        "export.started",
        "export.completed",
        *["export.downloaded"] * len(job["files"]),
    ]


async def test_a_fhir_export_of_one_participant_holds_its_observations(web: Web) -> None:
    await store_readings(web.trial.url, "P1", "hub-1", [65.0, 66.0, 67.0])
    job = await web.export_job(
        "clinician", {"kind": "fhir", "study_id": "S1", "participant_id": "P1"}
    )
    assert job["state"] == "done", job
    by_path = {f["path"]: f for f in job["files"]}
    resp = await web.call("clinician", "GET", by_path["Observation.ndjson"]["href"])
    lines = (await resp.read()).decode().splitlines()
    # FHIR takes rows in any order (docs/exports.md).
    values = sorted(json.loads(line)["valueQuantity"]["value"] for line in lines)
    assert values == [65.0, 66.0, 67.0]


async def test_other_sites_and_other_users_get_404_for_a_job_and_its_files(web: Web) -> None:
    job = await web.export_job("monitor")
    assert job["state"] == "done", job
    paths = [f"/api/v1/exports/{job['job_id']}", f"/api/v1/exports/{job['job_id']}/files/0"]
    for key in ("other_monitor", "other_clinician", "clinician"):
        for path in paths:
            resp = await web.call(key, "GET", path)
            assert resp.status == 404, (key, path, await resp.text())
            assert (await resp.json())["type"].endswith("/not-found")
    # A coordinator may not read reading values, so has no export jobs at all.
    for path in paths:
        assert (await web.call("coordinator", "GET", path)).status == 403
    # An admin sees every job.
    for path in paths:
        assert (await web.call("admin", "GET", path)).status == 200
    # Asking for SITE-A's participant from SITE-B is refused, and audited as refused.
    resp = await web.call(
        "other_monitor",
        "POST",
        "/api/v1/exports",
        json={"kind": "sdtm", "study_id": "S1", "participant_id": "P1"},
    )
    assert resp.status == 404
    assert await audit_actions(web.trial.url, "other_monitor") == ["export.refused"]


async def job_count(url: str) -> int:
    async with db.connection(url) as conn:
        cur = await conn.execute("SELECT count(*) FROM export_jobs")
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def test_bad_export_requests_get_problem_details_and_queue_nothing(web: Web) -> None:
    url = web.trial.url
    async with db.connection(url) as conn:
        cur = await conn.execute(
            "INSERT INTO export_jobs (kind, study_id, requested_by, state, started_at,"
            " heartbeat_at) VALUES ('fhir', 'S1', 'monitor', 'running', now(), now())"
            " RETURNING job_id::text"
        )
        row = await cur.fetchone()
        assert row is not None
        running = str(row[0])
        await conn.commit()
    done = await web.finished_job("monitor")
    s1 = {"kind": "fhir", "study_id": "S1"}
    cases: list[tuple[str, str, str, object, int, str]] = [
        ("unknown kind", "POST", "/api/v1/exports", {**s1, "kind": "xml"}, 400, "invalid-field"),
        ("no study", "POST", "/api/v1/exports", {"kind": "fhir"}, 400, "invalid-field"),
        (
            "unknown field",
            "POST",
            "/api/v1/exports",
            {**s1, "site": "SITE-A"},
            400,
            "invalid-field",
        ),
        (
            "time without zone",
            "POST",
            "/api/v1/exports",
            {**s1, "from": "2026-03-01T00:00:00"},
            400,
            "invalid-field",
        ),
        (
            "no such date",
            "POST",
            "/api/v1/exports",
            {**s1, "to": "2026-13-01T00:00:00Z"},
            400,
            "invalid-field",
        ),
        (
            "from after to",
            "POST",
            "/api/v1/exports",
            {**s1, "from": "2026-03-02T00:00:00Z", "to": "2026-03-01T00:00:00+00:00"},
            400,
            "invalid-field",
        ),
        ("unknown study", "POST", "/api/v1/exports", {**s1, "study_id": "S9"}, 404, "not-found"),
        (
            "unknown participant",
            "POST",
            "/api/v1/exports",
            {**s1, "participant_id": "P404"},
            404,
            "not-found",
        ),
        ("job id not a uuid", "GET", "/api/v1/exports/1;DROP", None, 400, "invalid-field"),
        ("unknown job", "GET", f"/api/v1/exports/{JOB_OF_NOBODY}", None, 404, "not-found"),
        ("no such file", "GET", f"/api/v1/exports/{done}/files/99", None, 404, "not-found"),
        ("negative index", "GET", f"/api/v1/exports/{done}/files/-1", None, 404, "not-found"),
        (
            "file of a running job",
            "GET",
            f"/api/v1/exports/{running}/files/0",
            None,
            409,
            "conflict",
        ),
    ]
    before = await job_count(url)
    failures = []
    for name, method, path, body, status, kind in cases:
        resp = await web.call("monitor", method, path, json=body)
        problem = await resp.json() if resp.content_type == "application/problem+json" else {}
        got = (resp.status, problem.get("status"), str(problem.get("type", "")).rsplit("/")[-1])
        if got != (status, status, kind):
            failures.append(f"{name}: {got} {problem}")
    assert not failures, "\n".join(failures)
    assert await job_count(url) == before


async def test_a_starting_runner_fails_jobs_whose_runner_died(
    web: Web, database_url: str, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    async with db.connection(web.trial.url) as conn:
        cur = await conn.execute(
            "INSERT INTO export_jobs (kind, study_id, requested_by, state, started_at,"
            " heartbeat_at) VALUES ('fhir', 'S1', 'monitor', 'running',"
            " now() - interval '1 hour', now() - interval '1 hour') RETURNING job_id::text"
        )
        row = await cur.fetchone()
        assert row is not None
        job_id = str(row[0])
        await conn.commit()
    settings = gateway_settings(database_url, mosquitto, tmp_path / "second")
    async with running_gateway(settings):

        async def failed() -> bool:
            resp = await web.call("monitor", "GET", f"/api/v1/exports/{job_id}")
            job = await resp.json()
            return job["state"] == "failed" and "abandoned" in job["error"]

        await wait_until(failed, "the abandoned job marked failed")


@pytest.mark.slow
async def test_the_monitor_boards_exports_panel_runs_a_job_and_links_its_files(
    web: Web, chromium: webdriver.Chrome
) -> None:
    await store_readings(web.trial.url, "P1", "hub-1", [80.0, 81.0])
    browser = Browser(chromium, web.url)
    await browser.sign_in("/monitor", "monitor", PASSWORD)
    kind = await browser.css("#export-kind")
    await browser.run(lambda _: kind.send_keys("FHIR"))
    await browser.run(lambda d: d.find_element(By.ID, "export-participant").send_keys("P1"))
    await browser.run(
        lambda d: d.find_element(By.CSS_SELECTOR, "#export-form button[type=submit]").click()
    )
    item = await browser.css("#export-jobs > li[data-state=done]")
    text = await browser.run(lambda _: item.text)
    assert text.startswith("FHIR of S1 / P1: done")
    links = await browser.run(
        lambda _: {
            a.text: a.get_attribute("href") for a in item.find_elements(By.CSS_SELECTOR, "a")
        }
    )
    job_id = await browser.run(lambda _: item.get_attribute("data-job-id"))
    resp = await web.call("monitor", "GET", f"/api/v1/exports/{job_id}")
    files = {f["path"]: f for f in (await resp.json())["files"]}
    assert {p: h.removeprefix(web.url) for p, h in links.items()} == {
        p: f["href"] for p, f in files.items()
    }
    assert files["Observation.ndjson"]["sha256"] in text


async def test_another_sites_participant_is_refused_as_if_unknown(web: Web) -> None:
    """The refusal must not tell a participant of another site from one that does not exist
    (the audit record says which it was)."""
    answers = []
    for pid in ("P1", "NOBODY"):
        resp = await web.call(
            "other_monitor",
            "POST",
            "/api/v1/exports",
            json={"kind": "fhir", "study_id": "S1", "participant_id": pid},
        )
        assert resp.status == 404
        answers.append((await resp.json())["title"].replace(pid, "<id>"))
    assert answers[0] == answers[1]
