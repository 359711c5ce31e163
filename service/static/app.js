// The translation page: POST /v1/translate and draw the answer, its alternatives and its attention heat map.
"use strict";

const $ = (id) => document.getElementById(id);
// A heat map of more cells than this took seconds to draw (a 514 x 534 table froze the page) and could not be read.
const MAX_HEATMAP_CELLS = 20000;
const WORD_START = "\u2581"; // SentencePiece's mark of a piece that begins a word
// The service's limits (GET /v1/models), until it has said: its defaults.
let limits = { max_chars: 2000, max_beam_size: 16, request_timeout_s: 30 };
let inFlight = null; // the request whose answer the page waits for: {controller, body}
let beamChosen = false; // whether the user has typed a beam size

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("status").textContent = "";
  $("result").hidden = true; // the previous text's translation is no answer to this one
}

function setBusy(busy) {
  $("status").textContent = busy ? "translating…" : "";
  $("result").classList.toggle("stale", busy); // the last answer stays readable, but not as this text's
  $("form").setAttribute("aria-busy", String(busy));
}

function cancelInFlight() {
  if (!inFlight) return;
  inFlight.controller.abort();
  inFlight = null;
  setBusy(false);
}

// The service's own message, with what to do about it in the page's words where the page can help.
async function errorMessage(response) {
  let message = response.statusText || "error";
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: the status line says what there is */ }
  if (response.status === 401) {
    return apiKey() ? "The API key was not accepted: check the “API key” field."
      : "This service needs an API key: enter it in the “API key” field.";
  }
  if (response.status === 429) {
    const wait = response.headers.get("Retry-After");
    return `Too many requests for now: try again${wait ? ` in ${wait} s` : " shortly"}.`;
  }
  if (response.status === 503) return `The service is busy or starting: try again shortly (${message}).`;
  if (response.status === 504) return "The translation took too long: try a shorter text.";
  return `${message} (HTTP ${response.status})`;
}

// A piece as shown: the word-start mark dropped (a screen reader reads it as "lower one eighth block") and the end
// of sentence named.
function pieceText(piece) {
  if (piece === "</s>") return "(end)";
  return piece.startsWith(WORD_START) ? piece.slice(WORD_START.length) || "␣" : piece;
}

