// Admin page: users, datasets (import), label schemas, response generation, assignments,
// progress + inter-annotator agreement, and export downloads.
"use strict";

const { el, clear, api, setStatus } = CF;
const data = { users: [], roles: [], datasets: [], schemas: [], models: [] };

function fillSelect(select, items, label, keep = true) {
  const old = select.value;
  clear(select);
  for (const it of items) select.appendChild(el("option", { value: String(it.id) }, label(it)));
  if (keep && [...select.options].some((o) => o.value === old)) select.value = old;
}

// Run `fn` for a form; show its error (or `ok(result)`) in the status line.
function handle(formId, statusId, fn, ok) {
  document.getElementById(formId).addEventListener("submit", async (e) => {
    e.preventDefault();
    const status = document.getElementById(statusId);
    const button = e.target.querySelector("button[type=submit]");
    setStatus(status, "working…");
    button.disabled = true;
    try {
      const result = await fn();
      setStatus(status, ok(result), "ok");
    } catch (err) {
      setStatus(status, err.message, "error");
    } finally {
      button.disabled = false;
    }
  });
}

async function loadUsers() {
  const { users, roles } = await api("/api/admin/users");
  data.users = users;
  data.roles = roles;
  const body = clear(document.getElementById("users"));
  for (const u of users) {
    const select = el("select", { "aria-label": `Role of ${u.username}`, dataset: { user: u.username } },
                      roles.map((r) => el("option", { value: r, selected: r === u.role }, r)));
    select.value = u.role;
    select.addEventListener("change", async () => {
      const status = document.getElementById("users-status");
      try {
        await api(`/api/admin/users/${encodeURIComponent(u.username)}/role`, { body: { role: select.value } });
        setStatus(status, `${u.username} is now ${select.value}`, "ok");
        await loadUsers();
      } catch (err) {
        setStatus(status, err.message, "error");
      }
    });
    body.appendChild(el("tr", {}, el("td", {}, u.username), el("td", {}, select)));
  }
  const roleSelect = document.getElementById("new-role");
  if (!roleSelect.options.length) for (const r of roles) roleSelect.appendChild(el("option", { value: r, selected: r === "reviewer" }, r));
  const box = clear(document.getElementById("assign-users"));
  for (const u of users) {
    box.appendChild(el("label", { class: "check" },
      el("input", { type: "checkbox", value: u.username, class: "assign-user", dataset: { role: u.role } }),
      `${u.username} (${u.role})`));
  }
  syncAssign();
}

// The schema picker is for label tasks only; preselect who can do the task: reviewers rate and
// rank, annotators label.
function syncAssign() {
  const kind = document.getElementById("assign-kind").value;
  document.getElementById("assign-schema-field").classList.toggle("hidden", kind !== "label");
  const role = kind === "label" ? "annotator" : "reviewer";
  for (const box of document.querySelectorAll(".assign-user")) box.checked = box.dataset.role === role;
}

async function loadDatasets() {
  const { datasets } = await api("/api/admin/datasets");
  data.datasets = datasets;
  const body = clear(document.getElementById("datasets"));
  for (const d of datasets) {
    body.appendChild(el("tr", {}, el("td", { class: "num" }, String(d.id)), el("td", {}, d.name), el("td", {}, d.kind),
                        el("td", { class: "num" }, String(d.count))));
  }
  if (!datasets.length) body.appendChild(el("tr", {}, el("td", { colspan: "4", class: "muted" }, "No datasets yet.")));
  fillSelect(document.getElementById("gen-dataset"), datasets.filter((d) => d.kind === "prompts"), (d) => `${d.id}: ${d.name}`);
  fillSelect(document.getElementById("assign-dataset"), datasets, (d) => `${d.id}: ${d.name} (${d.kind})`);
}

async function loadSchemas() {
  const { schemas } = await api("/api/admin/schemas");
  data.schemas = schemas;
  const body = clear(document.getElementById("schemas"));
  for (const s of schemas) {
    const fields = (s.fields || []).map((f) => `${f.name}: ${f.type}${f.options ? " [" + f.options.join(", ") + "]" : ""}`).join("; ");
    body.appendChild(el("tr", {}, el("td", { class: "num" }, String(s.id)), el("td", {}, s.name), el("td", {}, fields)));
  }
  fillSelect(document.getElementById("assign-schema"), schemas, (s) => `${s.id}: ${s.name}`);
}

function fmt(value) {
  return typeof value === "number" ? (Number.isInteger(value) ? String(value) : value.toFixed(3)) : String(value);
}

// {"rate": {"fluency": 0.61}, "n_units": 4} -> [["rate.fluency", 0.61], ["n_units", 4]]
function flatten(obj, prefix = "") {
  const out = [];
  for (const [k, v] of Object.entries(obj || {})) {
    const key = prefix ? `${prefix}.${k}` : k;
    if (v !== null && typeof v === "object" && !Array.isArray(v)) out.push(...flatten(v, key));
    else out.push([key, v]);
  }
  return out;
}

