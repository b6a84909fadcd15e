// steerserve playground: plain JavaScript against the server's own API (no framework, nothing external).
"use strict";

const KEY_STORE = "steerserve-key"; // sessionStorage only: the key lives as long as this tab
const $ = (id) => document.getElementById(id);
let vectors = []; // [{name, kind, layers, method}]

// ---- API ------------------------------------------------------------------------------------------------
function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const resp = await fetch(path, opts);
  if (resp.status === 401) askForKey();
  if (!resp.ok) throw new Error(await errorText(resp));
  return resp;
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    if (body && body.error) return resp.status + ": " + body.error.message;
  } catch (_) { /* not JSON */ }
  return "HTTP " + resp.status;
}

async function postJSON(path, body) {
  const resp = await api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  return resp.json();
}

// Server-sent events from a POST: the data of every event, as it arrives, to onData.
async function streamSSE(path, body, onData) {
  const resp = await api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
    body: JSON.stringify(body),
  });
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

// ---- helpers --------------------------------------------------------------------------------------------
function say(id, text, isError) {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle("error", Boolean(isError));
}

// "8-12, 15" -> [8, 9, 10, 11, 12, 15]; "" -> null (all layers)
function parseLayers(text) {
  const t = (text || "").trim();
  if (!t) return null;
  const out = [];
  for (const part of t.split(",")) {
    const m = part.trim().match(/^(\d+)(?:\s*-\s*(\d+))?$/);
    if (!m) throw new Error("layers: use numbers and ranges such as 8-12, 15");
    const lo = Number(m[1]);
    const hi = m[2] === undefined ? lo : Number(m[2]);
    for (let l = lo; l <= hi; l++) out.push(l);
  }
  return out;
}

function describeLayers(layers) {
  if (!layers.length) return "none";
  const contiguous = layers.every((l, i) => i === 0 || l === layers[i - 1] + 1);
  return contiguous && layers.length > 2 ? layers[0] + "–" + layers[layers.length - 1] : layers.join(", ");
}

function promptBody() {
  const text = $("prompt").value;
  const body = {
    max_new_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value),
  };
  if ($("as-chat").checked) body.messages = [{ role: "user", content: text }];
  else body.prompt = text;
  return body;
}

// ---- key ------------------------------------------------------------------------------------------------
function askForKey() {
  $("key-form").hidden = false;
  say("server-status", "This server needs a key.", true);
  $("api-key").focus();
}

$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(KEY_STORE, $("api-key").value);
  $("api-key").value = "";
  $("key-form").hidden = true;
  refresh();
});

// ---- vectors --------------------------------------------------------------------------------------------
function relativeCell(norms) {
  if (!norms || !norms.relative) return "–";
  const values = Object.values(norms.relative);
  const lo = Math.min(...values), hi = Math.max(...values);
  const title = Object.entries(norms.relative).map(([l, v]) => "layer " + l + ": " + v.toFixed(4)).join("\n");
  return { text: lo.toFixed(3) + (hi > lo ? "–" + hi.toFixed(3) : ""), title };
}

async function loadVectors() {
  const list = await (await api("/v1/vectors")).json();
  vectors = list.data;
  const rows = $("vector-rows");
  rows.replaceChildren();
  if (!vectors.length) {
    const tr = rows.insertRow();
    const td = tr.insertCell();
    td.colSpan = 4;
    td.className = "muted";
    td.textContent = "no vectors yet: upload one or compute one below";
  }
  for (const v of vectors.slice(0, 100)) {
    const tr = rows.insertRow();
    tr.dataset.vector = v.name;
    for (const text of [v.name, v.kind, describeLayers(v.layers), "…"]) tr.insertCell().textContent = text;
    api("/v1/vectors/" + encodeURIComponent(v.name) + "/norms")
      .then((r) => r.json())
      .then((norms) => {
        const cell = relativeCell(norms);
        const td = tr.cells[3];
        if (typeof cell === "string") td.textContent = cell;
        else { td.textContent = cell.text; td.title = cell.title; }
      })
      .catch(() => { tr.cells[3].textContent = "?"; });
  }
  fillVectorSelects();
}

function fillVectorSelects() {
  const selects = [$("sweep-vector"), ...document.querySelectorAll(".entry-vector")];
  for (const sel of selects) {
    const keep = sel.value;
    sel.replaceChildren(...vectors.map((v) => new Option(v.name + " (" + v.kind + ")", v.name)));
    if (vectors.some((v) => v.name === keep)) sel.value = keep;
  }
}

$("upload-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const form = new FormData();
  form.append("file", $("upload-file").files[0]);
  form.append("name", $("upload-name").value);
  say("vector-status", "Uploading…");
  try {
    const info = await (await api("/v1/vectors", { method: "POST", body: form })).json();
    say("vector-status", "Uploaded " + info.name + " (" + info.kind + ", sha256 " + info.sha256.slice(0, 12) + ").");
    await loadVectors();
  } catch (e) { say("vector-status", e.message, true); }
});

