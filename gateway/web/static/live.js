"use strict";
// A clinician's live view of one participant: each metric over the last minutes, the last
// days from hourly rollups, gaps drawn as gaps, and each wearable's battery and last contact.
// The last minutes come over one server-sent event stream: the window whole ("window", again
// every minute, with the hubs' reported gaps), then what the gateway stores as it arrives
// ("readings"), merged here with repeats dropped. The browser reconnects a dropped stream,
// and a reconnected stream starts with the window whole.
// Readings the device itself doubted are marked by shape as well as colour: a hollow circle
// on the line for a questionable one, a cross off the line for an invalid one; each panel
// lists the readings the device said something about, with the flags in words.
// The participant's data queries are listed after the charts (the toolbar counts the open and
// answered ones and links to them), with the steps the user's role may take on each; a
// monitor (or admin) opens one on a metric's range as its chart shows it.
(() => {
  const { el, api, session, time, clock, ago, section, table, status } = TS;
  const SVG = "http://www.w3.org/2000/svg";
  const MINUTES = 10;
  const SCROLL_MS = 2000;
  // Rows of a panel's list of what the devices said, newest first.
  const SAID_ROWS = 20;
  const DOUBT = { invalid: "×", questionable: "○" };
  const pid = document.body.dataset.participant;
  const base = `/api/v1/participants/${encodeURIComponent(pid)}`;
  const QUERIES_MS = 30000;
  let asks = false; // whether this user may open a data query (monitor, admin)
  let queries = null; // the data queries card (TS.queriesCard)
  const panels = new Map();
  const held = new Map(); // metric -> Map(key -> point), the window's readings
  let gaps = [];
  let zones = []; // the participant's time zones: times are shown in theirs, beside UTC

  function svg(tag, attrs) {
    const n = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, String(v));
    return n;
  }

  // Split a series where readings are further apart than the usual spacing allows, or where
  // a hub reported a gap: no line is drawn across missing data.
  function segments(points, gaps) {
    if (!points.length) return [];
    const steps = points.slice(1).map((p, i) => p.t - points[i].t).sort((a, b) => a - b);
    const usual = steps.length ? steps[Math.floor(steps.length / 2)] : 1000;
    const limit = Math.max(5000, usual * 3);
    const out = [[points[0]]];
    for (let i = 1; i < points.length; i++) {
      const a = points[i - 1], b = points[i];
      const reported = gaps.some((g) => g.from < b.t && g.to > a.t);
      if (b.t - a.t > limit || reported) out.push([]);
      out[out.length - 1].push(b);
    }
    return out;
  }

  const words = (flags) => flags.map((f) => f.replaceAll("_", " ")).join(", ");
  const doubted = (p) => Object.hasOwn(DOUBT, p.quality);

  // A reading's class as a badge: its mark's shape, then the class in words.
  function badge(quality) {
    return el("span", { class: `badge quality-${quality}` },
      el("span", { "aria-hidden": "true" }, `${DOUBT[quality]} `), quality);
  }

  // What the device said about a reading: a badge when it doubted it, then its flags in
  // words (context alone, such as the measurement site, is plain text).
  function said(p) {
    if (!p.flags.length) return null;
    return el("span", { class: "said", "data-quality": p.quality },
      doubted(p) ? [badge(p.quality), " "] : null, words(p.flags));
  }

  // A doubted reading's mark on the chart, with its tooltip.
  function mark(p, cx, cy) {
    const g = svg("g", { class: `mark mark-${p.quality}`, "data-t": p.t });
    if (p.quality === "invalid") {
      g.append(svg("path", { d: `M${cx - 4},${cy - 4}L${cx + 4},${cy + 4}M${cx - 4},${cy + 4}L${cx + 4},${cy - 4}` }));
    } else {
      g.append(svg("circle", { cx, cy, r: 4 }));
    }
    const t = svg("title", {});
    t.textContent = `${clock(p.t, zones)}: ${p.v} ${p.unit}, ${p.quality} (${words(p.flags)})`;
    g.append(t);
    return g;
  }

  function chart(points, gaps, from, to, label, band) {
    const W = 640, H = 160, P = 28;
    // An invalid reading is not a measurement of the participant: not joined to the line,
    // and not stretching the scale (its mark sits at the edge when it lies outside).
    const joined = band ? points : points.filter((p) => p.quality !== "invalid");
    const scaled = joined.length ? joined : points;
    const values = scaled.flatMap((p) => (band ? [p.min, p.max] : [p.v]));
    let lo = Math.min(...values), hi = Math.max(...values);
    if (!isFinite(lo)) { lo = 0; hi = 1; }
    if (hi - lo < 1) { hi += 0.5; lo -= 0.5; }
    const x = (t) => P + ((t - from) / (to - from)) * (W - 2 * P);
    const y = (v) => H - P - ((v - lo) / (hi - lo)) * (H - 2 * P);
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": label, class: "chart" });
    root.append(svg("rect", { x: P, y: P / 2, width: W - 2 * P, height: H - 1.5 * P, class: "plot" }));
    for (const g of gaps) {
      const gx = Math.max(P, x(g.from)), gw = Math.min(W - P, x(g.to)) - gx;
      if (gw > 0) {
        const r = svg("rect", { x: gx, y: P / 2, width: gw, height: H - 1.5 * P, class: "gap" });
        const t = svg("title", {});
        t.textContent = `no data: ${g.reason}`;
        r.append(t);
        root.append(r);
      }
    }
    for (const seg of segments(joined, gaps)) {
      if (band) {
        const up = seg.map((p) => `${x(p.t)},${y(p.max)}`);
        const down = seg.slice().reverse().map((p) => `${x(p.t)},${y(p.min)}`);
        root.append(svg("polygon", { points: up.concat(down).join(" "), class: "band" }));
      }
      const line = seg.map((p) => `${x(p.t)},${y(band ? p.mean : p.v)}`).join(" ");
      if (seg.length === 1) root.append(svg("circle", { cx: x(seg[0].t), cy: y(band ? seg[0].mean : seg[0].v), r: 2.5, class: "dot" }));
      else root.append(svg("polyline", { points: line, class: "line" }));
    }
    const inPlot = (v) => Math.min(H - P, Math.max(P / 2, y(v)));
    if (!band) for (const p of points) if (doubted(p)) root.append(mark(p, x(p.t), inPlot(p.v)));
    const axis = (text, ax, ay, anchor) => {
      const t = svg("text", { x: ax, y: ay, "text-anchor": anchor, class: "axis" });
      t.textContent = text;
      root.append(t);
    };
    axis(hi.toFixed(0), P - 4, P / 2 + 10, "end");
    axis(lo.toFixed(0), P - 4, H - P, "end");
    // A span of more than a day names the day too: two days apart, the clock times are equal.
    const when = (t) => (to - from > 86400000
      ? new Date(t).toLocaleString(undefined, { dateStyle: "short", timeStyle: "short" })
      : new Date(t).toLocaleTimeString());
    axis(when(from), P, H - 6, "start");
    axis(when(to), W - P, H - 6, "end");
    return root;
  }

  function panel(metric) {
    if (!panels.has(metric)) {
      const latest = el("p", { class: "latest", id: `latest-${metric}`, "aria-live": "polite" }, "—");
      const live = el("div", { class: "live-chart", id: `live-${metric}` });
      const days = el("div", { class: "days-chart", id: `days-${metric}` });
      const notes = el("div", { class: "device-said", id: `said-${metric}` });
      // The two charts side by side on a wide screen (both on the first screen at 1366x768),
      // one above the other on a narrow one; what the devices said below them.
      const card = section(metric.replace(/_/g, " "), latest,
        el("div", { class: "metric-charts" },
          el("div", {}, el("h3", {}, `Last ${MINUTES} minutes`), live, asks ? askForm(metric) : null),
          el("div", {}, el("h3", {}, "Last 2 days (hourly)"), days)),
        notes);
      card.id = `metric-${metric}`;
      document.getElementById("metrics").append(card);
      panels.set(metric, { latest, live, days, notes });
    }
    return panels.get(metric);
  }

  // The window ends at the server's clock of the last event, moved on by the time passed
  // here since, so the charts keep scrolling while nothing arrives.
  let serverTo = null, heardAt = 0;

  // The span the live charts show now.
  function shownRange() {
    const to = serverTo === null ? Date.now() : serverTo + (Date.now() - heardAt);
    return { from: to - MINUTES * 60000, to };
  }

  // A monitor asks the site about a metric over the range its chart showed when the form
  // was opened (target "range", docs/queries.md).
  function askForm(metric) {
    const id = `ask-${metric}`;
    const words = metric.replace(/_/g, " ");
    const range = el("p", { class: "hint", id: `${id}-range` });
    const text = el("textarea", { id: `${id}-text`, rows: "2", maxlength: "4000", required: true,
      "aria-describedby": `${id}-range` });
    const error = el("p", { class: "error", id: `${id}-error`, role: "alert" });
    const form = el("form", { class: "ask", id, "data-metric": metric, novalidate: true },
      el("label", { for: `${id}-text` }, `Question about ${words}`), text, range, error,
      el("button", { type: "submit" }, "Open query"));
    const box = el("details", { class: "ask-box" }, el("summary", {}, "Ask the site about this range"), form);
    let span = null;
    const fix = () => {
      span = shownRange();
      range.textContent = `About ${words} from ${time(span.from)} to ${time(span.to)}: the chart as it was when this form opened.`;
    };
    box.addEventListener("toggle", () => {
      if (box.open) fix();
    });
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      error.textContent = "";
      const question = text.value.trim();
      if (!question) {
        error.textContent = "Write the question for the site.";
        text.focus();
        return;
      }
      if (!span) fix();
      try {
        const q = await api(`${base}/queries`, { method: "POST", body: {
          target: "range", metric, from: new Date(span.from).toISOString(),
          to: new Date(span.to).toISOString(), text: question,
        } });
        status(`Query ${q.query_id} opened on ${words}.`);
        text.value = "";
        box.open = false;
        await queries.refresh(false);
      } catch (e) {
        error.textContent = `Not opened: ${e.message}`;
        text.focus();
      }
    });
    return box;
  }

  // The toolbar's count of the open and answered queries, a link to the card.
  function countQueries(list) {
    const open = list.filter((q) => q.state === "open").length;
    const answered = list.filter((q) => q.state === "answered").length;
    const parts = [open ? `${open} open` : null, answered ? `${answered} answered` : null].filter(Boolean);
    document.getElementById("queries-summary").textContent =
      `Data queries: ${parts.length ? parts.join(", ") : "none open"}`;
  }

  function merge(data, whole) {
    serverTo = Date.parse(data.to);
    heardAt = Date.now();
    if (whole) {
      held.clear();
      gaps = data.gaps.map((g) => ({ from: g.from, to: g.to, reason: g.reason }));
    }
    for (const r of data.readings) {
      const wearable = `${r.device_id}|${r.sensor}`;
      streamSeen.set(wearable, Math.max(streamSeen.get(wearable) || 0, r.t));
      if (!held.has(r.metric)) held.set(r.metric, new Map());
      held.get(r.metric).set(`${r.t}|${r.device_id}|${r.sensor}`, {
        t: r.t, v: r.value, unit: r.unit, sensor: r.sensor,
        flags: r.flags, quality: r.quality, user: r.device_user,
      });
    }
    render();
    document.getElementById("updated").textContent = `Updated ${new Date().toLocaleTimeString()}`;
  }

  function render() {
    drawDevices();
    if (serverTo === null) return;
    const to = serverTo + (Date.now() - heardAt), from = to - MINUTES * 60000;
    for (const [metric, byKey] of held) {
      for (const [k, p] of byKey) if (p.t < from) byKey.delete(k);
      const points = [...byKey.values()].sort((a, b) => a.t - b.t);
      if (!points.length) continue;
      const p = panel(metric);
      const last = points[points.length - 1];
      const lastSaid = said(last);
      p.latest.replaceChildren(`${last.v} ${last.unit} at ${clock(last.t, zones)}`,
        ...(lastSaid ? [" ", lastSaid] : []));
      p.latest.dataset.value = String(last.v);
      p.live.dataset.count = String(points.length);
      p.live.replaceChildren(chart(points, gaps, from, to, `${metric}, last ${MINUTES} minutes`, false));
      p.notes.replaceChildren(...deviceSaid(points));
    }
  }

  // The window's readings the device said something about, newest first, and what the
  // chart's marks mean when it has any.
  function deviceSaid(points) {
    const flagged = points.filter((p) => p.flags.length).reverse();
    if (!flagged.length) return [];
    const shown = flagged.slice(0, SAID_ROWS);
    const rows = shown.map((p) => el("tr", { class: `said-row quality-${p.quality}`, "data-t": p.t },
      el("td", {}, clock(p.t, zones)), el("td", {}, `${p.v} ${p.unit}`),
      el("td", {}, p.sensor), el("td", {}, p.user === null ? "—" : String(p.user)),
      el("td", {}, said(p))));
    const out = [table("What the device said", ["Measured", "Value", "Wearable", "Device user", "Flags"], rows)];
    if (flagged.length > shown.length) {
      out.push(el("p", { class: "hint" }, `The newest ${shown.length} of ${flagged.length}.`));
    }
    if (flagged.some(doubted)) {
      out.unshift(el("p", { class: "legend" }, "On the chart: ", badge("questionable"),
        " the device doubted the reading; ", badge("invalid"),
        " the device says it is not a measurement (not joined to the line)."));
    }
    return out;
  }

  function follow() {
    const state = document.getElementById("live-state");
    const source = new EventSource(`/api/v1/participants/${encodeURIComponent(pid)}/readings/live?minutes=${MINUTES}`);
    source.onopen = () => {
      state.textContent = "Live";
      state.className = "live on";
    };
    source.onerror = () => {
      state.textContent = "Reconnecting…";
      state.className = "live off";
    };
    source.addEventListener("window", (m) => merge(JSON.parse(m.data), true));
    source.addEventListener("readings", (m) => merge(JSON.parse(m.data), false));
    TS.warnBeforeIdleEnd(source);
    source.addEventListener("signed-out", () => {
      source.close();
      location.assign("/login?next=" + encodeURIComponent(location.pathname));
    });
    source.addEventListener("forbidden", () => {
      source.close();
      state.textContent = "Not allowed";
      state.className = "live off";
      status("You may no longer see this participant.");
    });
  }

  async function refreshDays() {
    const data = await api(`/api/v1/participants/${encodeURIComponent(pid)}/rollups?days=2`);
    const from = Date.parse(data.from), to = Date.now();
    const by = new Map();
    for (const b of data.buckets) {
      if (!by.has(b.metric)) by.set(b.metric, []);
      by.get(b.metric).push({ t: b.bucket, mean: b.mean, min: b.min, max: b.max });
    }
    for (const [metric, points] of by) {
      panel(metric).days.replaceChildren(chart(points, [], from, to, `${metric}, hourly, last 2 days`, true));
    }
  }

  // Each wearable's newest reading seen on the stream (hub|sensor -> ms): "last seen" moves
  // with the readings as they arrive, between two reads of the participant.
  const streamSeen = new Map();
  let devices = null; // the participant's hubs and wearables, as last read

  function drawDevices() {
    if (devices === null) return;
    const lastSeen = (d, s) => {
      const t = Math.max(s.last_seen ? Date.parse(s.last_seen) : 0, streamSeen.get(`${d.device_id}|${s.sensor}`) || 0);
      return t ? ago(new Date(t).toISOString()) : "no reading in 30 days";
    };
    // The hub with when its last envelope arrived: the hub's contact, not a wearable's.
    const hub = (d) => [d.device_id, el("div", { class: "hint" }, `last envelope ${ago(d.last_received)}`)];
    const rows = devices.flatMap((d) =>
      d.sensors.length
        ? d.sensors.map((s) => [hub(d), s.sensor, s.model || "—",
            s.battery_level === null ? "—" : `${s.battery_level} %`, lastSeen(d, s),
            s.last_report ? ago(s.last_report) : "—"])
        : [[hub(d), "—", "—", "—", "—", "—"]],
    );
    document.getElementById("devices").replaceChildren(
      table("Wearables",
        ["Hub", "Wearable", "Model", "Battery", "Last seen (last reading)", "Hub's last report"],
        rows, "No devices paired."),
    );
  }

  async function refreshDevices() {
    const data = await api(base);
    zones = data.time_zones;
    devices = data.devices;
    drawDevices();
  }

  async function loop(fn, every) {
    for (;;) {
      try {
        await fn();
      } catch (e) {
        status(e.message);
      }
      await new Promise((r) => setTimeout(r, every));
    }
  }

  async function start() {
    const user = await session();
    asks = user.role === "monitor" || user.role === "admin";
    // After the charts, so that it never pushes them down; closed queries folded away.
    queries = TS.queriesCard({ id: "queries", role: user.role, url: `${base}/queries?state=all`,
      drawn: countQueries });
    document.getElementById("main").replaceChildren(
      el("p", { class: "toolbar" }, el("a", { href: `/participants/${encodeURIComponent(pid)}` }, "Participant page"),
        " · ", el("a", { href: "#queries", id: "queries-summary" }, "Data queries"),
        " · ", el("span", { id: "live-state", class: "live off" }, "Connecting…"),
        " · ", el("span", { id: "updated" }, "")),
      el("div", { id: "devices", class: "card" }),
      el("div", { id: "metrics" }),
      queries.node,
    );
    follow();
    setInterval(render, SCROLL_MS);
    loop(refreshDays, 60000);
    loop(refreshDevices, 10000);
    loop(() => queries.refresh(true), QUERIES_MS);
  }

  document.addEventListener("DOMContentLoaded", () => start().catch((e) => status(e.message)));
})();
