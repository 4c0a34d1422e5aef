// Rate page: one prompt + one response, four 1..5 scales, guidelines beside them.
//
// Keyboard: 1-5 score the current aspect and move on to the next; Tab moves between aspects
// (each radio group is one tab stop); Enter submits once every aspect has a score.
"use strict";

const { el, clear, api, setStatus } = CF;
const ASPECTS = ["fluency", "coherence", "relevance", "appropriateness"];
let current = null;   // the assignment being rated
let guidelines = null;
let focusAspect = 0;  // index of the aspect that number keys score

function renderGuidelines(g) {
  const box = document.getElementById("guidelines");
  clear(box).appendChild(el("h2", {}, "Guidelines"));
  box.appendChild(el("p", {}, g.text));
  const list = el("dl", {});
  for (const a of ASPECTS) {
    const info = g.aspects[a];
    list.append(el("dt", {}, `${a[0].toUpperCase()}${a.slice(1)}: ${info.question}`),
                el("dd", {}, el("ol", {}, info.scale.map((s) => el("li", {}, s.replace(/^\d\s*-\s*/, ""))))));
  }
  box.appendChild(list);
}

function scaleHint(aspect, value) {
  return value && guidelines ? guidelines.aspects[aspect].scale[value - 1] : guidelines ? guidelines.aspects[aspect].question : "";
}

function buildScales() {
  const box = clear(document.getElementById("scales"));
  ASPECTS.forEach((aspect, i) => {
    const hint = el("div", { class: "hint", id: `hint-${aspect}` }, scaleHint(aspect, null));
    const opts = el("div", { class: "opts", role: "radiogroup", "aria-label": aspect });
    for (let v = 1; v <= 5; v++) {
      const input = el("input", { type: "radio", name: aspect, value: String(v), id: `${aspect}-${v}`,
                                  "aria-label": `${aspect} ${v}` });
      input.addEventListener("change", () => { hint.textContent = scaleHint(aspect, v); });
      input.addEventListener("focus", () => { focusAspect = i; });
      opts.appendChild(el("label", { for: `${aspect}-${v}`, title: scaleHint(aspect, v) }, input, String(v)));
    }
    box.appendChild(el("fieldset", { class: "scale", id: `scale-${aspect}` },
                       el("legend", {}, aspect[0].toUpperCase() + aspect.slice(1)), opts, hint));
  });
}

function value(aspect) {
  const checked = document.querySelector(`input[name="${aspect}"]:checked`);
  return checked ? parseInt(checked.value, 10) : null;
}

function focusScale(i) {
  const aspect = ASPECTS[Math.min(i, ASPECTS.length - 1)];
  const target = document.querySelector(`input[name="${aspect}"]:checked`) || document.getElementById(`${aspect}-1`);
  target.focus();
}

async function loadNext() {
  const status = document.getElementById("status");
  setStatus(status, "");
  const data = await api("/api/review/next?kind=rate");
  guidelines = data.guidelines;
  renderGuidelines(guidelines);
  CF.progressBar(document.getElementById("progress"), data.progress);
  const done = !!data.done;
  document.getElementById("item").classList.toggle("hidden", done);
  document.getElementById("rate-form").classList.toggle("hidden", done);
  document.getElementById("done").classList.toggle("hidden", !done);
  if (done) { current = null; return; }
  current = data;
  clear(document.getElementById("prompt")).appendChild(CF.turns(data.prompt.messages));
  document.getElementById("response").textContent = data.response.text;
  document.getElementById("comment").value = "";
  buildScales();
  focusAspect = 0;
  focusScale(0);
}

async function submit() {
  if (!current) return;
  const status = document.getElementById("status");
  const body = { assignment_id: current.assignment_id, comment: document.getElementById("comment").value || null };
  for (const a of ASPECTS) {
    const v = value(a);
    if (v === null) { setStatus(status, `Give a score for ${a} first.`, "error"); focusScale(ASPECTS.indexOf(a)); return; }
    body[a] = v;
  }
  const button = document.getElementById("submit");
  button.disabled = true;
  try {
    await api("/api/review/rate", { body });
    await loadNext();
  } catch (err) {
    setStatus(status, err.message, "error");
  } finally {
    button.disabled = false;
  }
}

CF.start(async () => {
  if (!(await CF.nav("/review", ["reviewer", "admin"]))) return;
  document.getElementById("rate-form").addEventListener("submit", (e) => { e.preventDefault(); submit(); });
  document.addEventListener("keydown", (e) => {
    if (!current || CF.typing(e) || e.target.closest("nav") || e.ctrlKey || e.metaKey || e.altKey) return;
    if (/^[1-5]$/.test(e.key)) {
      e.preventDefault();
      const aspect = ASPECTS[focusAspect];
      const input = document.getElementById(`${aspect}-${e.key}`);
      input.checked = true;
      input.dispatchEvent(new Event("change"));
      if (focusAspect < ASPECTS.length - 1) focusScale(focusAspect + 1);
      else document.getElementById("submit").focus();
    } else if (e.key === "Enter" && e.target.id !== "submit") {
      e.preventDefault();
      submit();
    }
  });
  await loadNext();
});
