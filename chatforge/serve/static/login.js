// Login page: POST /api/login, then go where the user was headed (same-site paths only).
"use strict";

CF.start(async () => {
  const form = document.getElementById("login-form");
  const status = document.getElementById("status");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    CF.setStatus(status, "");
    try {
      await CF.api("/api/login", { noRedirect: true, body: {
        username: document.getElementById("username-input").value,
        password: document.getElementById("password-input").value,
      } });
      const next = new URLSearchParams(location.search).get("next") || "/chat";
      // Only a local path: "//evil.example" or "https://..." would be an open redirect.
      location.assign(next.startsWith("/") && !next.startsWith("//") && !next.startsWith("/\\") ? next : "/chat");
    } catch (err) {
      CF.setStatus(status, err.message, "error");
    }
  });
});
