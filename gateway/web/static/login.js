"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("login");
  const error = document.getElementById("login-error");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    error.textContent = "";
    try {
      await TS.api("/api/v1/session", {
        method: "POST",
        noRedirect: true,
        body: { username: form.username.value, password: form.password.value },
      });
      const next = new URLSearchParams(location.search).get("next") || "/";
      // Only a path on this gateway: never an address elsewhere.
      location.assign(next.startsWith("/") && !next.startsWith("//") ? next : "/");
    } catch (e) {
      error.textContent = e.message;
      form.password.value = "";
      form.password.focus();
    }
  });
});
