"use strict";
// One participant: the consent documents to read and sign, paired hubs and wearables, what
// the hubs sent and what the gateway received or refused (and why), the consent history, and
// for staff the participant's data queries, with the steps the user's role may take on each
// (the site answers, a monitor closes and reopens), and the review sign-offs of the
// participant's data with the study's locks in force (the site's investigator and monitors
// sign off from here).
(() => {
  const { el, api, session, time, ago, section, table, link, field, localIso, status } = TS;
  const pid = document.body.dataset.participant;
  const role = document.body.dataset.role;
  // Who may record a signature here (the participant, or site staff signing in clinic).
  const signs = ["participant", "site_coordinator", "admin"].includes(role);
  let me = null;
  const base = `/api/v1/participants/${encodeURIComponent(pid)}`;
  // Staff see the participant's data queries (a participant sees none).
  const queries = role === "participant" ? null
    : TS.queriesCard({ id: "data-queries", role, url: `${base}/queries?state=all` });

  const SCOPE_NAMES = {
    heart_rate: "Heart rate",
    temperature: "Body temperature",
    blood_pressure: "Blood pressure",
    spo2: "Blood oxygen (SpO2)",
    glucose: "Blood glucose",
    weight: "Weight and body composition",
  };
  const scopeName = (s) => SCOPE_NAMES[s] || s.replaceAll("_", " ");

  // Problem types of the sign endpoint -> the field they are about and what to tell the signer.
  const SIGN_ERRORS = {
    "reauthentication-failed": ["password",
      "The password was not accepted, so nothing was signed. Check it and try again " +
      "(after 5 wrong tries in a row the account is locked for 15 minutes)."],
    "already-signed": [null, "This version is already signed with exactly these choices."],
    "invalid-scopes": ["scopes", "These choices cannot be signed: "],
    "witness-required": ["witness", "This study needs a witness: enter the witness's name."],
    "superseded-version": [null, "A newer version of this document is now in effect: reload the page to read it."],
  };

  function signingState(doc) {
    if (doc.signed) {
      return el("p", { class: "ok" },
        `Signed. Sharing: ${doc.signed_scopes.map(scopeName).join(", ") || "nothing"}.`);
    }
    if (doc.reconsent_by) {
      return el("p", { class: doc.overdue ? "error" : "warn" },
        `This new version must be signed by ${time(doc.reconsent_by)}` +
        (doc.overdue ? ": the deadline has passed, and data is not being stored until it is signed." : "."));
    }
    return el("p", {}, "Not signed yet.");
  }

  function signingForm(doc, witnessRequired) {
    const key = doc.document_id;
    const ids = {
      name: `sign-name-${key}`, username: `sign-username-${key}`, password: `sign-password-${key}`,
      witness: `sign-witness-${key}`, scopes: `sign-scopes-${key}`, error: `sign-error-${key}`,
    };
    const boxes = doc.scopes.map((s) => {
      const optional = doc.optional_scopes.includes(s);
      const id = `sign-scope-${key}-${s}`;
      return el("div", { class: "check" },
        el("input", {
          type: "checkbox", id, value: s,
          checked: !optional || (doc.signed ? doc.signed_scopes.includes(s) : false),
          disabled: !optional,
        }),
        el("label", { for: id }, scopeName(s), optional ? " (optional: you may leave this out)" : " (required)"));
    });
    const error = el("p", { id: ids.error, class: "error", role: "alert", tabindex: "-1" });
    const scopes = el("fieldset", { id: ids.scopes }, el("legend", {}, "What you agree to share"), boxes);
    const participantSigns = role === "participant";
    const form = el("form", { class: "sign", id: `sign-${key}`, novalidate: true },
      scopes,
      field(ids.name, "Printed name", { autocomplete: "name", maxlength: "200", required: true },
        "Type your full name as your signature."),
      field(ids.username, participantSigns ? "User name" : "The participant's user name", {
        autocomplete: participantSigns ? "username" : "off", maxlength: "128", required: true,
        value: participantSigns && me ? me.username : null, readonly: participantSigns,
      }),
      field(ids.password, participantSigns ? "Your password" : "The participant's password", {
        type: "password", autocomplete: participantSigns ? "current-password" : "off",
        maxlength: "1024", required: true,
      }, "Entering the password again confirms that this signature is yours."),
      witnessRequired ? field(ids.witness, "Witness", { maxlength: "200", required: true }) : null,
      error,
      el("button", { type: "submit" }, doc.signed ? `Sign version ${doc.version} again with these choices` : `Sign version ${doc.version}`));

    const inputs = (n) => document.getElementById(ids[n]);
    function showError(where, text) {
      error.textContent = text;
      const target = where ? inputs(where) : null;
      if (target) {
        target.setAttribute("aria-invalid", "true");
        target.setAttribute("aria-describedby", [target.getAttribute("aria-describedby"), ids.error].filter(Boolean).join(" "));
        if (where === "password") target.value = "";
        (where === "scopes" ? target.querySelector("input:not([disabled])") || error : target).focus();
      } else {
        error.focus();
      }
    }
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      error.textContent = "";
      for (const n of ["name", "username", "password", "witness", "scopes"]) {
        const node = inputs(n);
        if (node) node.removeAttribute("aria-invalid");
      }
      const name = inputs("name").value.trim();
      const username = inputs("username").value.trim();
      const password = inputs("password").value;
      const witness = witnessRequired ? inputs("witness").value.trim() : "";
      if (!name) return showError("name", "Type your printed name to sign.");
      if (!username) return showError("username", "Enter the participant's user name.");
      if (!password) return showError("password", "Enter the password to sign.");
      if (witnessRequired && !witness) return showError("witness", "Enter the witness's name.");
      const chosen = [...form.querySelectorAll("fieldset input[type=checkbox]")]
        .filter((b) => b.checked).map((b) => b.value);
      const body = { document_id: key, scopes: chosen, printed_name: name, username, password };
      if (witnessRequired) body.witness = witness;
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      try {
        const rec = await api(`/api/v1/participants/${encodeURIComponent(pid)}/consents`,
          { method: "POST", body });
        status(`Consent signed: version ${rec.version}.`);
        await load(`Signed version ${rec.version} on ${time(rec.effective_at)}. ` +
          `Sharing: ${rec.scopes.map(scopeName).join(", ")}.`);
      } catch (e) {
        button.disabled = false;
        const kind = e.problem && e.problem.type ? e.problem.type.split("/").pop() : "";
        const known = SIGN_ERRORS[kind];
        if (known) {
          showError(known[0], known[0] === "scopes" ? known[1] + e.message : known[1]);
        } else if (kind === "invalid-field" && e.problem.field) {
          const f = { printed_name: "name", username: "username", password: "password", witness: "witness", scopes: "scopes" }[e.problem.field];
          showError(f || null, `Not signed: ${e.message}`);
        } else {
          showError(null, `Not signed: ${e.message}`);
        }
      }
    });
    return form;
  }

  // How a participant's request to withdraw reached the staff member who records it; or the
  // site's own decision.
  const RECEIVED = [
    ["in_person", "The participant asked in person"],
    ["phone", "The participant asked by phone"],
    ["video_visit", "The participant asked during a video visit"],
    ["letter", "The participant asked by letter"],
    ["email", "The participant asked by email"],
    ["site", "The site decided (not the participant's request)"],
  ];

  // Withdrawal is an e-signed act: whoever records it enters their own password again.
  function withdrawalForm() {
    const own = role === "participant";
    const error = el("p", { class: "error", id: "withdraw-error", role: "alert", tabindex: "-1" });
    const how = own ? null : el("select", { id: "withdraw-how", required: true },
      el("option", { value: "" }, "Choose…"), RECEIVED.map(([v, text]) => el("option", { value: v }, text)));
    const reason = own ? null : el("input", { id: "withdraw-reason", type: "text", maxlength: "500", required: true });
    const password = el("input", { id: "withdraw-password", type: "password", required: true,
      autocomplete: "current-password" });
    const kept = "Readings already stored are kept or deleted as the consent document says.";
    const form = el("form", { class: "withdraw", id: "withdraw", novalidate: true },
      el("p", {}, own
        ? "Withdrawing ends all data collection from now on. " + kept
        : "Record a withdrawal for this participant: data collection ends from now on. " + kept),
      how ? el("p", {}, el("label", { for: "withdraw-how" }, "How the withdrawal came "), how) : null,
      reason ? el("p", {}, el("label", { for: "withdraw-reason" }, "Reason "), reason) : null,
      el("p", {}, el("label", { for: "withdraw-password" }, `Your password (${me.username}) `), password,
        el("span", { class: "hint" }, " Entering your password again signs this withdrawal.")),
      error,
      el("button", { type: "submit", class: "danger" }, own ? "Withdraw my consent" : "Record the withdrawal"));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      error.textContent = "";
      if (how && !how.value) { error.textContent = "Choose how the withdrawal came."; return how.focus(); }
      if (reason && !reason.value.trim()) { error.textContent = "Give the reason."; return reason.focus(); }
      if (!password.value) { error.textContent = "Enter your password to sign."; return password.focus(); }
      const body = { username: me.username, password: password.value,
        initiated_by: own || how.value !== "site" ? "participant" : "site" };
      if (!own) body.reason = reason.value.trim();
      if (how && how.value !== "site") body.received_via = how.value;
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      try {
        const w = await api(`/api/v1/participants/${encodeURIComponent(pid)}/withdrawals`,
          { method: "POST", body });
        status("Consent withdrawn.");
        await load(`Consent withdrawn on ${time(w.effective_at)}: no data is collected from now on.`);
      } catch (e) {
        button.disabled = false;
        password.value = "";
        error.textContent = `Not withdrawn: ${e.message}`;
        error.focus();
      }
    });
    return form;
  }

  function documentBlock(doc, witnessRequired) {
    const headingId = `doc-${doc.document_id}`;
    const text = doc.text !== null
      ? el("div", {
        class: "document", id: `doc-text-${doc.document_id}`, tabindex: "0", role: "region",
        "aria-label": `${doc.title}, version ${doc.version}`,
      }, doc.text)
      : el("p", {}, link(doc.uri, `Read ${doc.title}, version ${doc.version}`));
    return el("article", { class: "consent-document", "aria-labelledby": headingId, "data-document-id": doc.document_id },
      el("h3", { id: headingId }, `${doc.title}, version ${doc.version} (${doc.language})`),
      el("p", { class: "lead" }, `In effect since ${time(doc.effective_at)}.`),
      signingState(doc),
      text,
      !signs ? null : doc.signed
        ? el("details", {}, el("summary", {}, "Change what you share (sign this version again)"),
          signingForm(doc, witnessRequired))
        : signingForm(doc, witnessRequired));
  }

  // --- Review sign-offs (docs/review.md) --------------------------------------------------
  // Who may sign off a participant's review: api_review.SIGNERS (the site's investigator, a
  // clinician, and its monitors). Admins and coordinators see the list only.
  const REVIEW_SIGNERS = ["clinician", "monitor"];
  const REVIEW_MEANING_MAX = 200;
  const ROLE_WORDS = { clinician: "investigator (clinician)", monitor: "monitor", admin: "admin",
    site_coordinator: "site coordinator" };

  const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;

  // What was stored for a sign-off's period after it was signed, in words.
  function changesText(r) {
    const n = r.changes.reduce((a, c) => a + c.readings, 0);
    const each = r.changes.map((c) =>
      `hub ${c.device_id} envelope ${c.seq}: ${plural(c.readings, "reading", "readings")} of ` +
      `${time(c.first_time)} to ${time(c.last_time)}, stored ${time(c.recorded_at)}`);
    return `OUTDATED since ${time(r.outdated_at)}: ${plural(n, "reading", "readings")} ` +
      `stored later for this period${each.length ? ` (${each.join("; ")})` : ""}. ` +
      "Review what changed and sign off again.";
  }

  function reviewRow(r) {
    const outdated = r.outdated_at !== null;
    return el("tr", { class: outdated ? "review outdated" : "review current",
      "data-signoff-id": r.signoff_id, "data-state": outdated ? "outdated" : "current" },
      el("td", {}, `${time(r.from)} to ${time(r.to)}`),
      el("td", {}, `${r.signer_name} (${r.signer}, ${ROLE_WORDS[r.signer_role] || r.signer_role})`),
      el("td", {}, r.meaning),
      el("td", {}, time(r.signed_at)),
      el("td", {}, String(r.readings)),
      el("td", { class: "review-state" }, outdated
        ? el("strong", { class: "badge-outdated" }, changesText(r))
        : "Current: no data stored for the period since the signature."));
  }

  function locksBlock(got) {
    if (got.error) {
      return el("p", { class: "error" }, `The study's locks could not be read: ${got.error}`);
    }
    const active = got.locks.filter((l) => l.unlocked_at === null);
    const list = table("", ["Period", "Reason", "Locked by", "Locked", "Readings held"],
      active.map((l) => [`${time(l.from)} to ${time(l.to)}`, l.reason, l.locked_by,
        time(l.locked_at), String(l.held)]),
      "No period of the study is locked.");
    if (list instanceof HTMLTableElement) {
      list.caption.remove();
      list.setAttribute("aria-labelledby", "study-locks-heading");
    }
    return el("div", { id: "study-locks" },
      el("h3", { id: "study-locks-heading" }, `Locks of study ${got.study_id} in force`),
      list,
      el("p", { class: "hint" },
        `Late data for a locked period is ${got.late_data_policy === "hold" ? "held until the lock is lifted" : "refused"}. ` +
        "Locks are set and lifted by the study's data manager (an admin) on the study's page; " +
        "this page shows them only. "),
      link(`/studies/${encodeURIComponent(got.study_id)}`, `All of study ${got.study_id}'s locks`));
  }

  function signOffForm(done) {
    const id = (n) => `review-${n}`;
    const error = el("p", { id: id("error"), class: "error", role: "alert", tabindex: "-1" });
    const input = (n) => document.getElementById(id(n));
    const form = el("form", { class: "sign review-sign", id: "review-sign", novalidate: true },
      el("p", { class: "statement", id: id("statement") },
        `Signing off is your electronic signature, ${me.display_name || me.username} ` +
        `(${ROLE_WORDS[role] || role}): it attests that you reviewed participant ${pid}'s data ` +
        "of the period below, with the meaning you give. Your name, role, the time and the " +
        "number of readings the period holds now are recorded with it, and it cannot be " +
        "withdrawn. Data stored later for the period does not change it: it marks it outdated."),
      field(id("from"), "Period from (your local time)", { type: "datetime-local", required: true }),
      field(id("to"), "Period to (excluded)", { type: "datetime-local", required: true }),
      field(id("meaning"), "Meaning of the signature", { type: "text", required: true,
        maxlength: String(REVIEW_MEANING_MAX), placeholder: "Reviewed, no concerns" },
      "What you attest, e.g. \u201cReviewed, no concerns\u201d."),
      field(id("username"), "User name", { autocomplete: "username", readonly: true,
        value: me.username }),
      field(id("password"), "Your password", { type: "password", required: true,
        autocomplete: "current-password", maxlength: "1024" },
      "Entering your password again confirms that this signature is yours."),
      error,
      el("button", { type: "submit" }, "Sign off this period"));
    const showError = (where, text) => TS.formError(error, where ? input(where) : null, text);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      error.textContent = "";
      for (const n of ["from", "to", "meaning", "password"]) input(n).removeAttribute("aria-invalid");
      const from = localIso(input("from").value);
      const to = localIso(input("to").value);
      const meaning = input("meaning").value.trim();
      const password = input("password").value;
      if (!from) return showError("from", "Enter when the period starts.");
      if (!to) return showError("to", "Enter when the period ends.");
      if (Date.parse(to) <= Date.parse(from)) return showError("to", "The period must end after it starts.");
      if (!meaning) return showError("meaning", "Give the meaning of your signature.");
      if (!password) return showError("password", "Enter your password to sign.");
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      try {
        const r = await api(`${base}/reviews`, { method: "POST",
          body: { from, to, meaning, username: me.username, password } });
        status(`Signed off: ${time(r.from)} to ${time(r.to)}.`);
        await done(`Signed off ${time(r.from)} to ${time(r.to)} (${plural(r.readings, "reading", "readings")}) on ${time(r.signed_at)}.`);
      } catch (e) {
        button.disabled = false;
        const kind = e.problem && e.problem.type ? e.problem.type.split("/").pop() : "";
        const fieldOf = { from: "from", to: "to", meaning: "meaning", password: "password" };
        const where = kind === "reauthentication-failed" ? "password"
          : (e.problem && fieldOf[e.problem.field]) || null;
        showError(where, `Not signed: ${TS.problemText(e)}`);
      }
    });
    return form;
  }

  // The card: the participant's sign-offs, the study's locks in force (read-only), and for
  // the roles that may sign, the sign-off form.
  function reviewsCard(studyId) {
    const node = section("Review sign-offs");
    node.id = "review-signoffs";
    node.classList.add("reviews-card");
    const body = el("div", { class: "reviews-body" }, el("p", {}, "Loading…"));
    node.append(body);
    async function refresh(done) {
      const [reviews, studyLocks] = await Promise.all([
        api(`${base}/reviews`).catch((e) => ({ error: TS.problemText(e) })),
        api(`/api/v1/studies/${encodeURIComponent(studyId)}/locks`)
          .catch((e) => ({ error: TS.problemText(e) })),
      ]);
      const message = done ? el("p", { id: "review-message", class: "ok", tabindex: "-1" }, done) : null;
      body.replaceChildren(...[
        message,
        reviews.error
          ? el("p", { class: "error" }, `The sign-offs could not be read: ${reviews.error}`)
          : table("Review sign-offs",
            ["Period", "Signed by", "Meaning", "Signed", "Readings at signing", "State"],
            reviews.reviews.map(reviewRow), "No sign-off yet."),
        locksBlock(studyLocks.error ? { error: studyLocks.error } : studyLocks),
        REVIEW_SIGNERS.includes(role)
          ? el("details", { id: "review-sign-details" },
            el("summary", {}, "Sign off a period of this participant's data"), signOffForm(refresh))
          : el("p", { class: "hint" },
            "Sign-offs are signed by the site's investigator (a clinician) or a monitor."),
      ].filter(Boolean));
      // The table's caption repeats the card's heading: drop it, as section() does.
      const t = body.querySelector("table");
      if (t && t.caption && t.caption.textContent === "Review sign-offs") {
        t.caption.remove();
        t.setAttribute("aria-labelledby", node.querySelector("h2").id);
      }
      if (message) message.focus();
    }
    return { node, refresh };
  }

  async function load(done) {
    const staff = role !== "participant";
    const [d, docs, asked] = await Promise.all([
      api(`/api/v1/participants/${encodeURIComponent(pid)}`),
      api(`/api/v1/participants/${encodeURIComponent(pid)}/consent-documents`),
      staff ? api(`${base}/queries?state=all`) : null,
    ]);
    const p = d.participant;
    const devices = table("Paired devices",
      ["Hub", "Wearable", "Model", "Battery", "Last seen (last reading)", "Hub's last report",
        "Envelopes", "Readings stored", "Refused"],
      d.devices.flatMap((x) => (x.sensors.length ? x.sensors : [null]).map((s) => [
        x.device_id + (x.revoked_at ? " (revoked)" : ""),
        s ? s.sensor : "—", s && s.model ? s.model : "—",
        s && s.battery_level !== null ? `${s.battery_level} %` : "—",
        s ? (s.last_seen ? ago(s.last_seen) : "no reading in 30 days") : "—",
        s && s.last_report ? ago(s.last_report) : "—", String(x.envelopes),
        String(x.readings_stored), String(x.readings_refused)])),
      "No devices paired yet.");
    const wearables = table("Wearables over time",
      ["Hub", "Wearable", "Manufacturer", "Model", "Serial", "Firmware", "Valid from", "Until"],
      d.sensor_history.map((h) => [h.device_id, h.sensor, h.manufacturer || "—", h.model || "—",
        h.serial || "—", h.firmware || "—",
        h.valid_from ? time(h.valid_from) : `first readings (reported ${time(h.reported_at)})`,
        h.valid_to ? time(h.valid_to) : "now"]),
      "No wearable has described itself yet.");
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
      links.push(" · ", link(`/participants/${encodeURIComponent(pid)}/adherence`, "Adherence"));
      links.push(" · ", link(`/sites/${encodeURIComponent(p.site_id)}`, "Site page"));
    }
    const signed = done ? el("p", { id: "signed-message", class: "ok", tabindex: "-1" }, done) : null;
    const documents = section("Consent documents",
      signed,
      docs.documents.length
        ? docs.documents.map((doc) => documentBlock(doc, docs.witness_required))
        : el("p", { class: "empty" }, "No consent document is in effect for this study."));
    documents.id = "consent-documents";
    const inForce = d.consents.some((c) => !c.valid_to && c.action !== "withdraw");
    const reviews = staff ? reviewsCard(p.study_id) : null;
    const history = section("Consent", consents,
      signs && inForce ? el("details", { id: "withdraw-details" },
        el("summary", {}, role === "participant" ? "Withdraw my consent" : "Record a withdrawal"),
        withdrawalForm()) : null);
    history.id = "consent-history";
    document.getElementById("main").replaceChildren(...[
      el("p", { class: "lead" }, head.join(" · "), ...links),
      documents,
      section("Devices", devices, wearables),
      staff ? queries.node : null,
      reviews ? reviews.node : null,
      section("What was sent and received", sent, refused),
      history,
    ].filter(Boolean));
    if (staff) queries.show(asked.queries);
    if (reviews) await reviews.refresh(null);
    if (signed) signed.focus();
  }

  document.addEventListener("DOMContentLoaded", () =>
    session().then((user) => {
      me = user;
      return load(null);
    }).catch((e) => status(e.message)));
})();