// A header cell for a piece: its text, and words told apart by a class instead of the mark.
function pieceCell(cell, piece) {
  cell.textContent = pieceText(piece);
  if (piece === "</s>") cell.title = "end of sentence";
  else if (piece.startsWith(WORD_START)) cell.classList.add("word");
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
    pieceCell(th, piece);
    th.scope = "col";
    head.appendChild(th);
  }
  const body = table.createTBody();
  alignment.weights.forEach((row, t) => {
    const tr = body.insertRow();
    const th = document.createElement("th");
    pieceCell(th, alignment.target[t]);
    th.scope = "row";
    tr.appendChild(th);
    row.forEach((weight, s) => {
      const td = tr.insertCell();
      td.style.backgroundColor = `rgba(25, 80, 160, ${weight.toFixed(3)})`;
      td.title = `${pieceText(alignment.target[t])} ← ${pieceText(alignment.source[s])}: ${weight.toFixed(3)}`;
      td.dataset.weight = weight.toFixed(4);
      // The weight as a percentage in the cell, not in colour alone: screen readers read it with the cell's row and
      // column headers, and "show weights as numbers" makes it visible. Black text on lighter cells and white on
      // darker ones both keep 4.5:1 contrast with this colour only when they change over at 0.78.
      td.textContent = String(Math.round(weight * 100));
      if (weight > 0.78) td.classList.add("dark");
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
  // Announced by the status region: a live region that appears already filled is not read out.
  const alternatives = best.alternatives.length;
  $("status").textContent = `Translated${alternatives ? `, with ${alternatives} alternative(s)` : ""}.`;
}

async function refusesAlignment(response) {
  try {
    const body = await response.json();
    return body.error.fields.some((field) => field.field === "return_alignment");
  } catch (_) {
    return false;
  }
}

// A whole number from 1 to max in a number field, else null.
function wholeNumber(id, max) {
  const value = Number($(id).value);
  return $(id).value.trim() !== "" && Number.isInteger(value) && value >= 1 && value <= max ? value : null;
}

function fitNBest() {
  // n-best beyond the beam size cannot be had: say so in the field rather than send fewer silently.
  const beam = wholeNumber("beam", limits.max_beam_size);
  if (beam === null) return;
  $("nbest").max = String(beam);
  if (Number($("nbest").value) > beam) $("nbest").value = String(beam);
}

function countCharacters() {
  const count = [...$("source").value].length; // code points, as the service counts them
  $("count").textContent = `${count} / ${limits.max_chars} characters`;
  $("count").classList.toggle("over", count > limits.max_chars);
  return count;
}

// The key as typed, without the spaces a paste may bring at its ends (no key has spaces).
const apiKey = () => $("apikey").value.trim();

// What is wrong with the form, in the words of its labels; null when it can be sent.
function formProblem() {
  // Nothing to read: blank, or only control and invisible characters (zero-width spaces), which come back empty.
  if (/^[\s\p{Cc}\p{Cf}]*$/u.test($("source").value)) return ["source", "Type a text to translate."];
  const count = countCharacters();
  if (count > limits.max_chars) {
    return ["source", `The text has ${count} characters, more than the ${limits.max_chars} the service takes: ` +
      "shorten it or translate it in parts."];
  }
  const beam = wholeNumber("beam", limits.max_beam_size);
  if (beam === null) return ["beam", `Beam size must be a whole number from 1 to ${limits.max_beam_size}.`];
  if (wholeNumber("nbest", beam) === null) {
    return ["nbest", `Translations (n-best) must be a whole number from 1 to the beam size (${beam}).`];
  }
  // The service's keys are visible ASCII (NMT_API_KEYS): a key with anything else cannot match, and fetch
  // refuses to send what is not Latin-1 at all.
  const foreign = [...apiKey()].find((c) => c < "!" || c > "~");
  if (foreign) {
    const code = foreign.codePointAt(0).toString(16).toUpperCase().padStart(4, "0");
    return ["apikey", `The API key holds U+${code}, which no key of this service has (keys are ASCII letters, ` +
      "digits and punctuation), as a pasted key may: type it again in the “API key” field."];
  }
  return null;
}

// What each field's description is when it is valid (the error message is added while it is not).
const DESCRIBED_BY = { source: "count", beam: "", nbest: "", apikey: "" };

function markInvalid(field) {
  for (const [id, description] of Object.entries(DESCRIBED_BY)) {
    const invalid = id === field;
    const describedBy = [description, invalid ? "error" : ""].filter(Boolean).join(" ");
    if (invalid) $(id).setAttribute("aria-invalid", "true");
    else $(id).removeAttribute("aria-invalid");
    if (describedBy) $(id).setAttribute("aria-describedby", describedBy);
    else $(id).removeAttribute("aria-describedby");
  }
}

async function translate(event) {
  event.preventDefault();
  $("error").hidden = true;
  fitNBest();
  const problem = formProblem();
  markInvalid(problem && problem[0]);
  if (problem) {
    cancelInFlight(); // its answer, arriving later, would stand under this error as if it were this text's
    showError(problem[1]);
    $(problem[0]).focus();
    return;
  }
  const payload = {
    text: $("source").value,
    beam_size: Number($("beam").value),
    n_best: Number($("nbest").value),
    return_alignment: true,
  };
  const body = JSON.stringify(payload);
  const sent = body + apiKey(); // a changed key is another request
  if (inFlight && inFlight.body === sent) return; // the same request again (a second click): its answer is coming
  const headers = { "Content-Type": "application/json" };
  if (apiKey()) headers["X-API-Key"] = apiKey();
  // A new request replaces the one under way (the text or options changed): only the latest is shown.
  cancelInFlight();
  const request = { controller: new AbortController(), body: sent };
  inFlight = request;
  // The service answers within its deadline (504 past it); one that does not answer at all is given up on.
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    request.controller.abort();
  }, (limits.request_timeout_s + 15) * 1000);
  const post = (json) => fetch("/v1/translate", {
    method: "POST", headers, body: json, signal: request.controller.signal,
  });
  setBusy(true);
  try {
    let response = await post(body);
    let note = null;
    if (response.status === 413 && await refusesAlignment(response.clone())) {
      // Too long a text for its attention matrix (NMT_MAX_ALIGNMENT_CELLS): translate it without one.
      note = "no heat map: this text is too long for the service to return its attention weights";
      response = await post(JSON.stringify({ ...payload, return_alignment: false }));
    }
    const data = response.ok ? await response.json() : await errorMessage(response);
    if (request !== inFlight) return;
    inFlight = null;
    setBusy(false);
    if (!response.ok) showError(data);
    else showResult(data, note);
    if (response.ok && !$("model-info").dataset.loaded) loadModelInfo(); // it failed before: the service is back
  } catch (err) {
    if (request !== inFlight) return;
    inFlight = null;
    setBusy(false);
    showError(timedOut
      ? `The translation service did not answer within ${limits.request_timeout_s + 15} s: try again later.`
      : "Could not reach the translation service: check that it is running, then try again.");
  } finally {
    clearTimeout(timer);
  }
}

async function loadModelInfo() {
  try {
    const response = await fetch("/v1/models");
    if (!response.ok) throw new Error(await errorMessage(response));
    const answer = await response.json();
    const model = answer.models[0];
    limits = { ...limits, ...answer.limits };
    $("model-info").textContent = `${model.id}: ${model.src_lang} → ${model.tgt_lang}`;
    $("model-info").dataset.loaded = "true";
    $("beam").max = String(limits.max_beam_size);
    // The model's default, unless the user chose a beam size already (before this answer, or before it failed).
    if (!beamChosen) $("beam").value = model.decode ? model.decode.beam_size : 5;
    fitNBest();
    $("source").lang = model.src_lang || "";
    $("translation").lang = model.tgt_lang || "";
    countCharacters();
  } catch (err) {
    $("model-info").textContent = `model information unavailable (${err.message})`;
  }
}

// The API key lasts as long as the tab: not typed again after a reload, forgotten when the tab is closed.
const KEY_STORE = "rnnsearch.apikey";
try {
  $("apikey").value = sessionStorage.getItem(KEY_STORE) || "";
  $("apikey").addEventListener("input", () => sessionStorage.setItem(KEY_STORE, $("apikey").value));
} catch (err) {
  // Storage refused (a browser setting): the key is then typed after each reload, as before.
}

$("form").addEventListener("submit", translate);
$("beam").addEventListener("change", fitNBest);
$("beam").addEventListener("input", () => { beamChosen = true; });
$("source").addEventListener("input", countCharacters);
$("numbers").addEventListener("change", () => $("heatmap").classList.toggle("numbers", $("numbers").checked));
$("source").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("form").requestSubmit();
});
countCharacters();
loadModelInfo();
