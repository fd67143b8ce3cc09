"use strict";

// Where to go after signing in: only a path on this gateway. The address is resolved as the
// browser would resolve it ("/\\host", "//host", a tab or newline inside "//" all lead to
// another host) and kept only if it stays on this origin.
function localPath(next) {
  if (!next || !next.startsWith("/")) return "/";
  try {
    const url = new URL(next, location.origin);
    if (url.origin === location.origin) return url.pathname + url.search + url.hash;
  } catch (e) {
    // not an address at all
  }
  return "/";
}

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
      location.assign(localPath(new URLSearchParams(location.search).get("next")));
    } catch (e) {
      error.textContent = e.message;
      form.password.value = "";
      form.password.focus();
    }
  });
});
