"""The consent signing page in headless Chromium: a participant reads the version in effect,
declines an optional scope, re-enters their password and signs; the page then shows the
signed consent and the audit trail has the signature. A wrong password shows a clear error
next to the password and records no consent. Also the API listing behind the page."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from storage import db, registry
from tests.fixtures.trial import ALL_SCOPES, Trial
from tests.web.browser import Browser
from tests.web.conftest import PASSWORD, Web

TEXT = "Version 2 of the consent.\n\nWe now also ask, optionally, for your blood glucose."


async def new_version(trial: Trial, *, reconsent_in: timedelta | None = None) -> int:
    now = datetime.now(UTC)
    async with db.connection(trial.url) as conn, conn.transaction():
        return await registry.create_consent_document(
            conn,
            trial.study_id,
            "Main ICF",
            "2.0",
            TEXT,
            ALL_SCOPES,
            optional_scopes={"glucose"},
            effective_at=now - timedelta(seconds=1),
            reconsent_by=None if reconsent_in is None else now + reconsent_in,
        )


async def scalar(url: str, query: str, *args: object) -> object:
    async with db.connection(url) as conn:
        cur = await conn.execute(query.encode(), args)
        row = await cur.fetchone()
        assert row is not None
        return row[0]


@pytest.mark.slow
async def test_a_participant_signs_on_their_page_and_a_wrong_password_records_nothing(
    web: Web, chromium: webdriver.Chrome
) -> None:
    url = web.trial.url
    doc = await new_version(web.trial, reconsent_in=timedelta(days=7))
    consents_before = await scalar(url, "SELECT count(*) FROM consents")
    browser = Browser(chromium, web.url)
    await browser.sign_in("/participants/P1", "participant", PASSWORD)

    text = await browser.css(f"#doc-text-{doc}")
    shown = await browser.run(lambda _: text.text)
    assert all(line in shown for line in TEXT.splitlines())
    block = await browser.css(f"article[data-document-id='{doc}']")
    assert "must be signed by" in await browser.run(lambda _: block.text)
    glucose = await browser.css(f"#sign-scope-{doc}-glucose")
    heart = await browser.css(f"#sign-scope-{doc}-heart_rate")
    assert await browser.run(lambda _: glucose.is_enabled() and not glucose.is_selected())
    assert await browser.run(lambda _: heart.is_selected() and not heart.is_enabled())
    username = await browser.css(f"#sign-username-{doc}")
    assert await browser.run(lambda _: username.get_attribute("value")) == "participant"

    # With the keyboard only: type the name, tab past the user name to the password, Enter.
    async def sign_with_keyboard(password: str) -> None:
        def step(d: webdriver.Chrome) -> None:
            name = d.find_element(By.ID, f"sign-name-{doc}")
            name.clear()
            name.send_keys("Participant One", Keys.TAB, Keys.TAB, password, Keys.ENTER)

        await browser.run(step)

    await sign_with_keyboard("not my password")
    error = await browser.wait_for(
        "the error shown",
        lambda d: d.find_element(By.ID, f"sign-error-{doc}").text or None,
    )
    assert "password was not accepted" in error
    assert "nothing was signed" in error
    focused = await browser.run(lambda d: d.switch_to.active_element.get_attribute("id"))
    assert focused == f"sign-password-{doc}"
    password = await browser.css(f"#sign-password-{doc}")
    assert await browser.run(lambda _: password.get_attribute("aria-invalid")) == "true"
    assert f"sign-error-{doc}" in await browser.run(
        lambda _: password.get_attribute("aria-describedby")
    )
    assert await scalar(url, "SELECT count(*) FROM consents") == consents_before
    assert await scalar(url, "SELECT count(*) FROM audit_log WHERE action = 'consent.sign'") == 0
    assert (
        await scalar(
            url,
            "SELECT detail->>'error' FROM audit_log WHERE action = 'consent.sign.refused'",
        )
        == "ReauthenticationFailed"
    )

    await sign_with_keyboard(PASSWORD)
    message = await browser.css("#signed-message")
    assert "Signed version 2.0" in await browser.run(lambda _: message.text)
    assert await browser.run(lambda d: d.switch_to.active_element.get_attribute("id")) == (
        "signed-message"
    )
    history = await browser.wait_for(
        "the signature in the consent history",
        lambda d: next(
            (
                r.text
                for r in d.find_elements(By.CSS_SELECTOR, "#consent-history tbody tr")
                if r.text.startswith("2.0")
            ),
            None,
        ),
    )
    assert "Participant One" in history
    assert "glucose" not in history
    block = await browser.css(f"article[data-document-id='{doc}']")
    assert "Signed." in await browser.run(lambda _: block.text)
    await browser.screenshot("participant-consent.png")

    row = await scalar(
        url,
        "SELECT jsonb_build_array(actor, detail->'participant_id', detail->'document_id',"
        " detail->'declined', detail->'printed_name', detail->'signer')"
        " FROM audit_log WHERE action = 'consent.sign'",
    )
    assert row == ["participant", "P1", doc, ["glucose"], "Participant One", "participant"]
    assert await scalar(url, "SELECT count(*) - 1 FROM consents") == consents_before


async def test_the_listing_shows_versions_in_effect_signed_state_and_deadlines(web: Web) -> None:
    first = web.trial.document_id
    resp = await web.call("participant", "GET", "/api/v1/participants/P1/consent-documents")
    assert resp.status == 200
    body = await resp.json()
    assert body["participant_id"] == "P1"
    assert body["witness_required"] is False
    assert body["in_force"] == {
        "consent_id": body["in_force"]["consent_id"],
        "document_id": first,
        "scopes": sorted(ALL_SCOPES),
    }
    (only,) = body["documents"]
    assert (only["document_id"], only["version"], only["signed"]) == (first, "1.0", True)
    assert only["signed_scopes"] == sorted(ALL_SCOPES)
    assert only["reconsent_by"] is None
    assert only["text"] == "I agree to share my readings."

    # A version not yet in effect is not offered.
    async with db.connection(web.trial.url) as conn, conn.transaction():
        await registry.create_consent_document(
            conn,
            "S1",
            "Main ICF",
            "3.0",
            "later",
            ALL_SCOPES,
            effective_at=datetime.now(UTC) + timedelta(days=30),
        )
    doc = await new_version(web.trial, reconsent_in=timedelta(days=7))
    resp = await web.call("coordinator", "GET", "/api/v1/participants/P1/consent-documents")
    (listed,) = (await resp.json())["documents"]
    assert (listed["document_id"], listed["version"], listed["signed"]) == (doc, "2.0", False)
    assert listed["optional_scopes"] == ["glucose"]
    assert listed["signed_scopes"] == []
    assert listed["reconsent_by"] is not None
    assert listed["overdue"] is False

    # Another site's staff and another participant get 404, as for the participant itself.
    for key in ("other_coordinator", "other_participant"):
        resp = await web.call(key, "GET", "/api/v1/participants/P1/consent-documents")
        assert resp.status == 404
    resp = await web.call("participant", "GET", "/api/v1/participants/P2/consent-documents")
    assert resp.status == 404
