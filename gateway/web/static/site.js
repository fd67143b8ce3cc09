"use strict";
// A site: its cohort at a glance (each participant's consent, newest reading, unresolved
// alerts, open data queries and today's adherence), the site's data queries with the steps the
// user's role may take on each, devices, pending re-consents and enrollment codes; a site
// coordinator registers participants and makes codes here.
(() => {
  const { el, api, session, time, ago, section, table, link, status } = TS;
  const site = document.body.dataset.site;
  const role = document.body.dataset.role;
  const coordinates = role === "site_coordinator" || role === "admin";
  let lastCode = null; // the code made last on this page: shown again after the lists reload
  const siteApi = `/api/v1/sites/${encodeURIComponent(site)}`;
  // The site's data queries, each naming its participant; after a step the whole page is read
  // again (the cohort counts each participant's open and answered queries).
  const queries = TS.queriesCard({ id: "site-queries", role, url: `${siteApi}/queries?state=all`,
    participants: true, changed: () => load() });

  function consentText(c) {
    if (!c.action) return "no consent";
    if (c.action === "withdraw") return `withdrawn (${c.version})`;
    return `${c.action === "withdraw_scope" ? "partly withdrawn" : "consented"} v${c.version}`;
  }

  // A share as the heat map writes it: whole percent, rounded down (100 only when met in full).
  const pct = (a) => Math.floor(Math.round(a * 10000) / 100);

  function adherenceCell(x) {
    const a = x.adherence_today;
    const href = `/participants/${encodeURIComponent(x.participant_id)}/adherence?day=${a.day}`;
    if (a.adherence === null) return el("td", { class: "adherence" }, el("span", { class: "empty" }, "nothing expected"));
    return el("td", { class: "adherence", "data-adherence": a.adherence },
      link(href, `${pct(a.adherence)} %`),
      el("div", { class: "hint" }, `${a.metrics_met} of ${a.metrics_expected} met in full`));
  }

  function queriesCell(x) {
    const parts = [];
    if (x.open_queries) parts.push(`${x.open_queries} open`);
    if (x.answered_queries) parts.push(`${x.answered_queries} answered`);
    return el("td", { class: "queries", "data-open": x.open_queries, "data-answered": x.answered_queries },
      parts.length ? el("span", { class: x.open_queries ? "warn" : null }, parts.join(", ")) : el("span", { class: "empty" }, "none"));
  }

  // One row per participant: who, consent, newest reading, unresolved alerts (clinical roles
  // only: a coordinator's answer has none), open queries, today's adherence, hubs.
  function cohort(p, clinical) {
    const alerts = p.length > 0 && p[0].unresolved_alerts !== null;
    const headers = ["Participant", "Consent", "Last data", ...(alerts ? ["Unresolved alerts"] : []),
      "Data queries", "Adherence today", "Active hubs", ""];
    const rows = p.map((x) => el("tr", { class: "cohort-row", "data-participant": x.participant_id },
      el("td", {}, link(`/participants/${encodeURIComponent(x.participant_id)}`, x.participant_id)),
      el("td", {}, consentText(x.consent), el("div", { class: "hint" }, x.consent.scopes.join(", ") || "no scopes")),
      el("td", { class: "last-data", title: x.last_reading ? time(x.last_reading) : null },
        x.last_reading ? ago(x.last_reading) : el("span", { class: "empty" }, "none in 30 days")),
      alerts ? el("td", { class: "alerts", "data-count": x.unresolved_alerts },
        x.unresolved_alerts ? el("span", { class: "warn" }, String(x.unresolved_alerts)) : "0") : null,
      queriesCell(x),
      adherenceCell(x),
      el("td", {}, String(x.active_devices)),
      el("td", {}, clinical ? link(`/participants/${encodeURIComponent(x.participant_id)}/live`, "Live view") : "")));
    return table("Participants", headers, rows, "No participants yet.");
  }

  async function load() {
    const [data, asked] = await Promise.all([api(siteApi), api(`${siteApi}/queries?state=all`)]);
    const p = data.participants;
    const clinical = role !== "site_coordinator";
    const parts = cohort(p, clinical);
    const today = p.length ? p[0].adherence_today.day : null;
    const devices = table("Devices",
      ["Participant", "Hub", "Enrolled", "State", "Wearables (battery, last seen)"],
      p.flatMap((x) => x.devices.map((d) => [x.participant_id, d.device_id, time(d.enrolled_at),
        d.revoked_at ? `revoked: ${d.revoked_reason}` : "active",
        d.sensors.map((s) => `${s.sensor}: ${s.battery_level === null ? "?" : s.battery_level + " %"}, ${s.last_seen ? "last reading " + ago(s.last_seen) : "no reading in 30 days"}`).join("; ") || "—"])),
      "No devices enrolled.");
    const pending = table("Pending re-consents",
      ["Participant", "Signed version", "Required version", "By", ""],
      data.pending_reconsents.map((r) => [r.participant_id, r.current_version, r.required_version,
        time(r.reconsent_by), r.overdue ? "overdue" : ""]), "Nobody needs to re-consent.");
    const codes = table("Enrollment codes",
      ["Participant", "Made by", "Made", "Expires", "Used"],
      data.enrollment_codes.map((c) => [c.participant_id, c.created_by, time(c.created_at),
        time(c.expires_at), c.used_at ? `${time(c.used_at)} by ${c.device_id}` : "not yet"]),
      "No codes made.");
    const blocks = [
      el("p", { class: "lead" }, `${data.site.name} · study ${data.site.study_id} · ${p.length} participants · `,
        link(`/sites/${encodeURIComponent(site)}/adherence`, "Adherence (heat map)"), " · ",
        link(`/studies/${encodeURIComponent(data.site.study_id)}`, "Study locks")),
      section("Participants", parts,
        today ? el("p", { class: "hint" }, `Last data: each participant's newest reading. Adherence today: ${today} (UTC), as on the heat map.`) : null),
      queries.node,
      section("Devices", devices),
      section("Consent", pending),
      section("Enrollment codes", codes),
    ];
    if (coordinates) blocks.push(forms(p));
    document.getElementById("main").replaceChildren(...blocks);
    queries.show(asked.queries); // drawn in its place, where the focus it keeps can stay
  }

  function forms(participants) {
    const pidInput = el("input", { id: "new-participant", maxlength: "64", required: true,
      pattern: "[A-Za-z0-9][A-Za-z0-9_.\\-]{0,63}" });
    const add = el("form", { class: "inline" },
      el("label", { for: "new-participant" }, "New participant id "), pidInput,
      el("button", { type: "submit" }, "Register"));
    add.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      try {
        await api(`/api/v1/sites/${encodeURIComponent(site)}/participants`,
          { method: "POST", body: { participant_id: pidInput.value } });
        status(`Participant ${pidInput.value} registered.`);
        await load();
      } catch (e) {
        status(e.message);
      }
    });
    const who = el("select", { id: "code-participant" },
      participants.map((x) => el("option", {
        value: x.participant_id,
        selected: lastCode !== null && lastCode.participant_id === x.participant_id,
      }, x.participant_id)));
    const shown = el("output", { id: "code", class: "code", for: "code-participant", tabindex: "-1" },
      lastCode ? `${lastCode.code} (valid until ${time(lastCode.expires_at)})` : "");
    const code = el("form", { class: "inline" },
      el("label", { for: "code-participant" }, "Enrollment code for "), who,
      el("button", { type: "submit" }, "Make code"), shown);
    code.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      try {
        lastCode = await api(`/api/v1/participants/${encodeURIComponent(who.value)}/enrollment-codes`,
          { method: "POST", body: {} });
        status(`Enrollment code made for ${lastCode.participant_id}.`);
        await load();
        document.getElementById("code").focus();
      } catch (e) {
        status(e.message);
      }
    });
    const blocks = [add, code];
    if (lastCode) {
      // The QR image is drawn by the gateway (SVG) and shown as an image: nothing in it runs.
      blocks.push(el("img", {
        id: "code-qr", class: "qr",
        src: "data:image/svg+xml;charset=utf-8," + encodeURIComponent(lastCode.qr_svg),
        alt: `QR code of enrollment code ${lastCode.code} for ${lastCode.participant_id}, for the hub's camera`,
      }), el("p", { class: "hint" }, "Scan with the hub, or type the code on it. It works once."));
    }
    return section("Register and enroll", ...blocks);
  }

  document.addEventListener("DOMContentLoaded", () =>
    session().then(load).catch((e) => status(e.message)));
})();
