"use strict";
// Shared by every page: the API client (session cookie + CSRF header), a DOM builder that
// only ever inserts text, and small formatting helpers.
const TS = (() => {
  let csrf = null;

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function status(text) {
    const s = document.getElementById("status");
    if (s) s.textContent = text;
  }

  async function api(path, opts = {}) {
    const method = opts.method || "GET";
    const headers = { Accept: "application/json" };
    if (opts.body !== undefined) headers["Content-Type"] = "application/json";
    if (method !== "GET" && csrf) headers["X-CSRF-Token"] = csrf;
    const resp = await fetch(path, {
      method,
      headers,
      credentials: "same-origin",
      body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
    });
    if (resp.status === 401 && !opts.noRedirect) {
      location.assign("/login?next=" + encodeURIComponent(location.pathname));
      const err = new Error("signed out");
      err.status = 401;
      throw err;
    }
    const text = await resp.text();
    const data = text ? JSON.parse(text) : null;
    if (!resp.ok) {
      const err = new Error((data && data.title) || resp.statusText);
      err.status = resp.status;
      err.problem = data;
      throw err;
    }
    return data;
  }

  async function session() {
    const s = await api("/api/v1/session");
    csrf = s.csrf_token;
    return s.user;
  }

  function time(iso) {
    if (!iso) return "—";
    const d = typeof iso === "number" ? new Date(iso) : new Date(iso);
    return d.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
  }

  // A moment as the participant lived it and as UTC: "14:03:05 Europe/Berlin (12:03:05 UTC)",
  // in the zone valid at that moment (zones: the participant's, oldest first, each from a
  // time on, the first also covering earlier times); only UTC when none is set.
  function clock(t, zones) {
    const hms = (zone) => new Intl.DateTimeFormat("en-GB", {
      timeZone: zone, hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23",
    }).format(new Date(t));
    const ms = typeof t === "number" ? t : Date.parse(t);
    const valid = (zones || []).filter((z, i) => i === 0 || Date.parse(z.from) <= ms);
    const zone = valid.length ? valid[valid.length - 1].time_zone : null;
    if (!zone || zone === "UTC") return `${hms("UTC")} UTC`;
    return `${hms(zone)} ${zone} (${hms("UTC")} UTC)`;
  }

  function ago(iso) {
    if (!iso) return "never";
    const s = Math.max(0, Math.round((Date.now() - new Date(iso).getTime()) / 1000));
    if (s < 90) return s + " s ago";
    if (s < 5400) return Math.round(s / 60) + " min ago";
    if (s < 129600) return Math.round(s / 3600) + " h ago";
    return Math.round(s / 86400) + " days ago";
  }

  function table(caption, headers, rows, empty) {
    if (!rows.length) return el("p", { class: "empty" }, empty || "None.");
    return el(
      "table",
      {},
      el("caption", {}, caption),
      el("thead", {}, el("tr", {}, headers.map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, rows.map((r) => (r instanceof Node ? r : el("tr", {}, r.map((c) => el("td", {}, c)))))),
    );
  }

  let sections = 0;

  // A card with a heading. A table in it captioned like the heading loses that caption (the
  // heading names it instead), so the title is not shown twice.
  function section(title, ...content) {
    const id = `section-${++sections}`;
    for (const c of content.flat()) {
      const caption = c instanceof HTMLTableElement ? c.caption : null;
      if (caption && caption.textContent === title) {
        caption.remove();
        c.setAttribute("aria-labelledby", id);
      }
    }
    return el("section", { class: "card", "aria-labelledby": id }, el("h2", { id }, title), ...content);
  }

  // A labelled input with an optional hint, tied to it for screen readers.
  function field(id, label, attrs, hint) {
    const input = el("input", { id, name: id, ...attrs, "aria-describedby": hint ? `${id}-hint` : null });
    return el("div", { class: "field" },
      el("label", { for: id }, label), input,
      hint ? el("p", { class: "hint", id: `${id}-hint` }, hint) : null);
  }

  // A datetime-local value ("2026-03-10T09:30") as ISO 8601 with the browser's zone offset at
  // that moment ("2026-03-10T09:30:00+01:00"); null if it is not a time.
  function localIso(value) {
    const d = new Date(value);
    if (!value || Number.isNaN(d.getTime())) return null;
    const pad = (n) => String(Math.abs(n)).padStart(2, "0");
    const off = -d.getTimezoneOffset();
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:00${off < 0 ? "-" : "+"}` +
      `${pad(Math.trunc(off / 60))}:${pad(off % 60)}`;
  }

  // A refusal under a form: its text in the form's alert, and the field it is about (if any)
  // marked invalid and focused, a password field cleared; else the alert focused.
  function formError(error, target, text) {
    error.textContent = text;
    if (target) {
      target.setAttribute("aria-invalid", "true");
      if (target.type === "password") target.value = "";
      target.focus();
    } else {
      error.focus();
    }
  }

  function link(href, text) {
    return el("a", { href }, text);
  }

  // Watching a stream is not a use of the session: it ends after the idle time like any
  // other. Shortly before, the stream says when; the page offers to stay signed in, which
  // is a use of the session.
  function warnBeforeIdleEnd(source) {
    source.addEventListener("session-idle", (m) => {
      const ends = JSON.parse(m.data).idle_expires_at;
      let bar = document.getElementById("idle-warning");
      if (!bar) {
        bar = el("div", { id: "idle-warning", class: "idle-warning", role: "alert" });
        document.body.prepend(bar);
      }
      const stay = el("button", { type: "button", id: "stay-signed-in" }, "Stay signed in");
      stay.addEventListener("click", async () => {
        try {
          await session();
          bar.remove();
        } catch (e) {
          status("Could not stay signed in: " + e.message);
        }
      });
      bar.replaceChildren(`Signing out for inactivity at ${time(ends)}. `, stay);
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    const out = document.getElementById("sign-out");
    if (out) {
      // A page may not have asked for the session's CSRF token (the "not available" page
      // runs no script of its own): sign-out asks first, and says so if it fails rather
      // than leaving the session open behind the sign-in page.
      out.addEventListener("click", async () => {
        try {
          if (!csrf) await session();
          await api("/api/v1/session", { method: "DELETE", noRedirect: true });
        } catch (e) {
          if (e.status !== 401) {
            status("Not signed out: " + e.message);
            return;
          }
        }
        location.assign("/login");
      });
    }
  });


  // Data queries (docs/queries.md): what one is about, in words.
  function queryAbout(q) {
    const metric = q.metric ? q.metric.replace(/_/g, " ") : "";
    // A span within one day names the day once.
    const sameDay = new Date(q.from).toDateString() === new Date(q.to).toDateString();
    const until = sameDay ? new Date(q.to).toLocaleTimeString() : time(q.to);
    if (q.target === "reading") return `${metric} reading at ${time(q.from)} (hub ${q.device_id}, envelope ${q.seq})`;
    if (q.target === "gap") return `gap from ${time(q.from)} to ${until} (hub ${q.device_id})`;
    return `${metric} from ${time(q.from)} to ${until}`;
  }

  // Who may take which step of a data query, and from which states: the roles of the step's
  // endpoint in gateway/web/api_queries.py and the states of storage/queries.py's _STEPS
  // (tests/web/test_pages_queries_browser.py holds the three together). The API decides; a
  // page offers only what it would accept, and shows its refusal when it says no.
  const QUERY_STEPS = {
    "answer": {"roles": ["site_coordinator", "clinician", "admin"], "from": ["open"]},
    "close": {"roles": ["monitor", "admin"], "from": ["open", "answered"]},
    "reopen": {"roles": ["monitor", "admin"], "from": ["answered", "closed"]}
  };
  // The longest text of a step (storage/queries.py MAX_TEXT).
  const QUERY_TEXT_MAX = 4000;
  const STEP_WORDS = {
    answer: { button: "Answer", label: "Your answer to the question", submit: "Send answer",
      done: "answered", not: "Not answered", empty: "Write the answer for the monitor." },
    close: { button: "Close", label: "Why it can be closed", submit: "Close query",
      done: "closed", not: "Not closed", empty: "Say why the query can be closed." },
    reopen: { button: "Reopen", label: "What is still unclear", submit: "Reopen query",
      done: "reopened", not: "Not reopened", empty: "Say what is still unclear." },
  };
  // A message's action as the thread tells it.
  const SAID = { open: "Asked", answer: "Answered", close: "Closed", reopen: "Reopened" };

  // The steps ``role`` may take on a query in ``state``.
  function querySteps(role, state) {
    return Object.keys(QUERY_STEPS).filter((s) =>
      QUERY_STEPS[s].roles.includes(role) && QUERY_STEPS[s].from.includes(state));
  }

  // A refusal of the API in words: its problem's title and detail.
  function problemText(e) {
    const p = e.problem;
    if (!p) return e.message;
    return [p.title, p.detail].filter(Boolean).join(": ") + (p.status ? ` (${p.status})` : "");
  }

  // The card of data queries, kept by the page: what each is about, the question, its state,
  // who opened it when, its last step, and the steps the user's role may take on it in its
  // state. Open and answered queries are listed; closed ones are folded away below. Each
  // query's thread (GET the query) unfolds under it, as does the short form of a step.
  // opts: id (the card's element id), role (the signed-in user's), url (the list to read),
  // participants (a column naming each query's participant), changed (what to read again
  // after a step; by default the list), drawn(list) (called after each drawing).
  // ``node`` is the card's element as drawn now; ``show(list)`` draws a list read elsewhere;
  // ``refresh(quiet)`` reads the list again (quiet: not while a form is being filled in).
  function queriesCard(opts) {
    let list = null;
    const threads = new Map(); // query id -> { loading } | { messages } | { error }
    let form = null; // { qid, step, draft, error }: the one step form open
    let notice = null; // { text, problem }: the last step's outcome, shown in the card
    let closedOpen = false;
    let focusAfter = null; // the id of the element to focus once drawn
    let node = el("section", { id: opts.id, class: "card queries-card" }, "Loading data queries…");
    const ids = (qid) => `${opts.id}-q${qid}`;
    const noticeId = `${opts.id}-notice`;
    const counted = (text) => `${text.length} of ${QUERY_TEXT_MAX} characters`;

    function stepButtons(q) {
      return querySteps(opts.role, q.state).map((s) => {
        const shown = form !== null && form.qid === q.query_id && form.step === s;
        return el("button", {
          type: "button", class: `step step-${s}`, id: `${ids(q.query_id)}-${s}-button`,
          "data-step": s, "aria-expanded": shown ? "true" : "false",
          "aria-controls": shown ? `${ids(q.query_id)}-${s}` : null,
          "aria-label": `${STEP_WORDS[s].button} query ${q.query_id}`,
          onclick: () => openForm(q.query_id, s),
        }, STEP_WORDS[s].button);
      });
    }

    function row(q) {
      const asked = q.messages.find((m) => m.action === "open");
      const last = q.messages[q.messages.length - 1];
      const qid = q.query_id;
      const unfolded = threads.has(qid);
      const toggle = el("button", {
        type: "button", class: "secondary thread-toggle", id: `${ids(qid)}-thread-button`,
        "aria-expanded": unfolded ? "true" : "false",
        "aria-controls": unfolded ? `${ids(qid)}-thread` : null,
        "aria-label": `Thread (${q.messages.length}) of query ${qid}`,
        onclick: () => toggleThread(qid),
      }, `Thread (${q.messages.length})`);
      return el("tr", { class: `query query-${q.state}`, "data-query-id": qid, "data-state": q.state },
        opts.participants ? el("td", {}, link(`/participants/${encodeURIComponent(q.participant_id)}`, q.participant_id)) : null,
        el("td", {}, queryAbout(q)),
        el("td", { class: "question" }, el("div", { class: "clamp" }, asked ? asked.text : "—")),
        el("td", {}, el("span", { class: `query-state ${q.state}` }, q.state)),
        el("td", {}, `${q.opened_by}, ${time(q.opened_at)}`),
        el("td", { class: "last-step" }, el("div", { class: "clamp" },
          last && last !== asked ? `${last.action} by ${last.actor}, ${time(last.at)}: ${last.text}` : "—")),
        el("td", { class: "query-actions" }, el("div", { class: "actions" }, toggle, stepButtons(q))));
    }

    function thread(qid) {
      const t = threads.get(qid);
      let body;
      if (t.loading) body = el("p", { class: "hint" }, "Reading the thread…");
      else if (t.error) body = el("p", { class: "error" }, `The thread could not be read: ${t.error}`);
      else {
        body = el("ol", { class: "messages" }, t.messages.map((m) =>
          el("li", { class: `message message-${m.action}` },
            el("p", { class: "said-by" }, el("strong", {}, SAID[m.action] || m.action), ` by ${m.actor}, ${time(m.at)}`),
            el("p", { class: "said-text" }, m.text))));
      }
      return el("div", { class: "thread", id: `${ids(qid)}-thread`, role: "region",
        "aria-label": `Thread of query ${qid}` }, body);
    }

    function stepForm(q) {
      const s = form.step, w = STEP_WORDS[s], fid = `${ids(q.query_id)}-${s}`;
      const text = el("textarea", { id: `${fid}-text`, name: "text", rows: "3",
        maxlength: String(QUERY_TEXT_MAX), required: true, "aria-describedby": `${fid}-count ${fid}-error` });
      text.value = form.draft;
      const count = el("p", { class: "hint counter", id: `${fid}-count` }, counted(form.draft));
      const error = el("p", { class: "error", id: `${fid}-error`, role: form.errorTold ? null : "alert" },
        form.error || "");
      if (form.error) form.errorTold = true;
      const submit = el("button", { type: "submit" }, w.submit);
      const open = form;
      text.addEventListener("input", () => {
        open.draft = text.value;
        count.textContent = counted(text.value);
      });
      text.addEventListener("keydown", (ev) => {
        if (ev.key === "Escape") {
          ev.preventDefault();
          cancel();
        }
      });
      const f = el("form", { class: `query-step step-${s}`, id: fid, "data-query-id": q.query_id,
        "data-step": s, novalidate: true },
        el("label", { for: `${fid}-text` }, `${w.label} (query ${q.query_id})`), text, count, error,
        el("div", { class: "actions" }, submit,
          el("button", { type: "button", class: "secondary", onclick: cancel }, "Cancel")));
      f.addEventListener("submit", (ev) => {
        ev.preventDefault();
        send(q, s, text, error, submit);
      });
      return f;
    }

    function more(q, span) {
      const qid = q.query_id;
      const withForm = form !== null && form.qid === qid;
      if (!threads.has(qid) && !withForm) return null;
      return el("tr", { class: "query-more", "data-query-id": qid },
        el("td", { colspan: String(span) }, threads.has(qid) ? thread(qid) : null, withForm ? stepForm(q) : null));
    }

    function build() {
      const headers = [...(opts.participants ? ["Participant"] : []),
        "About", "Question", "State", "Opened", "Last step", "Actions"];
      const rows = (qs) => qs.flatMap((q) => [row(q), more(q, headers.length)]).filter(Boolean);
      const unresolved = list.filter((q) => q.state !== "closed");
      const closed = list.filter((q) => q.state === "closed");
      let folded = null;
      if (closed.length) {
        const closedTable = table("Closed data queries", headers, rows(closed));
        closedTable.caption.className = "sr-only";
        folded = el("details", { class: "queries-closed", open: closedOpen },
          el("summary", {}, `Closed queries (${closed.length})`), closedTable);
        folded.addEventListener("toggle", () => {
          closedOpen = folded.open;
        });
      }
      // Announced once, when new: not again with each drawing.
      const said = notice ? el("p", {
        id: noticeId, tabindex: "-1", class: notice.problem ? "error queries-problem" : "ok queries-notice",
        role: notice.told ? null : notice.problem ? "alert" : "status",
      }, notice.text) : null;
      if (notice) notice.told = true;
      const card = section("Data queries", said,
        table("Data queries", headers, rows(unresolved), "No open or answered data queries."), folded);
      card.id = opts.id;
      card.classList.add("queries-card");
      return card;
    }

    function draw() {
      if (list === null) return;
      const active = document.activeElement;
      const kept = active && active.id && node.contains(active)
        ? { id: active.id, start: active.selectionStart, end: active.selectionEnd } : null;
      const fresh = build();
      if (node.isConnected) node.replaceWith(fresh);
      node = fresh;
      const target = focusAfter || (kept && kept.id);
      focusAfter = null;
      const found = target ? document.getElementById(target) : null;
      if (found) {
        if (found.closest("details") && !found.closest("details").open) found.closest("details").open = true;
        found.focus();
        if (kept && kept.id === target && typeof kept.start === "number" && found.setSelectionRange) {
          found.setSelectionRange(kept.start, kept.end);
        }
      }
      if (opts.drawn) opts.drawn(list);
    }

    function show(queries) {
      list = queries;
      for (const qid of [...threads.keys()]) {
        const q = list.find((x) => x.query_id === qid);
        if (!q) threads.delete(qid);
        else if (!threads.get(qid).loading) threads.set(qid, { messages: q.messages });
      }
      if (form !== null && !list.some((x) => x.query_id === form.qid)) form = null;
      draw();
    }

    async function refresh(quiet) {
      if (quiet && form !== null) return; // not redrawn under the hands of someone writing
      const read = (await api(opts.url)).queries;
      if (quiet && list !== null && JSON.stringify(read) === JSON.stringify(list)) return;
      show(read);
    }

    const changed = () => (opts.changed ? opts.changed() : refresh(false));

    function openForm(qid, step) {
      const again = form !== null && form.qid === qid && form.step === step;
      form = again ? null : { qid, step, draft: "", error: "" };
      notice = null;
      focusAfter = again ? `${ids(qid)}-${step}-button` : `${ids(qid)}-${step}-text`;
      draw();
    }

    function cancel() {
      if (form === null) return;
      focusAfter = `${ids(form.qid)}-${form.step}-button`;
      form = null;
      draw();
    }

    async function toggleThread(qid) {
      focusAfter = `${ids(qid)}-thread-button`;
      if (threads.has(qid)) {
        threads.delete(qid);
        draw();
        return;
      }
      threads.set(qid, { loading: true });
      draw();
      try {
        const q = await api(`/api/v1/queries/${encodeURIComponent(qid)}`);
        if (!threads.has(qid)) return;
        threads.set(qid, { messages: q.messages });
        list = list.map((x) => (x.query_id === qid ? q : x));
      } catch (e) {
        if (!threads.has(qid)) return;
        threads.set(qid, { error: problemText(e) });
      }
      draw();
    }

    async function send(q, s, text, error, submit) {
      const w = STEP_WORDS[s], qid = q.query_id;
      const said = text.value.trim();
      if (!said) {
        form.error = w.empty;
        form.errorTold = true;
        error.textContent = w.empty;
        text.focus();
        return;
      }
      submit.disabled = true;
      error.textContent = "";
      try {
        await api(`/api/v1/queries/${encodeURIComponent(qid)}/${s}`, { method: "POST", body: { text: said } });
      } catch (e) {
        if (e.status === 401) return; // sent to sign in
        const why = `${w.not}: ${problemText(e)}`;
        try {
          await changed();
        } catch (_) {
          // The refusal is what matters here; the list is read again with the next step.
        }
        const now = list.find((x) => x.query_id === qid);
        if (form !== null && now && querySteps(opts.role, now.state).includes(s)) {
          form.error = why;
          form.errorTold = false;
          focusAfter = `${ids(qid)}-${s}-text`;
        } else {
          form = null;
          // A refusal (4xx) stored nothing; after a server error the list says what is so.
          const then = e.status < 500 ? "Nothing was stored; the list" : "The list";
          notice = { text: `Query ${qid}: ${why}. ${then} shows the query as it is now.`, problem: true };
          focusAfter = noticeId;
        }
        status(`Query ${qid}: ${why}`);
        draw();
        return;
      }
      form = null;
      notice = { text: `Query ${qid} ${w.done}.`, problem: false };
      status(notice.text);
      focusAfter = noticeId;
      draw();
      focusAfter = noticeId; // again once read again: a page may redraw around the card
      try {
        await changed();
      } catch (e) {
        focusAfter = null;
        status(`Query ${qid} ${w.done}, but the list could not be read again: ${e.message}`);
      }
    }

    return {
      get node() { return node; },
      show,
      refresh,
    };
  }

  return { el, api, session, time, clock, ago, table, section, link, field, localIso, formError, status,
    warnBeforeIdleEnd, queriesCard, querySteps, problemText, QUERY_STEPS, QUERY_TEXT_MAX };
})();