$("compute-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    const pairs = $("compute-pairs").value.split("\n").filter((l) => l.trim()).map((line, i) => {
      const parts = line.split("|");
      if (parts.length !== 2 || !parts[0].trim() || !parts[1].trim()) {
        throw new Error("line " + (i + 1) + ": write a pair as positive | negative");
      }
      return { positive: parts[0].trim(), negative: parts[1].trim() };
    });
    const body = { name: $("compute-name").value, method: $("compute-method").value, pairs };
    const layers = parseLayers($("compute-layers").value);
    if (layers) body.layers = layers;
    say("vector-status", "Computing from " + pairs.length + " pairs…");
    const info = await postJSON("/v1/vectors/compute", body);
    say("vector-status", "Computed " + info.name + " (" + info.method + ", layers " + describeLayers(info.layers) + ").");
    await loadVectors();
  } catch (e) { say("vector-status", e.message, true); }
});

// ---- steering entries -----------------------------------------------------------------------------------
function addEntry() {
  const li = $("entry-template").content.firstElementChild.cloneNode(true);
  const range = li.querySelector(".entry-strength-range");
  const number = li.querySelector(".entry-strength");
  range.addEventListener("input", () => { number.value = range.value; });
  number.addEventListener("input", () => { range.value = number.value; });
  li.querySelector(".entry-remove").addEventListener("click", () => li.remove());
  $("entries").append(li);
  fillVectorSelects();
}

function steeringEntries() {
  return [...document.querySelectorAll("#entries .entry")].map((li) => {
    const entry = {
      name: li.querySelector(".entry-vector").value,
      strength: Number(li.querySelector(".entry-strength").value),
      positions: li.querySelector(".entry-positions").value,
    };
    const layers = parseLayers(li.querySelector(".entry-layers").value);
    if (layers) entry.layers = layers;
    return entry;
  }).filter((e) => e.name);
}

$("add-entry").addEventListener("click", addEntry);

// ---- side by side ---------------------------------------------------------------------------------------
async function streamInto(outId, metaId, body) {
  const out = $(outId);
  out.textContent = "";
  $(metaId).textContent = "streaming…";
  try {
    await streamSSE("/generate", Object.assign({ stream: true }, body), (ev) => {
      if (ev.error) throw new Error(ev.error.message);
      out.textContent += ev.text || "";
      if (ev.finish_reason) {
        $(metaId).textContent = ev.finish_reason + ", " + ev.usage.completion_tokens + " tokens";
        out.dataset.done = "true";
      }
    });
  } catch (e) {
    $(metaId).textContent = e.message;
    out.dataset.done = "error";
  }
}

$("compare-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  let vectorsUsed;
  try { vectorsUsed = steeringEntries(); } catch (e) { $("steered-meta").textContent = e.message; return; }
  const base = promptBody();
  delete $("out-steered").dataset.done;
  delete $("out-plain").dataset.done;
  await Promise.all([
    streamInto("out-steered", "steered-meta", Object.assign({ steering: { vectors: vectorsUsed } }, base)),
    streamInto("out-plain", "plain-meta", base),
  ]);
});

// ---- sweep ----------------------------------------------------------------------------------------------
function sweepCard(row) {
  const card = document.createElement("article");
  card.className = "card";
  card.dataset.strength = String(row.strength);
  const h = document.createElement("h3");
  h.textContent = "strength " + row.strength;
  const text = document.createElement("p");
  text.className = "sweep-text";
  text.textContent = row.text;
  const meta = document.createElement("p");
  meta.className = "muted";
  meta.textContent = row.finish_reason + ", " + row.usage.completion_tokens + " tokens";
  card.append(h, text, meta);
  return card;
}

$("sweep-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const grid = $("sweep-grid");
  try {
    const strengths = $("sweep-strengths").value.split(",").map((s) => s.trim()).filter(Boolean).map(Number);
    if (strengths.some((w) => !Number.isFinite(w))) throw new Error("strengths: numbers separated by commas");
    const body = Object.assign(promptBody(), {
      vector: $("sweep-vector").value, strengths, positions: $("sweep-positions").value,
    });
    const layers = parseLayers($("sweep-layers").value);
    if (layers) body.layers = layers;
    say("sweep-status", "Running " + strengths.length + " strengths in one batch…");
    grid.replaceChildren();
    const t0 = performance.now();
    const res = await postJSON("/v1/sweep", body);
    grid.replaceChildren(...res.results.map(sweepCard));
    const s = res.steering;
    say("sweep-status", s.name + "@" + s.sha256.slice(0, 8) + " on layers " + describeLayers(s.layers) +
      ": " + res.results.length + " replies in " + ((performance.now() - t0) / 1000).toFixed(1) + " s.");
  } catch (e) { say("sweep-status", e.message, true); }
});

// ---- start ----------------------------------------------------------------------------------------------
async function refresh() {
  try {
    const models = await (await api("/v1/models")).json();
    say("server-status", "Model: " + models.data[0].id);
    await loadVectors();
  } catch (e) {
    if (!$("key-form").hidden) return;
    say("server-status", e.message, true);
  }
}

addEntry();
refresh();
