// The demo page: one request to POST /v1/chat/completions (stream: true) per Run. The content deltas
// are appended as they arrive; the final chunk's `ofa` field (the task endpoint's body) gives the
// boxes, probabilities and images drawn below. Same-origin only: no libraries, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const LABELS = {
  instruction: "Instruction",
  question: "Question",
  text: "Text",
  text1: "Premise (text1)",
  text2: "Hypothesis (text2)",
  caption: "Caption",
  answer: "Answer to check",
  candidates: "Candidates (optional, comma-separated: a closed answer set)",
};
const FACTS = [
  ["Caption", "caption"],
  ["Answer", "answer"],
  ["Filled text", "filled_text"],
  ["Probability", "probability"],
  ["Probabilities", "probabilities"],
  ["Box", "box"],
  ["Score", "score"],
  ["Not a valid answer", "parse_error"],
];
const COLORS = ["#d7263d", "#1b998b", "#2e86ab", "#f49d37", "#8f2d56", "#3a5a40"];

const state = { model: null, tasks: new Map(), image: null, size: null, drag: null };

function task() {
  return state.tasks.get($("task").value) || null;
}

function fieldNames(t) {
  const names = t ? [...t.fields] : ["instruction"];
  if (!t || t.output === "answer") names.push("candidates"); // tasks whose decoding takes a closed set
  return names;
}

/** Inputs for the chosen task's fields: a text box each, four numbers for a region. */
function renderFields() {
  const t = task();
  const fields = $("fields");
  fields.replaceChildren();
  $("template").textContent = t
    ? `The model reads: “${t.template.trim()}”`
    : "Any instruction in words; the answer is shown as the model writes it.";
  for (const name of fieldNames(t)) {
    if (name === "box") {
      fields.append(regionInputs());
      continue;
    }
    const label = Object.assign(document.createElement("label"), { textContent: LABELS[name] || name });
    const input = Object.assign(document.createElement("input"), { type: "text", name, id: `field-${name}` });
    input.required = name !== "candidates";
    label.htmlFor = input.id;
    fields.append(label, input);
  }
  $("overlay").classList.toggle("drawable", fieldNames(t).includes("box"));
  clearOverlay();
}

function regionInputs() {
  const set = document.createElement("fieldset");
  set.innerHTML = "<legend>Region in image pixels (or drag on the image)</legend>";
  for (const c of ["x0", "y0", "x1", "y1"]) {
    const input = Object.assign(document.createElement("input"), { type: "number", id: `box-${c}`, step: "any" });
    input.required = true;
    input.addEventListener("input", () => drawBoxes(regionFromInputs(), state.size));
    const label = Object.assign(document.createElement("label"), { htmlFor: input.id, textContent: c });
    set.append(label, input);
  }
  return set;
}

function readRegion() {
  return ["x0", "y0", "x1", "y1"].map((c) => Number($(`box-${c}`).value));
}

function regionFromInputs() {
  return $("box-x0") ? [{ box: readRegion(), label: "region" }] : [];
}

/** The chat request: the task's fields as extension fields, the image as a data: URI part. */
function chatRequest() {
  const t = task();
  if (t && !t.available) throw new Error(`Task ${t.name} needs a part this checkpoint lacks.`);
  const needsImage = !t || t.needs_image;
  if (needsImage && !state.image) throw new Error("Choose an image first.");
  const content = [];
  const body = { model: state.model, stream: true, messages: [{ role: "user", content }] };
  if (t) body.task = t.name;
  if ($("decoding").value) body.temperature = Number($("decoding").value);
  for (const name of fieldNames(t)) {
    if (name === "box") {
      body.box = readRegion();
      continue;
    }
    const value = $(`field-${name}`).value.trim();
    if (name === "candidates") {
      const list = value.split(",").map((s) => s.trim()).filter(Boolean);
      if (list.length) body.candidates = list;
    } else if (name === "instruction") content.push({ type: "text", text: value });
    else body[name] = value;
  }
  if (needsImage) content.push({ type: "image_url", image_url: { url: state.image } });
  return body;
}

/** The message of an error response: OpenAI's `{"error": {"message"}}`, or the status line. */
async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body.error && body.error.message) return `${body.error.message} (HTTP ${response.status})`;
  } catch (_) {
    // not JSON: fall through to the status line
  }
  return `The server answered HTTP ${response.status} ${response.statusText}.`;
}

/** Server-sent events: each `data:` line's JSON, until `data: [DONE]`. */
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const lines = buffer.split("\n");
    buffer = lines.pop();
    for (const line of lines) {
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function run(event) {
  event.preventDefault();
  resetAnswer();
  let body;
  try {
    body = chatRequest();
  } catch (e) {
    return showError(e.message);
  }
  $("run").disabled = true;
  $("status").textContent = "Running…";
  const start = performance.now();
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    let ofa = null;
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) $("answer").textContent += delta.content;
      if (chunk.ofa) ofa = chunk.ofa;
    }
    if (ofa) showResult(ofa, body);
    $("status").textContent = `Done in ${((performance.now() - start) / 1000).toFixed(1)} s.`;
  } catch (e) {
    showError(e instanceof TypeError ? `Could not reach the server: ${e.message}` : e.message);
  } finally {
    $("run").disabled = false;
  }
}

function resetAnswer() {
  $("answer").textContent = "";
  $("facts").replaceChildren();
  $("error").hidden = true;
  $("details").hidden = true;
  $("generated").hidden = true;
  $("status").textContent = "";
  clearOverlay();
}

function showError(message) {
  $("status").textContent = "Failed.";
  $("error").textContent = message;
  $("error").hidden = false;
}

