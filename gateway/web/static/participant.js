"use strict";
// One participant: paired hubs and wearables, what the hubs sent and what the gateway
// received or refused (and why), and the consent history.
(() => {
  const { el, api, session, time, ago, section, table, link, status } = TS;
  const pid = document.body.dataset.participant;
  const role = document.body.dataset.role;

  async function load() {
    const d = await api(`/api/v1/participants/${encodeURIComponent(pid)}`);
    const p = d.participant;
    const devices = table("Paired devices",
      ["Hub", "Wearable", "Model", "Battery", "Last seen", "Envelopes", "Readings stored", "Refused"],
      d.devices.flatMap((x) => (x.sensors.length ? x.sensors : [null]).map((s) => [
        x.device_id + (x.revoked_at ? " (revoked)" : ""),
        s ? s.sensor : "—", s && s.model ? s.model : "—",
        s && s.battery_level !== null ? `${s.battery_level} %` : "—",
        ago(s ? s.last_seen : x.last_received), String(x.envelopes),
        String(x.readings_stored), String(x.readings_refused)])),
      "No devices paired yet.");
    const sent = table("Sent and received",
      ["Hub", "Seq", "Sent", "Received", "Readings", "Stored", "Refused"],
      d.envelopes.map((e) => [e.device_id, String(e.seq), time(e.sent_at), time(e.received_at),
        String(e.readings), String(e.stored), String(e.refused)]),
      "Nothing received yet.");
    const refused = table("Refused",
      ["Received", "Hub", "Seq", "Reason", "Metric", "Readings"],
      d.rejections.map((r) => [time(r.received_at), r.device_id || "—",
        r.seq === null ? "—" : String(r.seq), r.reason, r.metric || "—", String(r.readings)]),
      "Nothing refused.");
    const consents = table("Consent history",
      ["Version", "Action", "Scopes", "Signed by", "Signed", "In force from", "Until"],
      d.consents.map((c) => [c.version, c.action, c.scopes.join(", "), c.signer_name || c.recorded_by,
        time(c.signed_at), time(c.valid_from), c.valid_to ? time(c.valid_to) : "now"]),
      "No consent recorded.");
    const head = [`Site ${p.site_id}`, `study ${p.study_id}`, `enrolled ${time(p.enrolled_at)}`];
    const links = [];
    if (["clinician", "monitor", "admin"].includes(role)) {
      links.push(" · ", link(`/participants/${encodeURIComponent(pid)}/live`, "Live view"));
    }
    if (role !== "participant") {
      links.push(" · ", link(`/sites/${encodeURIComponent(p.site_id)}`, "Site page"));
    }
    document.getElementById("main").replaceChildren(
      el("p", { class: "lead" }, head.join(" · "), ...links),
      section("Devices", devices),
      section("What was sent and received", sent, refused),
      section("Consent", consents),
    );
  }

  document.addEventListener("DOMContentLoaded", () =>
    session().then(load).catch((e) => status(e.message)));
})();
