// Login page: POST /api/login, then go where the server says (the user's target, if it is on this site).
"use strict";

CF.start(async () => {
  const form = document.getElementById("login-form");
  const status = document.getElementById("status");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    CF.setStatus(status, "");
    try {
      const answer = await CF.api("/api/login", { noRedirect: true, body: {
        username: document.getElementById("username-input").value,
        password: document.getElementById("password-input").value,
        next: new URLSearchParams(location.search).get("next") || "/chat",
      } });
      // The server checked the target as a browser reads it (a path on this site, else /chat):
      // no check here that could disagree with the browser about tabs, newlines or backslashes.
      location.assign(answer.next || "/chat");
    } catch (err) {
      CF.setStatus(status, err.message, "error");
    }
  });
});
