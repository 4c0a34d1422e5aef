// Chat page: conversations with the served models, streamed answers, thumbs + comment per answer.
//
// The server keeps every answer (a regenerated one is a sibling of the old); the page shows the
// current branch: from the newest message back through parent_id, as the server does.
"use strict";

const { el, clear, api, streamChat, setStatus } = CF;
const state = { conv: null, models: [], defaultModel: null, streaming: null };

function branch(messages) {
  if (!messages.length) return [];
  const byId = new Map(messages.map((m) => [m.id, m]));
  let node = messages.reduce((a, b) => (b.id > a.id ? b : a));
  const path = [];
  const seen = new Set();
  while (node && !seen.has(node.id)) {
    seen.add(node.id);
    path.push(node);
    node = node.parent_id != null ? byId.get(node.parent_id) : null;
  }
  path.reverse();
  const system = messages.find((m) => m.role === "system");
  if (system && path[0].role !== "system") path.unshift(system);
  return path;
}

function feedbackControls(message) {
  let thumb = message.thumb || 0;
  const status = el("span", { class: "muted fb-status" });
  const comment = el("input", { type: "text", class: "fb-comment", placeholder: "Comment (optional)",
                                value: message.comment || "", "aria-label": "Comment on this answer" });
  const up = el("button", { type: "button", class: "up", title: "Good answer", "aria-label": "Thumbs up" }, "✓ Good");
  const down = el("button", { type: "button", class: "down", title: "Bad answer", "aria-label": "Thumbs down" }, "✗ Bad");
  const paint = () => {
    up.classList.toggle("on", thumb === 1);
    down.classList.toggle("on", thumb === -1);
    up.setAttribute("aria-pressed", String(thumb === 1));
    down.setAttribute("aria-pressed", String(thumb === -1));
  };
  const save = async () => {
    setStatus(status, "saving…");
    try {
      await api(`/api/messages/${message.id}/feedback`, { body: { thumb, comment: comment.value || null } });
      setStatus(status, "saved", "ok");
    } catch (err) {
      setStatus(status, err.message, "error");
    }
  };
  up.addEventListener("click", () => { thumb = thumb === 1 ? 0 : 1; paint(); save(); });
  down.addEventListener("click", () => { thumb = thumb === -1 ? 0 : -1; paint(); save(); });
  comment.addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); save(); } });
  paint();
  return el("div", { class: "fb" }, up, down, comment,
            el("button", { type: "button", class: "fb-save", onclick: save }, "Save comment"), status);
}

function bubble(message) {
  const who = message.role === "assistant" && message.model_id
    ? `assistant · ${message.model_id}${message.model_version ? " @" + message.model_version.slice(0, 8) : ""}`
    : message.role;
  const node = el("div", { class: `msg ${message.role}`, dataset: { id: message.id ?? "" } },
    el("div", { class: "who" }, who), el("div", { class: "text" }, message.content));
  if (message.role === "assistant" && message.id != null) node.appendChild(feedbackControls(message));
  return node;
}

function renderMessages(messages, system) {
  const box = clear(document.getElementById("messages"));
  const path = branch(messages);
  if (system && !(path.length && path[0].role === "system")) box.appendChild(bubble({ role: "system", content: system }));
  for (const m of path) box.appendChild(bubble(m));
  box.scrollTop = box.scrollHeight;
  const last = branch(messages).filter((m) => m.role !== "system").pop();
  document.getElementById("regenerate").disabled = !last || state.streaming !== null;
}

async function loadConversations() {
  const { conversations } = await api("/api/conversations");
  const list = clear(document.getElementById("conversations"));
  for (const c of conversations) {
    list.appendChild(el("button", { type: "button", class: state.conv && state.conv.id === c.id ? "active" : "",
                                    title: c.title || `Conversation ${c.id}`, onclick: () => openConversation(c.id) },
                        c.title || `Conversation ${c.id}`));
  }
  if (!conversations.length) list.appendChild(el("div", { class: "muted" }, "No conversations yet."));
}

async function openConversation(id) {
  state.conv = await api(`/api/conversations/${id}`);
  document.getElementById("setup").classList.add("hidden");
  document.getElementById("conv-info").textContent = `Model: ${state.conv.model_id}`;
  renderMessages(state.conv.messages, state.conv.system);
  await loadConversations();
}

function newChat() {
  state.conv = null;
  document.getElementById("setup").classList.remove("hidden");
  document.getElementById("conv-info").textContent = "";
  renderMessages([]);
  loadConversations();
  document.getElementById("input").focus();
}

function setStreaming(controller) {
  state.streaming = controller;
  const busy = controller !== null;
  document.getElementById("send").disabled = busy;
  document.getElementById("regenerate").disabled = busy;
  document.getElementById("stop").classList.toggle("hidden", !busy);
}

