"""Data queries acted on from the pages, in headless Chromium against the real gateway, broker
and database: a monitor opens a query from the live view's chart (the queries card sits after
the charts, so the hourly chart stays above the fold at 1366x768); the site coordinator sees
it on the site page and the participant page, unfolds its thread and answers it with the
keyboard; the monitor closes it and reopens it from the page; an answer to a query closed
meanwhile is refused and the card shows why, with nothing stored; a clinician is offered
only the step the API lets a clinician take (answering an open query), none on a closed one.
Each step is checked in the API and the audit trail, with its actor. The steps the pages
offer are held against the API's roles and the storage's states.

Screenshots of the card (a thread unfolded, an answer being written) go to docs/screenshots/
for docs/pages.md."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from gateway.web import api_queries
from ingest.envelope import seal
from ingest.model import Payload, Reading
from ingest.pipeline import up_topic
from storage import db, queries, rollups
from storage.migrate import StorageMode
from tests.fixtures.mqtt import MqttProbe
from tests.fixtures.postgres import database_mode
from tests.fixtures.waiting import wait_until
from tests.web.browser import SCREENSHOTS, Browser
from tests.web.conftest import PASSWORD, Web

COMMON_JS = Path(__file__).resolve().parents[2] / "gateway" / "web" / "static" / "common.js"
STATES = ("open", "answered", "closed")
ROLES = ("participant", "site_coordinator", "clinician", "monitor", "admin")

QUESTION = "Heart rate flat at 60 for ten minutes: strap off, or at rest?"
ANSWER = "At rest after the 6-minute walk; the strap was on (checked at the visit)."
CLOSE = "Explained by the visit notes."
REOPEN = "Please add the visit time to the source notes."
# Text the site or a monitor types is shown as text, never run as markup.
EVIL = '<script>window.__pwned = 1</script><img src="x" onerror="window.__pwned = 2">'


def expected_steps() -> dict[str, dict[str, list[str]]]:
    """Who may take which step from which state, as the API and the storage say."""
    roles = {ep.operation_id: ep.roles or frozenset() for ep in api_queries.ENDPOINTS}
    out: dict[str, dict[str, list[str]]] = {}
    for step in ("answer", "close", "reopen"):
        allowed, _ = queries._STEPS[queries.Step(step)]
        out[step] = {
            "roles": sorted(r.value for r in roles[f"{step}_query"]),
            "from": sorted(allowed),
        }
    return out


def test_the_pages_offer_the_steps_the_api_accepts() -> None:
    """common.js's table of steps is the API's roles and the storage's states, and its text
    limit is the storage's."""
    source = COMMON_JS.read_text()
    table = re.search(r"const QUERY_STEPS = (\{.*?\n  \});", source, re.DOTALL)
    assert table is not None
    offered = {
        step: {"roles": sorted(v["roles"]), "from": sorted(v["from"])}
        for step, v in json.loads(table.group(1)).items()
    }
    assert offered == expected_steps()
    limit = re.search(r"const QUERY_TEXT_MAX = (\d+);", source)
    assert limit is not None
    assert int(limit.group(1)) == queries.MAX_TEXT == api_queries.TEXT.max_len


def now_ms() -> int:
    return int(time.time() * 1000)


async def query_steps(url: str) -> list[tuple[str, str, str]]:
    """The audit trail's query records: (action, actor, entity id)."""
    async with db.connection(url) as conn:
        cur = await conn.execute(
            b"SELECT action, actor, entity_id FROM audit_log"
            b" WHERE starts_with(action, 'query.') ORDER BY audit_id"
        )
        return [(str(a), str(b), str(c)) for a, b, c in await cur.fetchall()]


async def api_query(web: Web, qid: int) -> dict[str, Any]:
    resp = await web.call("admin", "GET", f"/api/v1/queries/{qid}")
    assert resp.status == 200, await resp.text()
    got: dict[str, Any] = await resp.json()
    return got


def thread_of(q: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(m["action"], m["actor"], m["text"]) for m in q["messages"]]


async def card(browser: Browser, card_id: str) -> dict[str, Any]:
    """The card as shown: each query's state, cells, offered steps; the notice; the threads."""
    got: dict[str, Any] = await browser.run(
        lambda d: d.execute_script(
            """
            const card = document.getElementById(arguments[0]);
            if (!card) return null;
            const text = (n) => (n ? n.textContent : null);
            return {
              rows: [...card.querySelectorAll('tr.query')].map((r) => ({
                id: Number(r.dataset.queryId), state: r.dataset.state,
                cells: [...r.querySelectorAll('td')].map(text),
                steps: [...r.querySelectorAll('button.step')].map((b) => b.dataset.step),
                labels: [...r.querySelectorAll('button')].map((b) => b.getAttribute('aria-label')),
              })),
              threads: [...card.querySelectorAll('.thread li.message')].map((li) => [
                text(li.querySelector('.said-by strong')), text(li.querySelector('.said-text'))]),
              notice: text(card.querySelector('.queries-notice, .queries-problem')),
              forms: card.querySelectorAll('form.query-step').length,
              active: document.activeElement.id,
              pwned: window.__pwned === undefined ? null : window.__pwned,
            };
            """,
            card_id,
        )
    )
    return got


