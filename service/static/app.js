// The translation page: POST /v1/translate and draw the answer, its alternatives and its attention heat map.
"use strict";

const $ = (id) => document.getElementById(id);
// A heat map of more cells than this took seconds to draw (a 514 x 534 table froze the page) and could not be read.
const MAX_HEATMAP_CELLS = 20000;
let inFlight = null; // the AbortController of the request whose answer the page waits for

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("result").hidden = true; // the previous text's translation is no answer to this one
}

function setBusy(busy) {
  $("status").textContent = busy ? "translating…" : "";
  $("result").classList.toggle("stale", busy); // the last answer stays readable, but not as this text's
  $("form").setAttribute("aria-busy", String(busy));
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (_) { /* not JSON: fall through */ }
  return `${response.status} ${response.statusText || "error"}`;
}

function drawHeatmap(alignment, note) {
  const table = $("heatmap");
  table.replaceChildren();
  const cells = alignment ? alignment.weights.length * alignment.source.length : 0;
  if (!cells || cells > MAX_HEATMAP_CELLS) {
    $("heatmap-note").textContent = note || (cells
      ? `no heat map: ${alignment.weights.length} x ${alignment.source.length} pieces are too many to draw; ` +
        "translate a shorter text to see its attention"
      : "no attention weights for this translation");
    $("heatmap-note").hidden = false;
    return;
  }
  $("heatmap-note").hidden = true;
  table.createCaption().textContent =
    "Attention weights in percent: rows are target pieces, columns source pieces";
  const head = table.createTHead().insertRow();
  head.appendChild(document.createElement("th"));
  for (const piece of alignment.source) {
    const th = document.createElement("th");
    th.textContent = piece;
    th.scope = "col";
    head.appendChild(th);
  }
  const body = table.createTBody();
  alignment.weights.forEach((row, t) => {
    const tr = body.insertRow();
    const th = document.createElement("th");
    th.textContent = alignment.target[t];
    th.scope = "row";
    tr.appendChild(th);
    row.forEach((weight, s) => {
      const td = tr.insertCell();
      td.style.backgroundColor = `rgba(25, 80, 160, ${weight.toFixed(3)})`;
      td.title = `${alignment.target[t]} ← ${alignment.source[s]}: ${weight.toFixed(3)}`;
      td.dataset.weight = weight.toFixed(4);
      // The weight as a percentage in the cell, not in colour alone: screen readers read it with the cell's row and
      // column headers, and "show weights as numbers" makes it visible.
      td.textContent = String(Math.round(weight * 100));
      if (weight > 0.5) td.classList.add("dark");
    });
  });
}

function showResult(data, note) {
  const best = data.translations[0];
  $("translation").textContent = best.text;
  $("score").textContent = best.score === null ? "n/a" : best.score.toFixed(3);
  $("elapsed").textContent = data.elapsed_ms.toFixed(0);
  const list = $("alternatives");
  list.replaceChildren();
  for (const alt of best.alternatives) {
    const li = document.createElement("li");
    li.textContent = `${alt.text} (${alt.score === null ? "n/a" : alt.score.toFixed(3)})`;
    list.appendChild(li);
  }
  $("alternatives-box").hidden = best.alternatives.length === 0;
  drawHeatmap(best.alignment, note);
  $("result").hidden = false;
}

async function refusesAlignment(response) {
  try {
    const body = await response.json();
    return body.error.fields.some((field) => field.field === "return_alignment");
  } catch (_) {
    return false;
  }
}

function fitNBest() {
  // n-best beyond the beam size cannot be had: say so in the field rather than send fewer silently.
  const beam = Number($("beam").value);
  if (beam >= 1) {
    $("nbest").max = String(Math.min(beam, 16));
    if (Number($("nbest").value) > beam) $("nbest").value = String(beam);
  }
}

async function translate(event) {
  event.preventDefault();
  $("error").hidden = true;
  if (!$("source").value.trim()) {
    showError("Type a text to translate.");
    return;
  }
  fitNBest();
  const beam = Number($("beam").value);
  const payload = {
    text: $("source").value,
    beam_size: beam,
    n_best: Math.max(1, Number($("nbest").value)),
    return_alignment: true,
  };
  const headers = { "Content-Type": "application/json" };
  if ($("apikey").value) headers["X-API-Key"] = $("apikey").value;
  // A new request replaces the one under way (Ctrl+Enter twice, a change of text): only the latest is shown.
  if (inFlight) inFlight.abort();
  const request = new AbortController();
  inFlight = request;
  const post = (body) => fetch("/v1/translate", {
    method: "POST", headers, body: JSON.stringify(body), signal: request.signal,
  });
  setBusy(true);
  try {
    let response = await post(payload);
    let note = null;
    if (response.status === 413 && await refusesAlignment(response.clone())) {
      // Too long a text for its attention matrix (NMT_MAX_ALIGNMENT_CELLS): translate it without one.
      note = "no heat map: this text is too long for the service to return its attention weights";
      response = await post({ ...payload, return_alignment: false });
    }
    const data = response.ok ? await response.json() : await errorMessage(response);
    if (request !== inFlight) return;
    if (!response.ok) showError(data);
    else showResult(data, note);
  } catch (err) {
    if (request === inFlight) showError(`Could not reach the translation service: ${err.message}`);
  } finally {
    if (request === inFlight) {
      inFlight = null;
      setBusy(false);
    }
  }
}

async function loadModelInfo() {
  try {
    const response = await fetch("/v1/models");
    if (!response.ok) throw new Error(await errorMessage(response));
    const model = (await response.json()).models[0];
    $("model-info").textContent = `${model.id}: ${model.src_lang} → ${model.tgt_lang}`;
    $("beam").value = model.decode ? model.decode.beam_size : 5;
    $("translation").lang = model.tgt_lang || "";
  } catch (err) {
    $("model-info").textContent = `model information unavailable (${err.message})`;
  }
}

$("form").addEventListener("submit", translate);
$("beam").addEventListener("change", fitNBest);
$("numbers").addEventListener("change", () => $("heatmap").classList.toggle("numbers", $("numbers").checked));
$("source").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("form").requestSubmit();
});
loadModelInfo();
