// diffusereg watch: shows the session that the server streams (server-sent events, /events) and
// sends the controls to its JSON API. No libraries, nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const PICTURES = ["fixed", "moving", "warped", "difference", "jacobian", "sample_spread"];
const ROLES = ["fixed", "moving", "fixed_labels", "moving_labels"];
const ACTIVE = ["running", "stopping"];
let settingsShown = false;   // the sampling numbers are taken from the server once
let guidanceShown = null;    // the guidance last shown, as the server reported it
let labelsShown = null;      // the organ choices last built
let requestError = "";       // the message of the last failed request

// ------------------------------------------------------------------ requests
async function send(method, path, body, contentType) {
  const response = await fetch(path, {method, headers: {"Content-Type": contentType}, body});
  const reply = await response.json();
  if (!response.ok) throw new Error(reply.error || response.statusText);
  return reply;
}

const post = (path, data) => send("POST", path, JSON.stringify(data || {}), "application/json");

function act(task) {
  task().then(() => { requestError = ""; showMessage(""); },
              (error) => { requestError = error.message; showMessage(""); });
}

function guidance() {
  const specs = [];
  for (const kind of ["smoothness", "similarity"]) {
    if ($(`${kind}-on`).checked) specs.push(`${kind}=${$(`${kind}-scale`).value}`);
  }
  if ($("folds-on").checked) specs.push("folds");
  for (const box of document.querySelectorAll("#organs input:checked")) {
    specs.push(`organ=${box.value}:${$("organ-scale").value}`);
  }
  return specs;
}

async function loadFiles() {
  const chosen = ROLES.filter((role) => $(`file-${role}`).files.length > 0);
  if (!chosen.includes("fixed") || !chosen.includes("moving")) throw new Error("choose a fixed and a moving image");
  const numbers = {};
  for (const role of chosen) {
    const file = $(`file-${role}`).files[0];
    const path = `/api/upload?name=${encodeURIComponent(file.name)}`;
    const reply = await send("PUT", path, file, "application/octet-stream");
    numbers[role] = reply.upload;
  }
  await post("/api/load", numbers);
}

// ------------------------------------------------------------------ showing the session
function showMessage(message) {
  const text = requestError || message;
  $("message").textContent = text;
  $("message").hidden = !text;
}

function setValue(id, value) {
  if (document.activeElement !== $(id)) $(id).value = value;
}

function showLabels(labels) {
  const key = JSON.stringify(labels);
  if (key === labelsShown) return;
  labelsShown = key;
  const organs = $("organs");
  organs.replaceChildren();
  if (labels.length === 0) organs.textContent = "no label maps";
  for (const label of labels) {
    const box = Object.assign(document.createElement("input"), {type: "checkbox", value: String(label.value)});
    box.addEventListener("change", () => act(() => post("/api/guidance", {guidance: guidance()})));
    const item = document.createElement("label");
    item.append(box, ` ${label.name}`);
    organs.append(item);
  }
  guidanceShown = null;  // tick the new boxes from the server's guidance
}

function showGuidance(specs) {
  const key = JSON.stringify(specs);
  if (key === guidanceShown) return;
  guidanceShown = key;
  const parsed = specs.map((text) => text.split("="));
  for (const kind of ["smoothness", "similarity"]) {
    const spec = parsed.find(([name]) => name === kind);
    $(`${kind}-on`).checked = Boolean(spec);
    if (spec) setValue(`${kind}-scale`, spec[1]);
  }
  $("folds-on").checked = specs.includes("folds");
  const organs = parsed.filter(([name]) => name === "organ").map(([, value]) => value.split(":"));
  if (organs.length > 0) setValue("organ-scale", organs[0][1]);
  for (const box of document.querySelectorAll("#organs input")) {
    box.checked = organs.some(([label]) => label === box.value);
  }
}

function row(cells, header) {
  const tr = document.createElement("tr");
  for (const cell of cells) tr.append(Object.assign(document.createElement(header ? "th" : "td"), {textContent: cell}));
  return tr;
}

