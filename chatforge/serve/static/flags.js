// Safety flags page: the guard's review queue. Each pending flag shows the prompt, the answer as
// generated (the unsafe original) and as delivered, the category, layer, action and findings;
// Confirm (with a category) or Clear decides it. Every text goes into the page as text (el()).
"use strict";

const { el, clear, api, setStatus } = CF;
let categories = [];

function textBlock(label, text, id) {
  return [el("h3", {}, label), el("div", { class: "text-block", id }, text === null || text === undefined ? "(none)" : text)];
}

function renderFlag(flag) {
  const status = el("div", { class: "status", role: "status" });
  const picker = el("select", { "aria-label": `Category of flag ${flag.id}`, id: `category-${flag.id}` },
                    categories.map((c) => el("option", { value: c, selected: c === flag.category }, c)));
  if (!categories.includes(flag.category)) picker.prepend(el("option", { value: flag.category, selected: true }, flag.category));
  picker.value = flag.category;
  const panel = el("div", { class: "panel flag", id: `flag-${flag.id}`, dataset: { id: String(flag.id) } });

  async function decide(decision) {
    const body = { decision };
    if (decision === "confirmed") body.category = picker.value;
    for (const b of panel.querySelectorAll("button")) b.disabled = true;
    try {
      await api(`/api/flags/${flag.id}/decide`, { body });
      panel.remove();
      await refreshCounts();
    } catch (err) {
      setStatus(status, err.message, "error");
      for (const b of panel.querySelectorAll("button")) b.disabled = false;
    }
  }

  const evidence = (flag.findings || []).map((f) =>
    el("li", {}, `${f.category} · ${f.layer} · ${f.rule}`, f.evidence ? ": " : "", f.evidence ? el("code", {}, f.evidence) : null));
  panel.append(
    el("div", { class: "row between" },
       el("h2", {}, `#${flag.id} · ${flag.place} · ${flag.category}`),
       el("span", { class: "muted" }, `${flag.action} by ${flag.layer || "?"} · ${flag.source} · ${flag.model_id || ""} · ${flag.created_at}`)),
    el("h3", {}, "Prompt"), CF.turns(flag.prompt || []),
    ...textBlock("Answer as generated", flag.answer_generated, `generated-${flag.id}`),
    ...textBlock("Answer as delivered", flag.answer_delivered, `delivered-${flag.id}`),
    el("h3", {}, "Findings"), el("ul", {}, evidence),
    el("div", { class: "row mt" },
       el("label", { class: "check" }, "Category ", picker),
       el("button", { type: "button", class: "primary", id: `confirm-${flag.id}`, onclick: () => decide("confirmed") }, "Confirm"),
       el("button", { type: "button", id: `clear-${flag.id}`, onclick: () => decide("cleared") }, "Clear (safe)")),
    status);
  return panel;
}

async function refreshCounts() {
  const data = await api("/api/flags?limit=1");
  const c = data.counts;
  document.getElementById("counts").textContent = `${c.pending} pending · ${c.confirmed} confirmed · ${c.cleared} cleared`;
  document.getElementById("done").classList.toggle("hidden", !!document.querySelector(".flag"));
}

async function load() {
  const data = await api("/api/flags?status=pending&limit=50");
  categories = data.categories || [];
  const box = clear(document.getElementById("flags"));
  for (const flag of data.flags) box.appendChild(renderFlag(flag));
  if (!data.guard) setStatus(document.getElementById("status"), "The safety guard is off on this server (start it with --guard default); older flags are still shown.");
  await refreshCounts();
}

CF.start(async () => {
  if (!(await CF.nav("/flags", ["reviewer", "admin"]))) return;
  await load();
});
