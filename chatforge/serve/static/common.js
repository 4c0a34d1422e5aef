// chatforge web app: helpers shared by every page.
//
// - el(): builds DOM nodes; strings always become text nodes (textContent), never HTML, so model
//   outputs, dataset items and user input cannot inject markup or script.
// - api(): JSON fetch with the session cookie; an error answer {"error": ...} becomes an Error
//   whose message is shown as is; 401 sends the browser to /login.
// - streamChat(): POSTs JSON and reads a text/event-stream answer ("data: {...}" events).
// - nav(): the bar at the top: the pages the user's role may use, the user, the role, log out
//   (this browser, or every session of the account).
"use strict";

const CF = (() => {
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "text") node.textContent = String(value);
      else if (key === "class") node.className = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
      else if (key === "value" || key === "checked" || key === "disabled") node[key] = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      node.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
    return node;
  }

  function toLogin() {
    const next = location.pathname + location.search;
    location.assign("/login?next=" + encodeURIComponent(next));
  }

  async function errorOf(res) {
    let message = `${res.status} ${res.statusText}`;
    let field = null;
    try {
      const body = await res.json();
      if (body && body.error) { message = body.error; field = body.field || null; }
    } catch (_) { /* not JSON: keep the status line */ }
    const err = new Error(message);
    err.status = res.status;
    err.field = field;
    return err;
  }

  async function api(path, options = {}) {
    const init = { method: options.method || (options.body !== undefined ? "POST" : "GET"),
                   credentials: "same-origin", headers: { "Accept": "application/json" } };
    if (init.method !== "GET") {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(options.body === undefined ? {} : options.body);
    }
    const res = await fetch(path, init);
    if (res.status === 401 && !options.noRedirect) { toLogin(); throw await errorOf(res); }
    if (!res.ok) throw await errorOf(res);
    return res.json();
  }

  // POST `body` to `path` and call onEvent(obj) for every "data: {...}" event of the answer.
  async function streamChat(path, body, onEvent, signal) {
    const res = await fetch(path, {
      method: "POST", credentials: "same-origin", signal,
      headers: { "Content-Type": "application/json", "Accept": "text/event-stream" },
      body: JSON.stringify(body || {}),
    });
    if (res.status === 401) { toLogin(); throw await errorOf(res); }
    if (!res.ok) throw await errorOf(res);
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const chunk = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = chunk.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (data) onEvent(JSON.parse(data));
      }
    }
  }

  function setStatus(node, message, kind) {
    node.textContent = message || "";
    node.classList.toggle("error", kind === "error");
    node.classList.toggle("ok", kind === "ok");
  }

  const PAGES = [
    { href: "/chat", label: "Chat", roles: null },
    { href: "/review", label: "Rate", roles: ["reviewer", "admin"] },
    { href: "/rank", label: "Rank", roles: ["reviewer", "admin"] },
    { href: "/label", label: "Label", roles: ["annotator", "admin"] },
    { href: "/flags", label: "Flags", roles: ["reviewer", "admin"] },  // the safety guard's review queue
    { href: "/admin", label: "Admin", roles: ["admin"] },
    { href: "/report", label: "Report", roles: null },  // the run's report card (chatforge report)
  ];

  // Draw the nav bar and return the logged-in user ({id, username, role}); null if the page's
  // `roles` exclude the user (the main area then says so).
  async function nav(active, roles) {
    const user = await api("/api/me");
    const links = PAGES.filter((p) => !p.roles || p.roles.includes(user.role)).map((p) =>
      el("a", { href: p.href, class: p.href === active ? "active" : "" , "aria-current": p.href === active ? "page" : null }, p.label));
    const logout = el("button", { type: "button", id: "logout", onclick: async () => {
      try { await api("/api/logout", { body: {} }); } finally { location.assign("/login"); }
    } }, "Log out");
    const everywhere = el("button", { type: "button", id: "logout-everywhere",
      title: "End every session of this account, in every browser", onclick: async () => {
        try { await api("/api/logout/everywhere", { body: {} }); } finally { location.assign("/login"); }
      } }, "Log out everywhere");
    const bar = el("nav", { class: "nav" },
      el("a", { class: "brand", href: "/chat" }, "chatforge"),
      el("div", { class: "links" }, links),
      el("div", { class: "who" }, el("span", { id: "username" }, user.username),
         el("span", { class: "role", id: "role" }, user.role), logout, everywhere));
    document.body.insertBefore(bar, document.body.firstChild);
    if (roles && !roles.includes(user.role)) {
      const main = clear(document.querySelector("main"));
      main.appendChild(el("div", { class: "panel" }, `This page needs the role ${roles.join(" or ")}; you are ${user.role}.`));
      return null;
    }
    return user;
  }

  // Render a conversation (list of {role, content}) as labelled turns.
  function turns(messages) {
    return el("div", { class: "prompt" }, messages.map((m) =>
      el("div", { class: "turn" }, el("div", { class: "role" }, m.role), el("div", { class: "text-block" }, m.content))));
  }

  function progressBar(node, progress) {
    clear(node);
    if (!progress) return;
    const pct = progress.total ? Math.round((100 * progress.done) / progress.total) : 0;
    const bar = el("div", { class: "bar" }, el("div", {}));
    bar.firstChild.style.width = pct + "%";
    node.append(el("span", { class: "progress", id: "progress-text" }, `${progress.done} / ${progress.total}`), bar);
  }

  // Run an async page initializer and show a failure in the page's status line. When it is
  // done, <body data-ready="1"> tells tests (and impatient scripts) the page is usable.
  function start(fn) {
    document.addEventListener("DOMContentLoaded", () => {
      fn().then(() => { document.body.dataset.ready = "1"; }).catch((err) => {
        const status = document.getElementById("status");
        if (status) setStatus(status, err.message, "error");
        console.error(err);
      });
    });
  }

  // True if a keystroke goes into a text field (shortcuts must not steal it).
  function typing(event) {
    const t = event.target;
    return t && (t.tagName === "TEXTAREA" || (t.tagName === "INPUT" && ["text", "password", "number", "search"].includes(t.type))
                 || t.isContentEditable);
  }

  return { el, clear, api, streamChat, setStatus, nav, turns, progressBar, start, typing };
})();