function showMetrics(s) {
  const table = $("metrics");
  table.replaceChildren();
  if (!s.metrics) return;
  const number = (value, digits) => (value === undefined ? "–" : value.toFixed(digits));
  table.append(row(["live, model grid", "before", `step ${s.step}`], true));
  table.append(row(["NJD %", number(s.metrics_before.NJD_percent, 2), number(s.metrics.NJD_percent, 2)]));
  for (const [name, value] of Object.entries(s.metrics.dice || {})) {
    table.append(row([`Dice ${name}`, number(s.metrics_before.dice[name], 3), number(value, 3)]));
  }
}

function describeResult(result) {
  if (!result) return "";
  let text = "Written result, on the fixed image's own grid (metrics.json; the live table above is on the " +
             `resampled, cropped model grid, so its Dice differs): ${result.steps_run} of ${result.steps} steps in ` +
             `${result.time_seconds.toFixed(1)} s, NJD ${result.NJD_percent.toFixed(2)} %`;
  if (result.dice_after) {
    text += ", Dice " + Object.entries(result.dice_after)
      .map(([name, value]) => `${name} ${result.dice_before[name].toFixed(3)} → ${value.toFixed(3)}`).join(", ");
  }
  return text + ".";
}

function render(s) {
  const active = ACTIVE.includes(s.status);
  $("model").textContent = `model: ${s.model}`;
  $("status").textContent = s.status;
  $("status").className = `status ${s.status}`;
  $("step").textContent = s.step === null ? "step –" : `step ${s.step} / ${s.settings.steps}`;
  $("step").dataset.step = s.step === null ? "" : String(s.step);
  if (!settingsShown) {
    for (const name of ["steps", "seed", "samples"]) $(name).value = s.settings[name];
    settingsShown = true;
  }
  $("register").disabled = active || !s.inputs;
  $("stop").disabled = s.status !== "running";
  $("load").disabled = active;
  $("phantom").disabled = active;
  $("inputs").textContent = s.inputs
    ? `${s.inputs.moving} → ${s.inputs.fixed}` +
      (s.inputs.fixed_labels ? ` (labels ${s.inputs.moving_labels} → ${s.inputs.fixed_labels})` : " (no labels)") +
      `; model grid ${s.inputs.model_grid}`
    : "none loaded";
  showLabels(s.labels);
  showGuidance(s.guidance);
  $("slice").max = String(Math.max(s.slices - 1, 0));
  setValue("slice", s.slice);
  $("slice-number").textContent = s.slices ? `${s.slice + 1} / ${s.slices}` : "–";
  for (const name of PICTURES) {
    if (s.pictures[name]) $(`picture-${name}`).src = s.pictures[name];
  }
  $("spread-figure").hidden = !s.pictures.sample_spread;
  if (s.sample_spread_max_mm !== null) $("spread-max").textContent = s.sample_spread_max_mm.toFixed(2);
  showMetrics(s);
  $("download").classList.toggle("disabled", !s.download);
  $("download").setAttribute("aria-disabled", String(!s.download));
  $("result").textContent = describeResult(s.result);
  showMessage(s.message);
}

// ------------------------------------------------------------------ wiring
const events = new EventSource("/events");
events.onmessage = (event) => render(JSON.parse(event.data));
events.onerror = () => {
  $("status").textContent = "disconnected";
  $("status").className = "status failed";
};

$("load").addEventListener("click", () => act(loadFiles));
$("phantom").addEventListener("click", () => act(() => post("/api/load", {phantom: true})));
$("register").addEventListener("click", () => act(() => post("/api/register", {
  steps: Number($("steps").value), seed: Number($("seed").value), samples: Number($("samples").value),
  guidance: guidance(),
})));
$("stop").addEventListener("click", () => act(() => post("/api/stop")));
for (const id of ["smoothness-on", "smoothness-scale", "similarity-on", "similarity-scale", "folds-on", "organ-scale"]) {
  $(id).addEventListener("change", () => act(() => post("/api/guidance", {guidance: guidance()})));
}
$("slice").addEventListener("input", () => act(() => post("/api/slice", {slice: Number($("slice").value)})));