function sampling() {
  const body = {};
  const t = parseFloat(document.getElementById("temperature").value);
  const n = parseInt(document.getElementById("max-tokens").value, 10);
  if (!Number.isNaN(t)) body.temperature = t;
  if (!Number.isNaN(n)) body.max_tokens = n;
  return body;
}

// Stream an answer from `path` into a new assistant bubble, then reload the conversation. An answer
// the server could not store (its done event has no message_id) stays on the page, marked
// "not saved", with the `question` bubble when that was not stored either.
async function streamAnswer(path, body, question = null) {
  const status = document.getElementById("status");
  const box = document.getElementById("messages");
  const live = el("div", { class: "msg assistant streaming", id: "streaming" },
                  el("div", { class: "who" }, `assistant · ${state.conv.model_id}`), el("div", { class: "text" }));
  box.appendChild(live);
  box.scrollTop = box.scrollHeight;
  const since = state.conv.messages.reduce((a, m) => Math.max(a, m.id), 0);
  const controller = new AbortController();
  setStreaming(controller);
  setStatus(status, "generating…");
  let finish = null;
  let error = null;
  let done = null;
  let refused = false;
  try {
    await streamChat(path, body, (event) => {
      if (event.delta !== undefined) {
        live.querySelector(".text").textContent += event.delta;
        box.scrollTop = box.scrollHeight;
      }
      if (event.error) { error = event.error; setStatus(status, event.error, "error"); }
      if (event.done) { done = event; finish = event.finish_reason; }
    }, controller.signal);
    if (finish) setStatus(status, error || (finish === "length" ? "stopped at the token limit"
                                            : finish === "content_filter" ? "the safety policy stopped this answer" : ""),
                          finish === "error" || error ? "error" : "");
  } catch (err) {
    refused = !controller.signal.aborted;
    setStatus(status, controller.signal.aborted ? "stopped" : err.message, controller.signal.aborted ? "" : "error");
    if (controller.signal.aborted) await settled(since);
  } finally {
    setStreaming(null);
    await openConversation(state.conv.id);
    if (done && done.message_id == null && live.querySelector(".text").textContent) {
      if (question && done.user_message_id == null) box.appendChild(question);
      live.classList.replace("streaming", "unsaved");
      live.removeAttribute("id");
      live.querySelector(".who").textContent += " · not saved";
      box.appendChild(live);
    }
  }
  return !refused;
}

// After Stop, the server stores the partial answer as soon as the engine lets go of it:
// wait (briefly) for an assistant message newer than `since`.
async function settled(since) {
  for (let i = 0; i < 20; i++) {
    const conv = await api(`/api/conversations/${state.conv.id}`);
    if (conv.messages.some((m) => m.role === "assistant" && m.id > since)) return;
    await new Promise((r) => setTimeout(r, 150));
  }
}

async function send() {
  const input = document.getElementById("input");
  const content = input.value;
  if (!content.trim() || state.streaming) return;
  const status = document.getElementById("status");
  try {
    if (!state.conv) {
      const system = document.getElementById("system").value.trim();
      const model = document.getElementById("model").value || null;
      const { id } = await api("/api/conversations", { body: { model, system: system || null } });
      await openConversation(id);
    }
  } catch (err) {
    setStatus(status, err.message, "error");
    return;
  }
  input.value = "";
  const question = bubble({ role: "user", content });
  document.getElementById("messages").appendChild(question);
  const ok = await streamAnswer(`/api/conversations/${state.conv.id}/messages`, { content, ...sampling() }, question);
  // A refused request (e.g. too long for the context) stored nothing: give the text back to edit.
  const last = state.conv.messages[state.conv.messages.length - 1];
  if (!ok && !(last && last.role === "user" && last.content === content) && !input.value) input.value = content;
}

async function regenerate() {
  if (!state.conv || state.streaming) return;
  const box = document.getElementById("messages");
  const last = box.lastElementChild;
  if (last && last.classList.contains("assistant")) last.remove();
  await streamAnswer(`/api/conversations/${state.conv.id}/regenerate`, sampling());
}

CF.start(async () => {
  if (!(await CF.nav("/chat"))) return;
  const { models, default: def } = await api("/api/models");
  state.models = models;
  const select = document.getElementById("model");
  for (const m of models) select.appendChild(el("option", { value: m.id, selected: m.id === def }, `${m.id} (${m.version})`));
  select.value = def;
  document.getElementById("model-field").classList.toggle("hidden", models.length < 2);
  document.getElementById("new-chat").addEventListener("click", newChat);
  document.getElementById("send").addEventListener("click", send);
  document.getElementById("regenerate").addEventListener("click", regenerate);
  document.getElementById("stop").addEventListener("click", () => state.streaming && state.streaming.abort());
  document.getElementById("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
  });
  const fromUrl = parseInt(new URLSearchParams(location.search).get("c"), 10);
  if (!Number.isNaN(fromUrl)) await openConversation(fromUrl);
  else newChat();
});
