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

  // A card listing data queries: what each is about, the question, its state, who opened
  // it when, and its last step. ``id``: the card's element id.
  function queriesCard(list, id) {
    const rows = list.map((q) => {
      const asked = q.messages.find((m) => m.action === "open");
      const last = q.messages[q.messages.length - 1];
      return el("tr", { class: `query query-${q.state}`, "data-query-id": q.query_id },
        el("td", {}, queryAbout(q)),
        el("td", { class: "question" }, asked ? asked.text : "—"),
        el("td", {}, el("span", { class: `query-state ${q.state}` }, q.state)),
        el("td", {}, `${q.opened_by}, ${time(q.opened_at)}`),
        el("td", {}, last && last !== asked ? `${last.action} by ${last.actor}, ${time(last.at)}: ${last.text}` : "—"));
    });
    const card = section("Data queries",
      table("Data queries", ["About", "Question", "State", "Opened", "Last step"], rows,
        "No open or answered data queries."));
    card.id = id;
    return card;
  }

  return { el, api, session, time, clock, ago, table, section, link, status, warnBeforeIdleEnd,
    queriesCard };
})();
