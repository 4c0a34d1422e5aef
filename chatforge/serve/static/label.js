// Label page: an item's text and a form generated from its label schema.
//
// Field types: "choice" (buttons; number keys 1-9 pick an option of the first unanswered
// choice field, or of the one that has focus), "bool" (Yes/No; keys Y/N) and "text".
// Enter submits.
"use strict";

const { el, clear, api, setStatus } = CF;
let current = null;
let values = {};   // field name -> value picked so far

function fieldBox(field) {
  const name = el("div", { class: "name" }, field.name + (field.required ? " *" : ""));
  const box = el("div", { class: "form-field", dataset: { field: field.name, type: field.type } }, name);
  if (field.type === "choice" || field.type === "bool") {
    const options = field.type === "bool" ? [[true, "Yes", "Y"], [false, "No", "N"]]
      : field.options.map((o, i) => [o, String(o), i < 9 ? String(i + 1) : null]);
    const row = el("div", { class: "choices", role: "group", "aria-label": field.name });
    for (const [value, label, key] of options) {
      const button = el("button", { type: "button", class: "choice", dataset: { value: JSON.stringify(value) },
                                    "aria-pressed": "false" },
                        key ? el("span", { class: "kbd" }, key) : null, " ", label);
      button.addEventListener("click", () => pick(field, value));
      row.appendChild(button);
    }
    box.appendChild(row);
  } else {
    const input = el("input", { type: "text", id: `text-${field.name}`, "aria-label": field.name, class: "wide" });
    input.addEventListener("input", () => { values[field.name] = input.value; });
    box.appendChild(input);
  }
  return box;
}

function pick(field, value) {
  values[field.name] = value;
  const box = document.querySelector(`.form-field[data-field="${CSS.escape(field.name)}"]`);
  for (const b of box.querySelectorAll("button.choice")) {
    const on = b.dataset.value === JSON.stringify(value);
    b.classList.toggle("selected", on);
    b.setAttribute("aria-pressed", String(on));
  }
}

// The field keyboard shortcuts go to: the focused one, else the first unanswered one of `types`.
function activeField(types) {
  const fields = current.schema.fields.filter((f) => types.includes(f.type));
  const focused = document.activeElement && document.activeElement.closest(".form-field");
  if (focused) {
    const f = fields.find((x) => x.name === focused.dataset.field);
    if (f) return f;
  }
  return fields.find((f) => values[f.name] === undefined) || fields[fields.length - 1] || null;
}

async function loadNext() {
  setStatus(document.getElementById("status"), "");
  const data = await api("/api/label/next");
  CF.progressBar(document.getElementById("progress"), data.progress);
  const done = !!data.done;
  document.getElementById("item").classList.toggle("hidden", done);
  document.getElementById("label-form").classList.toggle("hidden", done);
  document.getElementById("done").classList.toggle("hidden", !done);
  if (done) { current = null; return; }
  current = data;
  values = {};
  document.getElementById("schema-name").textContent = data.schema.name;
  document.getElementById("item-text").textContent = data.item.text;
  const box = clear(document.getElementById("fields"));
  for (const f of data.schema.fields) box.appendChild(fieldBox(f));
  const first = box.querySelector("button, input");
  if (first) first.focus();
}

async function submit() {
  if (!current) return;
  const status = document.getElementById("status");
  const missing = current.schema.fields.filter((f) => f.required && (values[f.name] === undefined || values[f.name] === ""));
  if (missing.length) { setStatus(status, `Fill in: ${missing.map((f) => f.name).join(", ")}`, "error"); return; }
  const value = {};
  for (const f of current.schema.fields) if (values[f.name] !== undefined && values[f.name] !== "") value[f.name] = values[f.name];
  try {
    await api("/api/label", { body: { assignment_id: current.assignment_id, value } });
    await loadNext();
  } catch (err) {
    setStatus(status, err.message, "error");
  }
}

CF.start(async () => {
  if (!(await CF.nav("/label", ["annotator", "admin"]))) return;
  document.getElementById("label-form").addEventListener("submit", (e) => { e.preventDefault(); submit(); });
  document.addEventListener("keydown", (e) => {
    if (!current || e.target.closest("nav") || e.ctrlKey || e.metaKey || e.altKey) return;
    // Enter submits from anywhere but a textarea (on a focused option it must not re-pick it).
    if (e.key === "Enter" && e.target.tagName !== "TEXTAREA" && e.target.id !== "submit") {
      e.preventDefault();
      submit();
      return;
    }
    if (CF.typing(e)) return;
    if (/^[1-9]$/.test(e.key)) {
      const f = activeField(["choice"]);
      const i = parseInt(e.key, 10) - 1;
      if (f && i < f.options.length) { e.preventDefault(); pick(f, f.options[i]); }
    } else if (e.key === "y" || e.key === "n") {
      const f = activeField(["bool"]);
      if (f) { e.preventDefault(); pick(f, e.key === "y"); }
    }
  });
  await loadNext();
});