async def shot(browser: Browser, selector: str, name: str) -> None:
    """A screenshot of one element (the card) into the screenshots folder."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name

    def take(d: webdriver.Chrome) -> bool:
        node = d.find_element(By.CSS_SELECTOR, selector)
        d.execute_script("arguments[0].scrollIntoView({block: 'start'})", node)
        return bool(node.screenshot(str(path)))

    assert await browser.run(take), f"screenshot {name} not saved"


async def press(browser: Browser, selector: str, *keys: str) -> None:
    """Focus ``selector`` and type ``keys`` into whatever has the focus then."""

    def step(d: webdriver.Chrome) -> None:
        d.execute_script("arguments[0].focus()", d.find_element(By.CSS_SELECTOR, selector))
        d.switch_to.active_element.send_keys(*keys)

    await browser.run(step)


async def typed(browser: Browser, *keys: str) -> None:
    await browser.run(lambda d: d.switch_to.active_element.send_keys(*keys))


async def focused(browser: Browser, element_id: str) -> None:
    await browser.wait_for(
        f"the focus on #{element_id}",
        lambda d: d.execute_script("return document.activeElement.id") == element_id,
    )


async def switch_user(browser: Browser, path: str, key: str) -> None:
    await browser.run(lambda d: d.delete_all_cookies())
    await browser.sign_in(path, key, PASSWORD)


pytestmark = pytest.mark.slow


async def test_a_query_is_answered_closed_and_reopened_from_the_pages(
    web: Web, browser: Browser, probe: MqttProbe
) -> None:
    trial = web.trial
    url = trial.url
    hub = trial.hubs["hub-1"]
    # Two days of heart rate for the hourly chart, and the last minutes for the live one.
    start = now_ms() - 20 * 3600_000
    history = tuple(
        Reading(start + i * 600_000, "heart_rate", 60.0 + (i % 12) * 2, "/min", "hr-strap-1")
        for i in range(115)
    )
    recent = tuple(
        Reading(now_ms() - 60_000 + i * 1000, "heart_rate", 60.0, "/min", "hr-strap-1")
        for i in range(5)
    )
    probe.publish(
        up_topic(hub.device_id),
        seal(
            Payload(dev=hub.device_id, seq=1, sent_ms=now_ms(), readings=history + recent),
            hub.key,
        ),
    )

    async def stored() -> bool:
        async with db.connection(url) as conn:
            cur = await conn.execute(b"SELECT count(*) FROM readings")
            row = await cur.fetchone()
            return row is not None and row[0] == 120

    await wait_until(stored, "the readings stored")
    if database_mode(url) is StorageMode.PLAIN:
        async with db.connection(url) as conn:
            assert await rollups.refresh_rollups(conn, StorageMode.PLAIN) > 0
    await browser.run(lambda d: d.set_window_size(1366, 768))

    # 1. The monitor opens a query from under the live chart. The queries card comes after
    # the charts: the hourly chart is on the first screen.
    await browser.sign_in("/participants/P1/live", "monitor", PASSWORD)
    await browser.css("#days-heart_rate svg polyline")
    await browser.css("#queries table, #queries p.empty")
    await browser.run(
        lambda d: d.find_element(
            By.CSS_SELECTOR, "#metric-heart_rate details.ask-box summary"
        ).click()
    )
    await press(browser, "#ask-heart_rate-text", QUESTION)
    await browser.run(
        lambda d: d.find_element(By.CSS_SELECTOR, "#ask-heart_rate button[type=submit]").click()
    )
    await browser.css("#queries tr.query[data-state=open]")
    shown = await card(browser, "queries")
    qid = shown["rows"][0]["id"]
    assert await query_steps(url) == [("query.open", "monitor", "P1")]
    layout = await browser.run(
        lambda d: d.execute_script(
            """
            window.scrollTo(0, 0);
            const box = (s) => document.querySelector(s).getBoundingClientRect();
            return { fold: window.innerHeight, days: box('#days-heart_rate svg').bottom,
                     card: box('#queries').top, charts: box('#metrics').bottom,
                     summary: document.getElementById('queries-summary').textContent };
            """
        )
    )
    assert layout["days"] <= layout["fold"], layout
    assert layout["card"] >= layout["charts"], layout
    assert layout["summary"] == "Data queries: 1 open"
    shown = await card(browser, "queries")
    assert [(r["id"], r["state"], r["steps"]) for r in shown["rows"]] == [(qid, "open", ["close"])]
    assert shown["rows"][0]["cells"][1] == QUESTION

    # 2. The site coordinator sees it on the site page, naming the participant, and may
    # answer it (only that); the thread unfolds from the API with the monitor's question.
    await switch_user(browser, "/sites/SITE-A", "coordinator")
    await browser.css(f"#site-queries tr.query[data-query-id='{qid}']")
    shown = await card(browser, "site-queries")
    (site_row,) = shown["rows"]
    assert site_row["cells"][:4] == ["P1", site_row["cells"][1], QUESTION, "open"]
    assert site_row["steps"] == ["answer"]
    assert site_row["labels"] == [f"Thread (1) of query {qid}", f"Answer query {qid}"]
    await browser.run(lambda d: d.find_element(By.ID, f"site-queries-q{qid}-thread-button").click())
    await browser.css("#site-queries .thread li.message")
    shown = await card(browser, "site-queries")
    assert shown["threads"] == [["Asked", QUESTION]]
    assert shown["active"] == f"site-queries-q{qid}-thread-button"
    expanded = await browser.run(
        lambda d: d.find_element(By.ID, f"site-queries-q{qid}-thread-button").get_attribute(
            "aria-expanded"
        )
    )
    assert expanded == "true"

    # 3. On the participant page it answers with the keyboard alone: Enter on "Answer", the
    # answer typed (a counter says how much of the limit it uses), Tab to send, Enter.
    await browser.get("/participants/P1")
    await browser.css(f"#data-queries tr.query[data-query-id='{qid}']")
    base = f"data-queries-q{qid}"
    await press(browser, f"#{base}-answer-button", Keys.ENTER)
    await focused(browser, f"{base}-answer-text")
    await typed(browser, ANSWER)
    counter = await browser.run(lambda d: d.find_element(By.ID, f"{base}-answer-count").text)
    assert counter == f"{len(ANSWER)} of 4000 characters"
    limit = await browser.run(
        lambda d: d.find_element(By.ID, f"{base}-answer-text").get_attribute("maxlength")
    )
    assert limit == "4000"
    await shot(browser, "#data-queries", "queries-answer-form.png")
    await typed(browser, Keys.TAB)
    on_submit = await browser.run(
        lambda d: d.execute_script(
            "return document.activeElement.matches(arguments[0])",
            f"#{base}-answer button[type=submit]",
        )
    )
    assert on_submit
    await typed(browser, Keys.ENTER)
    await browser.css(f"#data-queries tr.query[data-query-id='{qid}'][data-state=answered]")
    shown = await card(browser, "data-queries")
    assert shown["notice"] == f"Query {qid} answered."
    assert shown["active"] == "data-queries-notice"
    assert shown["forms"] == 0
    assert shown["rows"][0]["steps"] == []  # answered: the coordinator has nothing to do
    assert shown["rows"][0]["cells"][4].startswith("answer by coordinator, ")
    assert await query_steps(url) == [
        ("query.open", "monitor", "P1"),
        ("query.answer", "coordinator", str(qid)),
    ]
    q = await api_query(web, qid)
    assert q["state"] == "answered"
    assert thread_of(q) == [("open", "monitor", QUESTION), ("answer", "coordinator", ANSWER)]

    # 4. The monitor closes it from the participant page, then reopens it from the folded
    # list of closed queries.
    await switch_user(browser, "/participants/P1", "monitor")
    await browser.css(f"#data-queries tr.query[data-query-id='{qid}'][data-state=answered]")
    shown = await card(browser, "data-queries")
    assert shown["rows"][0]["steps"] == ["close", "reopen"]
    await browser.run(lambda d: d.find_element(By.ID, f"{base}-close-button").click())
    await focused(browser, f"{base}-close-text")
    await typed(browser, CLOSE)
    await browser.run(
        lambda d: d.find_element(By.CSS_SELECTOR, f"#{base}-close button[type=submit]").click()
    )
    await browser.css(f"#data-queries details.queries-closed tr.query[data-query-id='{qid}']")
    assert (await query_steps(url))[-1] == ("query.close", "monitor", str(qid))
    assert (await api_query(web, qid))["state"] == "closed"
    shown = await card(browser, "data-queries")
    assert shown["notice"] == f"Query {qid} closed."
    assert shown["rows"][0]["steps"] == ["reopen"]
    await browser.run(
        lambda d: d.find_element(
            By.CSS_SELECTOR, "#data-queries details.queries-closed summary"
        ).click()
    )
    await browser.run(lambda d: d.find_element(By.ID, f"{base}-reopen-button").click())
    await focused(browser, f"{base}-reopen-text")
    await typed(browser, REOPEN)
    await browser.run(
        lambda d: d.find_element(By.CSS_SELECTOR, f"#{base}-reopen button[type=submit]").click()
    )
    await browser.css(f"#data-queries tr.query[data-query-id='{qid}'][data-state=open]")
    assert (await query_steps(url))[-1] == ("query.reopen", "monitor", str(qid))
    q = await api_query(web, qid)
    assert q["state"] == "open"
    assert [m[:2] for m in thread_of(q)] == [
        ("open", "monitor"),
        ("answer", "coordinator"),
        ("close", "monitor"),
        ("reopen", "monitor"),
    ]

    # 5. The coordinator reads the whole thread and starts answering again; meanwhile the
    # monitor closes the query through the API. The answer is refused: the card says why
    # and shows the query as it is now; nothing is stored.
    await switch_user(browser, "/participants/P1", "coordinator")
    await browser.css(f"#data-queries tr.query[data-query-id='{qid}'][data-state=open]")
    await browser.run(lambda d: d.find_element(By.ID, f"{base}-thread-button").click())
    await browser.wait_for(
        "the whole thread",
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#data-queries .thread li.message")) == 4,
    )
    shown = await card(browser, "data-queries")
    assert shown["threads"] == [
        ["Asked", QUESTION],
        ["Answered", ANSWER],
        ["Closed", CLOSE],
        ["Reopened", REOPEN],
    ]
    await shot(browser, "#data-queries", "queries-thread.png")
    await browser.run(lambda d: d.find_element(By.ID, f"{base}-answer-button").click())
    await focused(browser, f"{base}-answer-text")
    await typed(browser, "The visit time is now in the notes.")
    resp = await web.call("monitor", "POST", f"/api/v1/queries/{qid}/close", json={"text": EVIL})
    assert resp.status == 200, await resp.text()
    before = await query_steps(url)
    await browser.run(
        lambda d: d.find_element(By.CSS_SELECTOR, f"#{base}-answer button[type=submit]").click()
    )
    await browser.css("#data-queries p.queries-problem")
    shown = await card(browser, "data-queries")
    assert shown["notice"] == (
        f"Query {qid}: Not answered: query {qid} is closed: it cannot be answered (409)."
        " Nothing was stored; the list shows the query as it is now."
    )
    assert shown["active"] == "data-queries-notice"
    assert shown["forms"] == 0
    assert [(r["state"], r["steps"]) for r in shown["rows"]] == [("closed", [])]
    assert await query_steps(url) == before
    q = await api_query(web, qid)
    assert q["state"] == "closed"
    assert len(q["messages"]) == 5
    assert [m["action"] for m in q["messages"]].count("answer") == 1

    # 6. A clinician may answer an open query (the API lets the site's clinicians answer)
    # and do nothing else: no step on the closed one, only "Answer" on a new open one. The
    # monitor's reason with a script tag in it is text.
    resp = await web.call(
        "monitor",
        "POST",
        "/api/v1/participants/P1/queries",
        json={
            "target": "range",
            "metric": "heart_rate",
            "from": datetime.fromtimestamp((now_ms() - 60_000) / 1000, UTC).isoformat(),
            "to": datetime.fromtimestamp((now_ms() - 55_000) / 1000, UTC).isoformat(),
            "text": "Second look: " + EVIL,
        },
    )
    assert resp.status == 201, await resp.text()
    second = (await resp.json())["query_id"]
    await switch_user(browser, "/participants/P1", "clinician")
    await browser.css(f"#data-queries tr.query[data-query-id='{second}']")
    await browser.run(
        lambda d: d.find_element(
            By.CSS_SELECTOR, "#data-queries details.queries-closed summary"
        ).click()
    )
    await browser.run(lambda d: d.find_element(By.ID, f"{base}-thread-button").click())
    await browser.wait_for(
        "the closed query's thread",
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#data-queries .thread li.message")) == 5,
    )
    shown = await card(browser, "data-queries")
    assert [(r["id"], r["state"], r["steps"]) for r in shown["rows"]] == [
        (second, "open", ["answer"]),
        (qid, "closed", []),
    ]
    assert shown["rows"][0]["cells"][1] == "Second look: " + EVIL
    assert shown["rows"][1]["cells"][4].endswith(": " + EVIL)
    assert shown["threads"][-1] == ["Closed", EVIL]
    assert shown["pwned"] is None
    # What each role is offered in each state, as the page computes it, is the API's.
    offered = await browser.run(
        lambda d: d.execute_script(
            "return Object.fromEntries(arguments[0].map((r) => [r, Object.fromEntries("
            "arguments[1].map((s) => [s, TS.querySteps(r, s)]))]))",
            list(ROLES),
            list(STATES),
        )
    )
    rules = expected_steps()
    assert offered == {
        role: {
            state: [
                s
                for s in ("answer", "close", "reopen")
                if role in rules[s]["roles"] and state in rules[s]["from"]
            ]
            for state in STATES
        }
        for role in ROLES
    }