async function loadProgress() {
  const { progress, agreement } = await api("/api/admin/progress");
  const body = clear(document.getElementById("progress"));
  for (const p of progress) {
    body.appendChild(el("tr", {}, el("td", {}, p.dataset), el("td", {}, p.kind), el("td", {}, p.username),
                        el("td", { class: "num" }, String(p.done)), el("td", { class: "num" }, String(p.total))));
  }
  if (!progress.length) body.appendChild(el("tr", {}, el("td", { colspan: "5", class: "muted" }, "Nothing assigned yet.")));
  const names = new Map(data.datasets.map((d) => [String(d.id), d.name]));
  const ag = clear(document.getElementById("agreement"));
  for (const [id, metrics] of Object.entries(agreement)) {
    // Only the coefficients: ids and names are in the first column, unit counts in the last.
    const units = metrics.n_units || {};
    for (const section of ["rate", "rank", "label"]) {
      if (!metrics[section]) continue;
      for (const [key, value] of flatten(metrics[section], section)) {
        ag.appendChild(el("tr", {}, el("td", {}, names.get(id) || metrics.dataset || id), el("td", {}, key),
                          el("td", { class: "num" }, value === null ? "undefined (no variation)" : fmt(value)),
                          el("td", { class: "num" }, String(units[section] ?? ""))));
      }
    }
  }
  if (!ag.children.length) ag.appendChild(el("tr", {}, el("td", { colspan: "4", class: "muted" }, "No agreement yet: it needs two raters on the same items.")));
}

function setupExports() {
  const box = clear(document.getElementById("exports"));
  for (const kind of ["preferences", "sft", "labels", "ratings"]) {
    box.appendChild(el("a", { class: "button", href: `/api/admin/export?kind=${kind}`, download: `${kind}.jsonl`,
                              id: `export-${kind}` }, `${kind}.jsonl`));
  }
}

async function setupModels() {
  const { models, default: def } = await api("/api/models");
  data.models = models;
  const box = clear(document.getElementById("gen-models"));
  for (const m of models) {
    box.appendChild(el("label", { class: "check" },
      el("input", { type: "checkbox", value: m.id, class: "gen-model", checked: m.id === def || models.length <= 3 }),
      `${m.id} (${m.version})`));
  }
}

CF.start(async () => {
  if (!(await CF.nav("/admin", ["admin"]))) return;
  setupExports();

  handle("user-form", "users-status", async () => {
    const user = await api("/api/admin/users", { body: {
      username: document.getElementById("new-username").value,
      password: document.getElementById("new-password").value,
      role: document.getElementById("new-role").value,
    } });
    document.getElementById("new-username").value = "";
    document.getElementById("new-password").value = "";
    await loadUsers();
    return user;
  }, (u) => `added ${u.username} (${u.role})`);

  document.getElementById("dataset-file").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (!file) return;
    // Read in the browser and send as text: the server only ever takes JSON.
    document.getElementById("dataset-jsonl").value = await file.text();
    const name = document.getElementById("dataset-name");
    if (!name.value) name.value = file.name.replace(/\.[^.]*$/, "");
  });
  handle("dataset-form", "datasets-status", async () => {
    const result = await api("/api/admin/datasets", { body: {
      name: document.getElementById("dataset-name").value,
      kind: document.getElementById("dataset-kind").value,
      jsonl: document.getElementById("dataset-jsonl").value,
    } });
    document.getElementById("dataset-jsonl").value = "";
    await loadDatasets();
    return result;
  }, (r) => `imported ${r.count} rows as dataset ${r.id}`);

  handle("schema-form", "schemas-status", async () => {
    let fields;
    try {
      fields = JSON.parse(document.getElementById("schema-fields").value);
    } catch (err) {
      throw new Error(`fields: not valid JSON: ${err.message}`);
    }
    const result = await api("/api/admin/schemas", { body: { name: document.getElementById("schema-name").value, fields } });
    await loadSchemas();
    return result;
  }, (r) => `created schema ${r.id}`);

  handle("generate-form", "generate-status", async () => {
    const models = [...document.querySelectorAll(".gen-model:checked")].map((c) => c.value);
    return api("/api/admin/responses", { body: {
      dataset_id: parseInt(document.getElementById("gen-dataset").value, 10),
      models,
      per_model: parseInt(document.getElementById("gen-per-model").value, 10),
      max_tokens: parseInt(document.getElementById("gen-max-tokens").value, 10),
    } });
  }, (r) => {
    const total = Object.values(r.generated).reduce((a, b) => a + b, 0);
    const made = Object.entries(r.generated).map(([m, n]) => `${m}: ${n}`).join(", ");
    return (total ? `generated ${made}` : "nothing to generate: every prompt has its responses already") +
           (r.skipped.length ? `; skipped ${r.skipped.length}: ${r.skipped[0].reason}` : "");
  });

  const kind = document.getElementById("assign-kind");
  kind.addEventListener("change", syncAssign);
  syncAssign();
  handle("assign-form", "assign-status", async () => {
    const body = {
      dataset_id: parseInt(document.getElementById("assign-dataset").value, 10),
      kind: kind.value,
      usernames: [...document.querySelectorAll(".assign-user:checked")].map((c) => c.value),
      overlap: parseInt(document.getElementById("assign-overlap").value, 10),
    };
    if (kind.value === "label") body.schema_id = parseInt(document.getElementById("assign-schema").value, 10);
    const result = await api("/api/admin/assign", { body });
    await loadProgress();
    return result;
  }, (r) => `assigned ${r.assigned} tasks`);

  document.getElementById("refresh").addEventListener("click", () => loadProgress().catch((err) => console.error(err)));

  // Forms work from the start; the tables fill in as their data arrives.
  await Promise.all([loadUsers(), loadDatasets(), loadSchemas(), setupModels()]);
  await loadProgress();
});
