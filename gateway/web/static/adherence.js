"use strict";
// Adherence (docs/adherence.md), two pages, both drawn from the API alone:
// - a site's cohort: a heat map of participants (rows) by participant-local days (columns),
//   each cell the day's adherence, a link to that participant's day;
// - one participant: a bar chart per metric of the daily adherence over the span, and for a
//   selected day a table per metric (wear time, spot checks, invalid readings,
//   completeness) and the gaps the hub reported, by reason, in minutes.
// The value is carried by lightness (pale: little of the expectation met, dark: all of it),
// so it reads without hue and in greyscale, and always as a number too: in the cell, and in
// each cell's title and accessible name. "Nothing expected" is hatched grey.
(() => {
  const { el, api, session, section, table, link } = TS;
  const SVG = "http://www.w3.org/2000/svg";
  const DAY_MS = 86400000;
  const DATE = /^[0-9]{4}-[0-9]{2}-[0-9]{2}$/;
  // A span of at most this many days draws wide columns with the percentage written in each.
  const WIDE_DAYS = 31;
  const page = document.body.dataset;
  const enc = encodeURIComponent;
  let patterns = 0;

  function svg(tag, attrs, ...children) {
    const n = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined) n.setAttribute(k, String(v));
    }
    for (const c of children) {
      if (c !== null && c !== undefined) n.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return n;
  }

  // Days are the API's YYYY-MM-DD local days: computed and named in UTC so that no browser
  // zone shifts them.
  const dayMs = (d) => Date.UTC(+d.slice(0, 4), +d.slice(5, 7) - 1, +d.slice(8, 10));
  const isoDay = (ms) => new Date(ms).toISOString().slice(0, 10);
  const addDays = (d, n) => isoDay(dayMs(d) + n * DAY_MS);
  const today = () => isoDay(Date.now());
  function spanDays(from, to) {
    const out = [];
    for (let t = dayMs(from); t <= dayMs(to); t += DAY_MS) out.push(isoDay(t));
    return out;
  }
  const named = (d, opts) => new Intl.DateTimeFormat("en-GB", { timeZone: "UTC", ...opts }).format(dayMs(d));
  const longDay = (d) => named(d, { weekday: "short", day: "numeric", month: "short", year: "numeric" });
  const weekday = (d) => named(d, { weekday: "short" });
  const month = (d) => named(d, { month: "short" });
  const dayOfMonth = (d) => String(+d.slice(8, 10));

  // Whole percent, rounded down: 100 only when the expectation is met in full.
  const pct = (a) => Math.floor(Math.round(a * 10000) / 100);
  const pctText = (a) => (a === null ? "—" : `${pct(a)} %`);
  const words = (code) => code.replaceAll("_", " ");
  const hours = (m) => `${(m / 60).toFixed(1)} h`;
  const minutes = (m) => `${Math.round(m)} min`;

  // The colour scale: one hue, lightness from 95 % (0 % met) to 27 % (all of it met); the
  // number on a cell is dark or white, whichever contrasts more with it.
  const lightness = (a) => 95 - 68 * Math.min(1, Math.max(0, a));
  const fill = (a) => `hsl(212, 65%, ${lightness(a).toFixed(1)}%)`;
  function ink(a) {
    const s = 0.65, l = lightness(a) / 100, h = 212;
    const k = (n) => (n + h / 30) % 12;
    const c = s * Math.min(l, 1 - l);
    const f = (n) => l - c * Math.max(-1, Math.min(k(n) - 3, 9 - k(n), 1));
    const lin = (v) => (v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
    const lum = 0.2126 * lin(f(0)) + 0.7152 * lin(f(8)) + 0.0722 * lin(f(4));
    const dark = 0.0135; // #1b1f24
    return (lum + 0.05) / (dark + 0.05) >= 1.05 / (lum + 0.05) ? "#1b1f24" : "#ffffff";
  }

  // The hatch of "nothing expected", one pattern per drawing (ids stay unique on the page).
  function hatch(root) {
    const id = `hatch-${++patterns}`;
    root.append(svg("defs", {},
      svg("pattern", { id, width: 6, height: 6, patternUnits: "userSpaceOnUse", patternTransform: "rotate(45)" },
        svg("rect", { width: 6, height: 6, class: "hatch-bg" }),
        svg("line", { x1: 0, y1: 0, x2: 0, y2: 6, class: "hatch-line" }))));
    return `url(#${id})`;
  }

  // One tab stop for a grid of links: Tab reaches the grid once (at `start`), the arrow keys,
  // Home and End move within it, Enter follows the focused link.
  function rove(root, grid, start) {
    let current = null;
    const place = (node) => {
      if (current) current.setAttribute("tabindex", "-1");
      node.setAttribute("tabindex", "0");
      current = node;
    };
    for (const node of grid.flat()) node.setAttribute("tabindex", "-1");
    place(start);
    const MOVES = { ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [-1, 0], ArrowDown: [1, 0] };
    root.addEventListener("keydown", (ev) => {
      const at = ev.target.closest ? ev.target.closest("a[data-col]") : null;
      if (!at) return;
      const r = +at.dataset.row, c = +at.dataset.col;
      let to = null;
      if (MOVES[ev.key]) to = (grid[r + MOVES[ev.key][0]] || [])[c + MOVES[ev.key][1]];
      else if (ev.key === "Home") to = grid[r][0];
      else if (ev.key === "End") to = grid[r][grid[r].length - 1];
      if (!to) return;
      ev.preventDefault();
      place(to);
      to.focus();
    });
    root.addEventListener("focusin", (ev) => {
      const at = ev.target.closest ? ev.target.closest("a[data-col]") : null;
      if (at) place(at);
    });
  }

  // The span asked for in the page's address; the API checks it.
  function asked() {
    const q = new URLSearchParams(location.search);
    return { from: q.get("from"), to: q.get("to"), day: q.get("day") };
  }

  function query(params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v) q.set(k, v);
    const s = q.toString();
    return s ? `?${s}` : "";
  }

  // Earlier / later by the span's length, the span typed as two dates, back to the default.
  function spanNav(path, from, to) {
    const n = spanDays(from, to).length;
    const now = today();
    const later = addDays(to, n) > now ? [addDays(now, 1 - n), now] : [addDays(from, n), addDays(to, n)];
    const fromInput = el("input", { type: "date", id: "span-from", name: "from", value: from, required: true });
    const toInput = el("input", { type: "date", id: "span-to", name: "to", value: to, required: true });
    return el("div", { class: "toolbar span-nav" },
      el("a", { href: path + query({ from: addDays(from, -n), to: addDays(to, -n) }), id: "span-earlier" },
        `← Earlier ${n} days`),
      to < now
        ? el("a", { href: path + query({ from: later[0], to: later[1] }), id: "span-later" }, `Later ${n} days →`)
        : el("span", { class: "empty", id: "span-later" }, `Later ${n} days →`),
      el("form", { method: "get", action: path, class: "inline span-form" },
        el("label", { for: "span-from" }, "From"), fromInput,
        el("label", { for: "span-to" }, "to"), toInput,
        el("button", { type: "submit" }, "Show")),
      link(path, "Last 14 days"));
  }

  function failed(what, e) {
    const detail = e.problem && e.problem.detail ? `: ${e.problem.detail}` : "";
    return el("p", { class: "error", role: "alert" }, `Could not load ${what}: ${e.message}${detail}`);
  }

  // ---- The cohort: participants x days ----

  function cellLabel(pid, c) {
    if (c.adherence === null) return `${pid}, ${longDay(c.day)}: nothing expected`;
    return `${pid}, ${longDay(c.day)}: ${pct(c.adherence)} % adherence, ` +
      `${c.metrics_met} of ${c.metrics_expected} ${c.metrics_expected === 1 ? "metric" : "metrics"} met in full`;
  }

  // Column heads: the month where it starts (and at the first column), then the day.
  function dayHeads(root, days, x0, width, y, wide) {
    days.forEach((d, j) => {
      const x = x0 + j * width + width / 2;
      const weekend = [0, 6].includes(new Date(dayMs(d)).getUTCDay());
      if (j === 0 || d.endsWith("-01")) {
        root.append(svg("text", { x: x0 + j * width + 2, y, class: "head" }, month(d)));
      }
      root.append(svg("text", { x, y: y + 14, "text-anchor": "middle", class: weekend ? "head weekend" : "head" },
        wide ? `${weekday(d)} ${dayOfMonth(d)}` : dayOfMonth(d)));
    });
  }

  function heatmap(data, days) {
    if (!data.participants.length) return el("p", { class: "empty" }, "No participants at this site.");
    const wide = days.length <= WIDE_DAYS;
    const CW = wide ? 48 : 22, CH = 30, TOP = 36;
    const longest = Math.max(...data.participants.map((p) => p.participant_id.length));
    const LEFT = Math.min(200, 20 + longest * 8);
    const W = LEFT + CW * days.length + 4, H = TOP + CH * data.participants.length + 4;
    const root = svg("svg", {
      width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: "heatmap", id: "heatmap", role: "group",
      "aria-label": `Adherence of ${data.participants.length} participants by day, ${longDay(data.from)} to ${longDay(data.to)}`,
      "aria-describedby": "heatmap-hint",
    });
    const none = hatch(root);
    dayHeads(root, days, LEFT, CW, 12, wide);
    const grid = [];
    data.participants.forEach((p, i) => {
      const pid = p.participant_id;
      const y = TOP + i * CH;
      const shown = pid.length > 22 ? `${pid.slice(0, 21)}…` : pid;
      root.append(svg("a", { href: `/participants/${enc(pid)}/adherence${query({ from: data.from, to: data.to })}`, class: "row-head" },
        svg("title", {}, `${pid}: daily adherence by metric`),
        svg("text", { x: LEFT - 8, y: y + CH / 2 + 4, "text-anchor": "end" }, shown)));
      const byDay = new Map(p.days.map((c) => [c.day, c]));
      const row = [];
      days.forEach((d, j) => {
        const c = byDay.get(d) || { day: d, adherence: null, metrics_expected: 0, metrics_met: 0 };
        const label = cellLabel(pid, c);
        const x = LEFT + j * CW;
        const cell = svg("a", {
          href: `/participants/${enc(pid)}/adherence${query({ day: d, from: data.from, to: data.to })}`,
          class: c.adherence === null ? "cell none" : "cell",
          "data-participant": pid, "data-day": d, "data-row": i, "data-col": j,
          "data-adherence": c.adherence === null ? "" : String(c.adherence),
          "aria-label": label,
        },
        svg("title", {}, label),
        svg("rect", { x: x + 1, y: y + 1, width: CW - 2, height: CH - 2, rx: 3, fill: c.adherence === null ? none : fill(c.adherence) }));
        if (wide && c.adherence !== null) {
          cell.append(svg("text", { x: x + CW / 2, y: y + CH / 2 + 4, "text-anchor": "middle", fill: ink(c.adherence), class: "pct" },
            String(pct(c.adherence))));
        }
        row.push(cell);
        root.append(cell);
      });
      grid.push(row);
    });
    rove(root, grid, grid[0][grid[0].length - 1]);
    return el("div", { class: "scroll-x" }, root);
  }

  // The scale as swatches (0 to 100 % in tens), then the hatch of "nothing expected".
  function legend() {
    const steps = [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1];
    const SW = 26, W = 70 + steps.length * SW + 170, H = 40;
    const root = svg("svg", {
      width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: "scale", role: "img",
      "aria-label": "Legend: the darker the cell, the more of the day's expectation was met, " +
        "from 0 % (palest) to 100 % (darkest); hatched grey: nothing expected that day",
    });
    const none = hatch(root);
    root.append(svg("text", { x: 0, y: 18, class: "head" }, "adherence"));
    steps.forEach((a, i) => {
      const x = 70 + i * SW;
      root.append(svg("rect", { x, y: 4, width: SW - 2, height: 20, rx: 2, fill: fill(a), class: "swatch" }));
      if (i % 5 === 0) root.append(svg("text", { x: x + (SW - 2) / 2, y: 37, "text-anchor": "middle", class: "head" }, `${a * 100} %`));
    });
    const hx = 70 + steps.length * SW + 16;
    root.append(svg("rect", { x: hx, y: 4, width: SW - 2, height: 20, rx: 2, fill: none, class: "swatch" }));
    root.append(svg("text", { x: hx + SW + 4, y: 18, class: "head" }, "nothing expected"));
    return root;
  }

  async function cohortPage(main) {
    const site = page.site;
    const path = `/sites/${enc(site)}/adherence`;
    const want = asked();
    const links = el("p", { class: "toolbar" }, link(`/sites/${enc(site)}`, "Site page"));
    main.replaceChildren(links, el("p", { class: "empty" }, "Loading…"));
    let data;
    try {
      data = await api(`/api/v1/sites/${enc(site)}/adherence${query({ from: want.from, to: want.to })}`);
    } catch (e) {
      main.replaceChildren(links, failed("the site's adherence", e), el("p", {}, link(path, "Show the last 14 days")));
      return;
    }
    const days = spanDays(data.from, data.to);
    main.dataset.from = data.from;
    main.dataset.to = data.to;
    main.replaceChildren(
      links,
      spanNav(path, data.from, data.to),
      section(`Adherence by participant and day: ${longDay(data.from)} to ${longDay(data.to)}`,
        legend(),
        heatmap(data, days),
        el("p", { class: "hint", id: "heatmap-hint" },
          "Each cell: the share of the day's expected wear time and spot checks that was met, " +
          "averaged over the metrics expected that day (days are the participant's own, in their time zone; " +
          "today counts up to now). " +
          "Select a cell for that day's detail; with the keyboard, Tab to the map, move with the arrow keys, open with Enter.")),
    );
  }

  // ---- One participant: bars per metric, one day in detail ----

  function bars(metric, days, byDay, selected, hrefOf) {
    const wide = days.length <= WIDE_DAYS;
    const BW = wide ? 44 : 20, L = 44, R = 8, T = 16, PH = 96, B = 36;
    const W = L + BW * days.length + R, H = T + PH + B;
    const name = words(metric);
    const root = svg("svg", {
      width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: "bars", id: `bars-${metric}`, role: "group",
      "aria-label": `${name}: adherence by day`,
    });
    const none = hatch(root);
    const y = (a) => T + PH * (1 - a);
    const row = [];
    days.forEach((d, j) => {
      if (d === selected) root.append(svg("rect", { x: L + j * BW, y: 0, width: BW, height: T + PH + 4, class: "selected" }));
    });
    for (const a of [0, 0.5, 1]) {
      root.append(svg("line", { x1: L, x2: W - R, y1: y(a), y2: y(a), class: a === 1 ? "grid full" : "grid" }));
      root.append(svg("text", { x: L - 6, y: y(a) + 4, "text-anchor": "end", class: "head" }, `${a * 100} %`));
    }
    days.forEach((d, j) => {
      const m = byDay.get(d);
      const a = m ? m.adherence : null;
      const x = L + j * BW;
      const label = `${name}, ${longDay(d)}: ` + (a === null ? "nothing expected" : `${pct(a)} %`);
      const bar = svg("a", {
        href: hrefOf(d), class: a === null ? "bar none" : "bar", "data-day": d, "data-row": 0, "data-col": j,
        "data-adherence": a === null ? "" : String(a), "aria-label": label,
        "aria-current": d === selected ? "date" : null,
      },
      svg("title", {}, label),
      svg("rect", { x: x + 1, y: T, width: BW - 2, height: PH, class: "hit" }));
      if (a === null) {
        bar.append(svg("rect", { x: x + 3, y: y(0) - 8, width: BW - 6, height: 8, fill: none, class: "nothing" }));
      } else {
        const h = Math.max(2, PH * Math.min(1, a));
        bar.append(svg("rect", { x: x + 3, y: y(0) - h, width: BW - 6, height: h, class: "value" }));
        if (wide) {
          bar.append(svg("text", { x: x + BW / 2, y: Math.max(T - 2, y(0) - h - 4), "text-anchor": "middle", class: "pct-above" },
            String(pct(a))));
        }
      }
      row.push(bar);
      root.append(bar);
    });
    dayHeads(root, days, L, BW, T + PH + 16, wide);
    const start = row[Math.max(0, days.indexOf(selected))] || row[row.length - 1];
    rove(root, [row], start);
    return root;
  }

  function doneOf(m) {
    if (m.kind === "continuous") {
      const exp = m.expected_minutes;
      return exp === null
        ? `${hours(m.worn_minutes)} worn; nothing expected`
        : `${hours(m.worn_minutes)} of ${hours(exp)} worn (${minutes(m.worn_minutes)} of ${minutes(exp)})`;
    }
    const usable = m.readings - m.invalid;
    if (m.kind === "spot") {
      return m.expected_count === null
        ? `${usable} spot ${usable === 1 ? "check" : "checks"}; nothing expected`
        : `${usable} of ${m.expected_count} spot checks`;
    }
    return `${m.readings} ${m.readings === 1 ? "reading" : "readings"}; nothing expected`;
  }

  const KINDS = { continuous: "worn continuously", spot: "spot checks" };

  function dayTables(detail) {
    const metrics = table("Metrics",
      ["Metric", "Schedule", "Done of expected", "Adherence", "Invalid readings", "Completeness"],
      detail.metrics.map((m) => el("tr", { class: "metric-row", "data-metric": m.metric },
        el("th", { scope: "row" }, words(m.metric)),
        el("td", {}, KINDS[m.kind] || "nothing expected"),
        el("td", { class: "done" }, doneOf(m)),
        el("td", { class: "adherence" }, pctText(m.adherence)),
        el("td", { class: "invalid" }, `${m.invalid} of ${m.readings}`),
        el("td", { class: "completeness" }, m.completeness === null ? "—" : pctText(m.completeness)))),
      "Nothing was expected and nothing arrived on this day.");
    const gaps = table("Gaps the hub reported",
      ["Wearable", "Reason", "Minutes of the day"],
      detail.gaps.map((g) => el("tr", { class: "gap-row", "data-reason": g.reason },
        el("td", {}, g.sensor === null ? "the whole hub" : g.sensor),
        el("td", {}, words(g.reason)),
        el("td", {}, minutes(g.minutes)))),
      "The hub reported no gaps on this day.");
    return [metrics, gaps];
  }

  async function participantPage(main) {
    const pid = page.participant;
    const path = `/participants/${enc(pid)}/adherence`;
    const base = `/api/v1/participants/${enc(pid)}/adherence`;
    const want = asked();
    let { from, to } = want;
    // A day asked for alone: the two weeks up to it.
    if (want.day && DATE.test(want.day) && !from && !to) [from, to] = [addDays(want.day, -13), want.day];
    const links = el("p", { class: "toolbar" }, link(`/participants/${enc(pid)}`, "Participant page"));
    if (["clinician", "monitor", "admin"].includes(page.role)) {
      links.append(" · ", link(`/participants/${enc(pid)}/live`, "Live view"));
    }
    links.append(" · ", link(`/sites/${enc(page.site)}/adherence${query({ from, to })}`, "Site adherence"));
    main.replaceChildren(links, el("p", { class: "empty" }, "Loading…"));
    let data;
    try {
      data = await api(base + query({ from, to }));
    } catch (e) {
      main.replaceChildren(links, failed("the participant's adherence", e), el("p", {}, link(path, "Show the last 14 days")));
      return;
    }
    const days = spanDays(data.from, data.to);
    const day = want.day || data.to;
    main.dataset.from = data.from;
    main.dataset.to = data.to;
    main.dataset.day = day;
    const hrefOf = (d) => path + query({ day: d, from: data.from, to: data.to });
    // Each metric seen in the span, in the API's order, with its days.
    const perMetric = new Map();
    for (const d of data.days) {
      for (const m of d.metrics) {
        if (!perMetric.has(m.metric)) perMetric.set(m.metric, new Map());
        perMetric.get(m.metric).set(d.day, m);
      }
    }
    const charts = [...perMetric].map(([metric, byDay]) => {
      const kinds = [...byDay.values()].map((m) => m.kind).filter(Boolean);
      const kind = kinds.length ? KINDS[kinds[kinds.length - 1]] : "nothing expected";
      return el("div", { class: "metric-bars", id: `metric-${metric}` },
        el("h3", {}, `${words(metric)} (${kind})`),
        el("div", { class: "scroll-x" }, bars(metric, days, byDay, day, hrefOf)));
    });
    const inSpan = (d) => d >= data.from && d <= data.to;
    const dayLink = (d, text, id) => el("a", {
      id, href: path + (inSpan(d) ? query({ day: d, from: data.from, to: data.to }) : query({ day: d })),
    }, text);
    const detail = el("div", { id: "day-detail" }, el("p", { class: "empty" }, "Loading…"));
    main.replaceChildren(
      links,
      spanNav(path, data.from, data.to),
      section(`Daily adherence: ${longDay(data.from)} to ${longDay(data.to)}`,
        el("p", { class: "hint" },
          "Each bar: the share of the day's expectation met (the top line is 100 %); hatched: nothing expected. " +
          "Select a bar for that day's detail below."),
        charts.length ? charts : el("p", { class: "empty" }, "Nothing was expected and nothing arrived in this span.")),
      section(`Day: ${DATE.test(day) ? longDay(day) : day}`,
        el("p", { class: "toolbar" }, dayLink(DATE.test(day) ? addDays(day, -1) : data.to, "← Previous day", "day-previous"),
          DATE.test(day) ? dayLink(addDays(day, 1), "Next day →", "day-next") : null),
        detail),
    );
    try {
      const got = await api(`${base}/${enc(day)}`);
      detail.replaceChildren(...dayTables(got));
      detail.dataset.loaded = got.day;
    } catch (e) {
      detail.replaceChildren(failed("this day's detail", e));
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    const main = document.getElementById("main");
    const show = page.page === "site-adherence" ? cohortPage : participantPage;
    session().then(() => show(main)).catch((e) => main.replaceChildren(failed("the page", e)));
  });
})();