function format(value) {
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(3);
  if (Array.isArray(value)) return `[${value.map((v) => (typeof v === "number" ? v.toFixed(1) : v)).join(", ")}]`;
  if (value && typeof value === "object") {
    return Object.entries(value)
      .map(([k, v]) => `${k}: ${(100 * v).toFixed(1)}%`)
      .join(", ");
  }
  return String(value);
}

function showResult(ofa, body) {
  const result = ofa.result || {}; // /v1/generate's shape (free instructions) nests the task's result
  for (const [label, key] of FACTS) {
    const value = ofa[key] ?? result[key];
    if (value === null || value === undefined || value === "") continue;
    const text = key === "probability" ? `${(100 * value).toFixed(1)}%` : format(value);
    $("facts").append(
      Object.assign(document.createElement("dt"), { textContent: label }),
      Object.assign(document.createElement("dd"), { textContent: text }),
    );
  }
  const boxes = [];
  if (body.box) boxes.push({ box: body.box, label: "region" });
  const box = ofa.box || result.box;
  if (box) boxes.push({ box, label: body.text || "box" });
  for (const o of ofa.objects || result.objects || []) boxes.push(o);
  (result.boxes || []).forEach((b, i) => boxes.push({ box: b, label: `box ${i + 1}` }));
  drawBoxes(boxes, ofa.image_size || state.size);
  if (ofa.image) {
    $("generated-image").src = `data:image/png;base64,${ofa.image}`;
    $("generated").hidden = false;
  }
  const { tokens, image, ...shown } = ofa; // long and unreadable
  $("raw").textContent = JSON.stringify(shown, null, 2);
  $("details").hidden = false;
}

// ---------------------------------------------------------------------------------------------------
// The overlay: an SVG whose viewBox is the image's pixel frame, so boxes scale with the picture.

function clearOverlay() {
  $("overlay").replaceChildren();
}

function svg(name, attrs) {
  const node = document.createElementNS($("overlay").namespaceURI, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function drawBoxes(boxes, size) {
  clearOverlay();
  if (!size) return;
  const overlay = $("overlay");
  overlay.setAttribute("viewBox", `0 0 ${size[0]} ${size[1]}`);
  const fontSize = Math.max(size[0], size[1]) / 22;
  boxes.forEach(({ box, label }, i) => {
    if (!box || box.some((v) => !Number.isFinite(v))) return;
    const [x0, y0, x1, y1] = box;
    const color = COLORS[i % COLORS.length];
    const rect = svg("rect", { x: x0, y: y0, width: Math.max(0, x1 - x0), height: Math.max(0, y1 - y0) });
    rect.setAttribute("stroke", color);
    rect.classList.add("box");
    const right = x0 > size[0] / 2; // a label right of the middle ends at the box's right edge, inside
    const at = { x: right ? x1 : x0, y: Math.max(fontSize, y0 - fontSize / 4), "text-anchor": right ? "end" : "start" };
    const text = svg("text", { ...at, fill: color, "font-size": fontSize });
    text.textContent = label;
    overlay.append(rect, text);
  });
}

/** Pixel coordinates in the image's frame of a pointer event over the overlay. */
function imagePoint(event) {
  const r = $("overlay").getBoundingClientRect();
  const clamp = (v, hi) => Math.round(Math.min(Math.max(v, 0), hi));
  return [
    clamp(((event.clientX - r.left) / r.width) * state.size[0], state.size[0]),
    clamp(((event.clientY - r.top) / r.height) * state.size[1], state.size[1]),
  ];
}

function dragRegion(event) {
  if (!state.drag || !$("box-x0")) return;
  const [a, b] = [state.drag, imagePoint(event)];
  const box = [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
  ["x0", "y0", "x1", "y1"].forEach((c, i) => ($(`box-${c}`).value = box[i]));
  drawBoxes(regionFromInputs(), state.size);
}

// ---------------------------------------------------------------------------------------------------
// Image input and start-up

function useFile(file) {
  if (!file || !file.type.startsWith("image/")) return showError("That is not an image file.");
  const reader = new FileReader();
  reader.onload = () => {
    state.image = reader.result;
    $("picture").src = reader.result;
  };
  reader.readAsDataURL(file);
}

function pictureLoaded() {
  const img = $("picture");
  state.size = [img.naturalWidth, img.naturalHeight];
  $("overlay").setAttribute("viewBox", `0 0 ${state.size[0]} ${state.size[1]}`);
  $("stage").hidden = false;
  resetAnswer();
}

async function start() {
  $("file").addEventListener("change", (e) => useFile(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    useFile(e.dataTransfer.files[0]);
  });
  $("picture").addEventListener("load", pictureLoaded);
  const overlay = $("overlay");
  overlay.addEventListener("pointerdown", (e) => {
    if (!$("box-x0")) return;
    state.drag = imagePoint(e);
    overlay.setPointerCapture(e.pointerId);
  });
  overlay.addEventListener("pointermove", dragRegion);
  overlay.addEventListener("pointerup", () => (state.drag = null));
  $("task").addEventListener("change", renderFields);
  $("ask").addEventListener("submit", run);
  try {
    const [models, tasks] = await Promise.all(
      ["/v1/models", "/v1/tasks"].map(async (url) => {
        const response = await fetch(url);
        if (!response.ok) throw new Error(await errorMessage(response));
        return response.json();
      }),
    );
    state.model = models.data[0].id;
    $("model").textContent = state.model;
    for (const t of tasks.tasks) {
      state.tasks.set(t.name, t);
      const option = new Option(t.available ? t.name : `${t.name} (needs a VQ tokenizer)`, t.name);
      option.disabled = !t.available;
      $("task").append(option);
    }
    if (state.tasks.has("caption")) $("task").value = "caption";
  } catch (e) {
    showError(`Could not load the task list: ${e.message}`);
  }
  renderFields();
}

start();
