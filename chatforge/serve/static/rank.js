// Rank page: K responses to one prompt, ordered best -> worst by drag and drop or the
// ▲/▼ buttons (keyboard and tests); with K=2, "A is better" / "B is better" decide at once.
"use strict";

const { el, clear, api, setStatus } = CF;
let current = null;
let order = [];       // response ids, best first
let dragged = null;   // id of the card being dragged

function textOf(id) {
  return current.responses.find((r) => r.id === id).text;
}

function move(index, delta) {
  const to = index + delta;
  if (to < 0 || to >= order.length) return;
  [order[index], order[to]] = [order[to], order[index]];
  renderCards();
  const button = document.querySelector(`#cards .card:nth-child(${to + 1}) button.${delta < 0 ? "up" : "down"}`);
  if (button && !button.disabled) button.focus();
}

function renderCards() {
  const box = clear(document.getElementById("cards"));
  order.forEach((id, i) => {
    const card = el("div", { class: "card", draggable: "true", tabindex: "0", dataset: { id: String(id) },
                             "aria-label": `Rank ${i + 1}` },
      el("div", { class: "rank" }, String(i + 1)),
      el("div", {}, el("div", { class: "tag" }, `Response ${String.fromCharCode(65 + current.responses.findIndex((r) => r.id === id))}`),
         el("div", { class: "text-block" }, textOf(id))),
      el("div", { class: "moves" },
         el("button", { type: "button", class: "up", "aria-label": `Move response up from rank ${i + 1}`, disabled: i === 0,
                        onclick: () => move(i, -1) }, "▲"),
         el("button", { type: "button", class: "down", "aria-label": `Move response down from rank ${i + 1}`,
                        disabled: i === order.length - 1, onclick: () => move(i, 1) }, "▼")));
    card.addEventListener("dragstart", (e) => {
      dragged = id;
      card.classList.add("dragging");
      e.dataTransfer.effectAllowed = "move";
      e.dataTransfer.setData("text/plain", String(id));
    });
    card.addEventListener("dragend", () => { dragged = null; card.classList.remove("dragging"); });
    card.addEventListener("dragover", (e) => { e.preventDefault(); card.classList.add("over"); });
    card.addEventListener("dragleave", () => card.classList.remove("over"));
    card.addEventListener("drop", (e) => {
      e.preventDefault();
      card.classList.remove("over");
      const from = order.indexOf(dragged ?? parseInt(e.dataTransfer.getData("text/plain"), 10));
      if (from < 0 || from === i) return;
      const [moved] = order.splice(from, 1);
      order.splice(i, 0, moved);
      renderCards();
    });
    box.appendChild(card);
  });
}

function renderPair() {
  // K = 2: side by side, one click decides.
  const box = clear(document.getElementById("cards"));
  const [a, b] = current.responses;
  const side = (label, r) => el("div", { class: "card side" },
    el("div", {}, el("div", { class: "tag" }, `Response ${label}`), el("div", { class: "text-block" }, r.text)));
  box.appendChild(el("div", { class: "pair" }, side("A", a), side("B", b)));
  box.appendChild(el("div", { class: "row center" },
    el("button", { type: "button", class: "primary", id: "a-better", onclick: () => submit([a.id, b.id]) }, "A is better"),
    el("button", { type: "button", class: "primary", id: "b-better", onclick: () => submit([b.id, a.id]) }, "B is better")));
}

async function loadNext() {
  setStatus(document.getElementById("status"), "");
  const data = await api("/api/review/next?kind=rank");
  const g = clear(document.getElementById("guidelines"));
  g.append(el("h2", {}, "Guidelines"), el("p", {}, data.guidelines.text));
  CF.progressBar(document.getElementById("progress"), data.progress);
  const done = !!data.done;
  document.getElementById("item").classList.toggle("hidden", done);
  document.getElementById("ranking").classList.toggle("hidden", done);
  document.getElementById("done").classList.toggle("hidden", !done);
  if (done) { current = null; return; }
  current = data;
  order = data.responses.map((r) => r.id);
  clear(document.getElementById("prompt")).appendChild(CF.turns(data.prompt.messages));
  const pair = order.length === 2;
  document.getElementById("submit").classList.toggle("hidden", pair);
  document.getElementById("ranking-help").textContent = pair
    ? "Which response is better? Keys: A or B."
    : "Drag the cards, or use ▲ / ▼, so the best response is on top.";
  document.getElementById("ranking-title").textContent = pair ? "Pick the better one" : "Best first";
  if (pair) renderPair(); else renderCards();
}

async function submit(finalOrder) {
  if (!current) return;
  const status = document.getElementById("status");
  try {
    await api("/api/review/rank", { body: { assignment_id: current.assignment_id, order: finalOrder || order } });
    await loadNext();
  } catch (err) {
    setStatus(status, err.message, "error");
  }
}

CF.start(async () => {
  if (!(await CF.nav("/rank", ["reviewer", "admin"]))) return;
  document.getElementById("submit").addEventListener("click", () => submit());
  document.addEventListener("keydown", (e) => {
    if (!current || CF.typing(e) || current.responses.length !== 2 || e.ctrlKey || e.metaKey || e.altKey) return;
    const k = e.key.toLowerCase();
    if (k === "a") document.getElementById("a-better").click();
    if (k === "b") document.getElementById("b-better").click();
  });
  await loadNext();
});
