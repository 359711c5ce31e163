// The translation page: POST /v1/translate and draw the answer, its alternatives and its attention heat map.
"use strict";

const $ = (id) => document.getElementById(id);

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("result").hidden = true; // the previous text's translation is no answer to this one
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
  if (!alignment || !alignment.weights.length) {
    table.insertRow().insertCell().textContent = note || "no attention weights for this translation";
    return;
  }
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

async function translate(event) {
  event.preventDefault();
  $("error").hidden = true;
  const beam = Number($("beam").value);
  const payload = {
    text: $("source").value,
    beam_size: beam,
    n_best: Math.max(1, Math.min(Number($("nbest").value), beam)),
    return_alignment: true,
  };
  const headers = { "Content-Type": "application/json" };
  if ($("apikey").value) headers["X-API-Key"] = $("apikey").value;
  $("translate").disabled = true;
  const post = (body) => fetch("/v1/translate", { method: "POST", headers, body: JSON.stringify(body) });
  try {
    let response = await post(payload);
    let note = null;
    if (response.status === 413 && await refusesAlignment(response.clone())) {
      // Too long a text for its attention matrix (NMT_MAX_ALIGNMENT_CELLS): translate it without one.
      note = "no heat map: this text is too long for the service to return its attention weights";
      response = await post({ ...payload, return_alignment: false });
    }
    if (!response.ok) {
      showError(await errorMessage(response));
      return;
    }
    showResult(await response.json(), note);
  } catch (err) {
    showError(`Could not reach the translation service: ${err.message}`);
  } finally {
    $("translate").disabled = false;
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
$("source").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("form").requestSubmit();
});
loadModelInfo();
