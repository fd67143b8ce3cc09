"use strict";
// The monitor's alert board: the unresolved alerts of the user's sites, kept current by the
// server-sent event feed (which resumes after a reconnect from the last event seen). Each
// alert shows what opened it (the value, the rule's bound, how long the condition had held)
// and the participant's latest value of the metric as the gateway last answered.
(() => {
  const { el, api, session, time, table, status } = TS;
  const alerts = new Map();
  const open = new Set(); // alert ids whose history is shown
  let filters = { site: "", severity: "", showResolved: false };
  let board;

  function visible(a) {
    if (filters.site && a.site_id !== filters.site) return false;
    if (filters.severity && a.severity !== filters.severity) return false;
    if (!filters.showResolved && a.state === "resolved") return false;
    return true;
  }

  async function act(a, what) {
    try {
      const updated = await api(`/api/v1/alerts/${a.alert_id}/${what}`, { method: "POST", body: {} });
      alerts.set(updated.alert_id, updated);
      status(`Alert ${a.alert_id} ${updated.state}.`);
      render();
    } catch (e) {
      status(`Alert ${a.alert_id}: ${e.message}`);
    }
  }

  async function history(a, cell) {
    const got = await api(`/api/v1/alerts/${a.alert_id}`);
    cell.replaceChildren(
      el(
        "ol",
        { class: "history", "aria-label": `Audit trail of alert ${a.alert_id}` },
        got.events.map((e) => el("li", {}, `${time(e.at)} — ${e.event} by ${e.actor}`)),
      ),
    );
  }

  // "2 min 5 s", "1 h 20 min", "45 s".
  function duration(seconds) {
    const s = Math.round(seconds);
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min` + (s % 60 ? ` ${s % 60} s` : "");
    const m = Math.round(s / 60);
    return `${Math.floor(m / 60)} h` + (m % 60 ? ` ${m % 60} min` : "");
  }

  const withUnit = (v, unit) => (unit ? `${v} ${unit}` : String(v));

  // What opened the alert: for a range rule the value that met it against the bound it
  // crossed and how long the condition had held by then; for missing data the silence; for
  // adherence the newest day's share against the rule's percentage and days.
  function opening(a) {
    if (a.kind === "missing_data") {
      return el("div", { class: "opened" },
        el("strong", {}, `no reading for ${duration(a.held_s ?? a.sustained_s)}`),
        el("div", { class: "hint" }, `rule: silence of ${duration(a.sustained_s)}; last reading ${time(a.first_time)}`));
    }
    if (a.kind === "adherence") {
      const days = Math.round(a.sustained_s / 86400);
      const value = a.value === null ? "—" : `${Math.round(a.value)} % adherence`;
      return el("div", { class: "opened" },
        el("strong", { class: "opened-value" }, value),
        ` < ${a.low} % on each of ${days} expected day${days === 1 ? "" : "s"}`,
        el("div", { class: "hint" }, `from ${time(a.first_time)}; met ${time(a.condition_time)}`));
    }
    let bound = "";
    if (a.value !== null && a.high !== null && a.value > a.high) bound = ` > ${withUnit(a.high, a.unit)} (high)`;
    else if (a.value !== null && a.low !== null && a.value < a.low) bound = ` < ${withUnit(a.low, a.unit)} (low)`;
    const held = a.held_s ? ` for ${duration(a.held_s)}` : "";
    const rule = a.sustained_s ? `rule: ${duration(a.sustained_s)} or longer` : "rule: any reading";
    return el("div", { class: "opened" },
      el("strong", { class: "opened-value" }, a.value === null ? "—" : withUnit(a.value, a.unit)),
      bound, held,
      el("div", { class: "hint" }, `met ${time(a.condition_time)}; ${rule}`));
  }

  // The participant's latest reading of the metric, with the device's doubt if it had any.
  function latest(a) {
    const r = a.latest;
    if (!r) return el("span", { class: "empty" }, "none in 30 days");
    const doubt = r.quality === "invalid" || r.quality === "questionable";
    return el("div", { class: "latest-value", "data-quality": r.quality || "" },
      el("strong", {}, withUnit(r.value, r.unit)),
      doubt ? [" ", el("span", { class: `badge quality-${r.quality}` }, r.quality)] : null,
      el("div", { class: "hint" }, `at ${time(r.time)}`));
  }

  function row(a) {
    const actions = [];
    if (a.state === "open") {
      actions.push(el("button", { type: "button", class: "ack", onclick: () => act(a, "acknowledge") }, "Acknowledge"));
    } else if (a.state === "acknowledged") {
      actions.push(el("button", { type: "button", class: "resolve", onclick: () => act(a, "resolve") }, "Resolve"));
    }
    const shown = open.has(a.alert_id);
    actions.push(
      el(
        "button",
        {
          type: "button",
          class: "secondary",
          "aria-expanded": shown ? "true" : "false",
          onclick: () => {
            if (open.has(a.alert_id)) open.delete(a.alert_id);
            else open.add(a.alert_id);
            render();
          },
        },
        "History",
      ),
    );
    const tr = el(
      "tr",
      { class: `alert sev-${a.severity} state-${a.state}`, "data-alert-id": a.alert_id, "data-state": a.state },
      el("td", {}, el("span", { class: `badge sev-${a.severity}` }, a.severity)),
      el("td", {}, el("a", { href: `/participants/${encodeURIComponent(a.participant_id)}/live` }, a.participant_id)),
      el("td", {}, a.site_id),
      el("td", {}, `${a.rule} (${a.metric})`),
      el("td", { class: "what" }, opening(a)),
      el("td", { class: "now" }, latest(a)),
      el("td", {}, time(a.opened_at)),
      el("td", { class: "state" }, a.state + (a.acknowledged_by ? ` by ${a.acknowledged_by}` : "")),
      el("td", { class: "actions" }, actions),
    );
    if (!shown) return [tr];
    const cell = el("td", { colspan: "9" }, "Loading…");
    history(a, cell).catch((e) => cell.replaceChildren(e.message));
    return [tr, el("tr", { class: "history-row" }, cell)];
  }

  function render() {
    const list = [...alerts.values()].filter(visible).sort((x, y) => y.alert_id - x.alert_id);
    board.replaceChildren(
      table(
        "Alerts",
        ["Severity", "Participant", "Site", "Rule", "What opened it", "Latest value", "Opened", "State", ""],
        list.flatMap(row),
        "No alerts match. New ones appear here as they are raised.",
      ),
    );
  }

  function follow(after) {
    const live = document.getElementById("live");
    const source = new EventSource(`/api/v1/alerts/events?after=${after}`);
    source.onopen = () => {
      live.textContent = "Live";
      live.className = "live on";
    };
    source.onerror = () => {
      live.textContent = "Reconnecting…";
      live.className = "live off";
    };
    source.addEventListener("alert", (m) => {
      const ev = JSON.parse(m.data);
      if (ev.alert) alerts.set(ev.alert.alert_id, ev.alert);
      if (ev.event === "opened") status(`New ${ev.severity} alert for ${ev.participant_id}.`);
      render();
      // The notifier plans and sends within seconds of the event.
      setTimeout(refreshDeliveries, 3000);
    });
    TS.warnBeforeIdleEnd(source);
    source.addEventListener("signed-out", () => {
      source.close();
      location.assign("/login?next=/monitor");
    });
  }

  // What was sent about alerts to the people on call (e-mail, webhook), newest first: a
  // delivery that failed, or an event that reached no one, is what a monitor must see.
  const DELIVERY_POLL_MS = 30000;
  let deliveries;

  function deliveryRow(d) {
    const to = d.user ? `${d.user} by ${d.channel}` : "nobody";
    const when = d.state === "sent" ? time(d.sent_at)
      : d.state === "pending" ? `next try ${time(d.next_attempt_at)}` : time(d.created_at);
    return el("tr", { class: `delivery state-${d.state}`, "data-delivery-id": d.delivery_id, "data-state": d.state },
      el("td", {}, `alert ${d.alert_id}`),
      el("td", {}, `${d.event} (${d.severity})`),
      el("td", {}, d.site_id),
      el("td", {}, to),
      el("td", { class: "state" }, d.state.replace("_", " ")),
      el("td", {}, String(d.attempts)),
      el("td", {}, when),
      el("td", { class: "error" }, d.last_error || ""));
  }

  // The card's heading names the table.
  function uncaptioned(t) {
    if (t instanceof HTMLTableElement) {
      t.caption.remove();
      t.setAttribute("aria-labelledby", "deliveries-title");
    }
    return t;
  }

  async function refreshDeliveries() {
    try {
      const got = await api("/api/v1/alerts/deliveries?limit=20");
      const failing = got.deliveries.filter((d) => d.state === "failed" || d.state === "no_recipient");
      deliveries.replaceChildren(
        el("h2", { id: "deliveries-title" }, "Alert e-mail and pages"),
        failing.length
          ? el("p", { class: "warning", role: "alert" },
            `${failing.length} of the latest ${got.deliveries.length} deliveries failed or reached no one: see below.`)
          : "",
        uncaptioned(table("Alert e-mail and pages",
          ["Alert", "Event", "Site", "To", "State", "Attempts", "When", "Last error"],
          got.deliveries.map(deliveryRow),
          "Nothing sent yet: escalations and critical alerts go to whoever is on call.")));
    } catch (e) {
      status(`Deliveries: ${e.message}`);
    }
  }

  // Exports of the user's sites, run by the gateway in the background: submit, watch the
  // job's state, download its files (each listed with its SHA-256).
  const EXPORT_POLL_MS = 2000;

  function exportsPanel(sites) {
    const studies = [...new Set(sites.map((s) => s.study_id))];
    const kind = el("select", { id: "export-kind" },
      el("option", { value: "parquet" }, "Parquet (analysis)"),
      el("option", { value: "fhir" }, "FHIR R4 NDJSON"),
      el("option", { value: "sdtm" }, "SDTM VS, SUPPVS, DM (CSV + XPT, define.xml)"),
      el("option", { value: "adherence" }, "Adherence by participant and day (Parquet + CSV)"));
    const study = el("select", { id: "export-study" }, studies.map((s) => el("option", { value: s }, s)));
    const who = el("input", { id: "export-participant", maxlength: "64", placeholder: "all of my sites",
      pattern: "[A-Za-z0-9][A-Za-z0-9_.\\-]{0,63}" });
    const list = el("ul", { id: "export-jobs", class: "jobs", "aria-live": "polite" });
    const form = el("form", { class: "inline", id: "export-form" },
      el("label", { for: "export-kind" }, "Format "), kind,
      el("label", { for: "export-study" }, "Study "), study,
      el("label", { for: "export-participant" }, "Participant "), who,
      el("button", { type: "submit" }, "Export"));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const body = { kind: kind.value, study_id: study.value };
      if (who.value.trim()) body.participant_id = who.value.trim();
      try {
        const job = await api("/api/v1/exports", { method: "POST", body });
        const item = el("li", { "data-job-id": job.job_id });
        list.prepend(item);
        watch(job, item);
      } catch (e) {
        status(`Export not started: ${e.message}`);
      }
    });
    return el("section", { class: "card", "aria-labelledby": "exports-title" },
      el("h2", { id: "exports-title" }, "Exports"), form, list);
  }

  function showJob(job, item) {
    const what = `${job.kind.toUpperCase()} of ${job.study_id}${job.participant_id ? " / " + job.participant_id : ""}`;
    const state = job.state === "running" ? `running, ${job.rows_written} rows so far` : job.state;
    const files = job.files.map((f) => el("li", {},
      el("a", { href: f.href, download: f.path.split("/").pop() }, f.path),
      ` · ${f.rows} rows · ${f.bytes} bytes · SHA-256 `, el("code", {}, f.sha256)));
    item.dataset.state = job.state;
    item.replaceChildren(`${what}: ${state}${job.error ? " (" + job.error + ")" : ""}`,
      files.length ? el("ul", {}, files) : "");
  }

  async function watch(job, item) {
    showJob(job, item);
    while (job.state === "queued" || job.state === "running") {
      await new Promise((r) => setTimeout(r, EXPORT_POLL_MS));
      try {
        job = await api(`/api/v1/exports/${job.job_id}`);
      } catch (e) {
        status(`Export ${job.job_id}: ${e.message}`);
        return;
      }
      showJob(job, item);
    }
    status(`Export ${job.state}.`);
  }

  async function start() {
    await session();
    const main = document.getElementById("main");
    const sites = (await api("/api/v1/sites")).sites;
    const siteSel = el("select", { id: "filter-site" }, el("option", { value: "" }, "All my sites"),
      sites.map((s) => el("option", { value: s.site_id }, `${s.name} (${s.site_id})`)));
    const sevSel = el("select", { id: "filter-severity" }, el("option", { value: "" }, "Any severity"),
      ["critical", "warning", "info"].map((s) => el("option", { value: s }, s)));
    const resolved = el("input", { type: "checkbox", id: "filter-resolved" });
    const update = () => {
      filters = { site: siteSel.value, severity: sevSel.value, showResolved: resolved.checked };
      render();
    };
    siteSel.addEventListener("change", update);
    sevSel.addEventListener("change", update);
    resolved.addEventListener("change", update);
    board = el("div", { id: "board" });
    deliveries = el("section", { class: "card", id: "deliveries", "aria-labelledby": "deliveries-title" });
    main.replaceChildren(
      el("div", { class: "toolbar", role: "group", "aria-label": "Filters" },
        el("label", { for: "filter-site" }, "Site "), siteSel,
        el("label", { for: "filter-severity" }, "Severity "), sevSel,
        el("label", { for: "filter-resolved" }, resolved, " show resolved"),
        el("span", { id: "live", class: "live off", role: "status" }, "Connecting…")),
      board,
      deliveries,
      exportsPanel(sites),
    );
    refreshDeliveries();
    setInterval(refreshDeliveries, DELIVERY_POLL_MS);
    const first = await api("/api/v1/alerts?state=unresolved");
    for (const a of first.alerts) alerts.set(a.alert_id, a);
    render();
    follow(first.last_event_id);
  }

  document.addEventListener("DOMContentLoaded", () => start().catch((e) => status(e.message)));
})();
