"use strict";
// A study's locks (docs/review.md): every period locked to new data, in force or lifted, with
// the readings each holds, and what happens to data that arrives late for a locked period.
// The study's data manager (an admin) locks a period and lifts a lock here, each an
// e-signature (the password entered again), and sets the late data policy; staff with a site
// in the study see the same without the forms.
(() => {
  const { el, api, session, time, section, table, field, localIso, status } = TS;
  const study = document.body.dataset.study;
  const role = document.body.dataset.role;
  // api_review.DATA_MANAGERS: who may lock, unlock and set the policy.
  const LOCK_MANAGERS = ["admin"];
  const LOCK_REASON_MAX = 500;
  const manages = LOCK_MANAGERS.includes(role);
  const base = `/api/v1/studies/${encodeURIComponent(study)}`;
  const main = document.getElementById("main");
  const POLICY_TEXT = {
    refuse: "refused: each such reading leaves a rejection row (period_locked) and is not stored",
    hold: "held: kept aside, and stored when the lock is lifted",
  };
  let me = null;

  const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;

  // An e-signed act: the statement of what signing means, the act's own fields, the signer's
  // user name (their own, shown read-only) and password. `send` gets the fields' values and
  // the password and returns the message to show; a refusal is shown at its field.
  function signedForm({ prefix, statement, fields, button, check, send }) {
    const id = (n) => `${prefix}-${n}`;
    const input = (n) => document.getElementById(id(n));
    const error = el("p", { id: id("error"), class: "error", role: "alert", tabindex: "-1" });
    const form = el("form", { class: "sign", id: id("form"), novalidate: true },
      el("p", { class: "statement" }, statement),
      fields.map((f) => field(id(f.name), f.label, f.attrs, f.hint)),
      field(id("username"), "User name", { autocomplete: "username", readonly: true, value: me.username }),
      field(id("password"), "Your password", { type: "password", required: true,
        autocomplete: "current-password", maxlength: "1024" },
      "Entering your password again confirms that this signature is yours."),
      error,
      el("button", { type: "submit" }, button));
    const showError = (where, text) => TS.formError(error, where ? input(where) : null, text);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      error.textContent = "";
      const names = [...fields.map((f) => f.name), "password"];
      for (const n of names) input(n).removeAttribute("aria-invalid");
      const values = Object.fromEntries(fields.map((f) => [f.name, input(f.name).value]));
      const wrong = check(values);
      if (wrong) return showError(wrong[0], wrong[1]);
      const password = input("password").value;
      if (!password) return showError("password", "Enter your password to sign.");
      const submit = form.querySelector("button[type=submit]");
      submit.disabled = true;
      try {
        await load(await send(values, password));
      } catch (e) {
        submit.disabled = false;
        const kind = e.problem && e.problem.type ? e.problem.type.split("/").pop() : "";
        const where = kind === "reauthentication-failed" ? "password"
          : (e.problem && names.includes(e.problem.field) ? e.problem.field : null);
        showError(where, `Not signed: ${TS.problemText(e)}`);
      }
    });
    return form;
  }

  const REASON = (hint) => ({ name: "reason", label: "Reason",
    attrs: { type: "text", required: true, maxlength: String(LOCK_REASON_MAX) }, hint });

  function lockForm() {
    return signedForm({
      prefix: "lock",
      statement: `Locking is your electronic signature, ${me.display_name || me.username}: ` +
        `it closes the period below of study ${study} to new data, for every participant. ` +
        "Your name, the time and the reason are recorded with it; only a signed unlock lifts it.",
      fields: [
        { name: "from", label: "Period from (your local time)", attrs: { type: "datetime-local", required: true } },
        { name: "to", label: "Period to (excluded)", attrs: { type: "datetime-local", required: true } },
        REASON("Why, e.g. \u201cdatabase lock for the interim analysis\u201d (recorded)."),
      ],
      button: "Lock this period",
      check: (v) => {
        if (!localIso(v.from)) return ["from", "Enter when the period starts."];
        if (!localIso(v.to)) return ["to", "Enter when the period ends."];
        if (Date.parse(localIso(v.to)) <= Date.parse(localIso(v.from))) return ["to", "The period must end after it starts."];
        if (!v.reason.trim()) return ["reason", "Give the reason for the lock."];
        return null;
      },
      send: async (v, password) => {
        const l = await api(`${base}/locks`, { method: "POST", body: {
          from: localIso(v.from), to: localIso(v.to), reason: v.reason.trim(), username: me.username, password } });
        status(`Locked: ${time(l.from)} to ${time(l.to)}.`);
        return `Lock ${l.lock_id} in force: ${time(l.from)} to ${time(l.to)}.`;
      },
    });
  }

  function unlockForm(l) {
    return signedForm({
      prefix: `unlock-${l.lock_id}`,
      statement: `Lifting lock ${l.lock_id} is your electronic signature: data for ` +
        `${time(l.from)} to ${time(l.to)} is stored again as it arrives, and the ` +
        `${plural(l.held, "reading", "readings")} held for the lock are stored now.`,
      fields: [REASON("Why the lock is lifted (recorded).")],
      button: `Lift lock ${l.lock_id}`,
      check: (v) => (v.reason.trim() ? null : ["reason", "Give the reason for lifting the lock."]),
      send: async (v, password) => {
        const r = await api(`/api/v1/locks/${l.lock_id}/unlock`, { method: "POST",
          body: { reason: v.reason.trim(), username: me.username, password } });
        status(`Lock ${l.lock_id} lifted.`);
        return `Lock ${l.lock_id} lifted; ${plural(r.released, "held reading", "held readings")} stored.`;
      },
    });
  }

  function lockRow(l) {
    const inForce = l.unlocked_at === null;
    return el("tr", { class: inForce ? "lock in-force" : "lock lifted", "data-lock-id": l.lock_id,
      "data-state": inForce ? "in-force" : "lifted" },
      el("td", {}, `${time(l.from)} to ${time(l.to)}`),
      el("td", {}, l.reason),
      el("td", {}, `${l.locked_by}, ${time(l.locked_at)}`),
      el("td", { class: "held" }, String(l.held)),
      el("td", { class: "lock-state" }, inForce
        ? [el("strong", {}, "In force"), manages
          ? el("details", { class: "unlock", id: `unlock-${l.lock_id}-details` },
            el("summary", {}, "Lift this lock"), unlockForm(l))
          : null]
        : `Lifted by ${l.unlocked_by}, ${time(l.unlocked_at)}: ${l.unlock_reason}`));
  }

  function policyForm(current) {
    const select = el("select", { id: "policy", name: "policy" },
      Object.keys(POLICY_TEXT).map((p) => el("option", { value: p, selected: p === current }, POLICY_TEXT[p])));
    const form = el("form", { id: "policy-form", class: "inline" },
      el("label", { for: "policy" }, "Late data for a locked period is"), select,
      el("button", { type: "submit" }, "Save"));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      try {
        const r = await api(`${base}/late-data-policy`, { method: "PUT", body: { policy: select.value } });
        status("Late data policy saved.");
        await load(`Late data for a locked period is now ${POLICY_TEXT[r.late_data_policy].split(":")[0]}.`);
      } catch (e) {
        status(`Not saved: ${TS.problemText(e)}`);
      }
    });
    return form;
  }

  async function load(done) {
    const got = await api(`${base}/locks`);
    const message = done ? el("p", { id: "study-message", class: "ok", tabindex: "-1" }, done) : null;
    const inForce = got.locks.filter((l) => l.unlocked_at === null);
    main.replaceChildren(...[
      el("p", { class: "lead" }, `Study ${study} · ${plural(inForce.length, "lock", "locks")} in force · ` +
        `${plural(got.locks.length - inForce.length, "lifted", "lifted")}`),
      message,
      section("Late data",
        el("p", { id: "policy-now" }, `Readings that arrive for a locked period are ${POLICY_TEXT[got.late_data_policy]}.`),
        manages ? policyForm(got.late_data_policy) : null),
      section("Locks",
        table("Locks", ["Period", "Reason", "Locked by", "Readings held", "State"],
          got.locks.map(lockRow), "No period of the study has been locked."),
        manages ? null : el("p", { class: "hint" },
          "Locks are set and lifted by the study's data manager (an admin).")),
      manages ? section("Lock a period", lockForm()) : null,
    ].filter(Boolean));
    if (message) message.focus();
  }

  (async () => {
    try {
      me = await session();
      await load();
    } catch (e) {
      if (e.status !== 401) main.replaceChildren(el("p", { class: "error" }, `The study could not be read: ${TS.problemText(e)}`));
    }
  })();
})();
