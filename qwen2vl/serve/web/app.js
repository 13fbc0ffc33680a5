// The qwen2vl chat page: images and videos go to the server as data: URLs in OpenAI content parts, answers stream
// back over SSE, the conversation is kept here and sent whole each turn. Before sending, POST /v1/plan prices every
// item (size after resizing, tokens); after an answer with grounding boxes, POST /v1/boxes maps them onto the last
// image with the library's own rule (qwen2vl.grounding), and they are drawn over it.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, history: [], draft: [], planTimer: null, busy: false };
const COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"];

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function api(path, body) {
  const r = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const data = await r.json();
  if (!r.ok) throw new Error((data.error && data.error.message) || r.statusText);
  return data;
}

async function connect() {
  const r = await fetch("/v1/models", { headers: headers() });
  if (r.status === 401) {
    $("key-box").hidden = false;
    $("model").textContent = "this server needs an API key";
    return;
  }
  const data = await r.json();
  state.model = data.data[0].id;
  $("model").textContent = `${state.model} · context ${data.data[0].max_model_len} tokens`;
  schedulePlan();
}

// -- the draft: attachments with their pixel budget and token cost ---------------------------------------------
function addFiles(files) {
  for (const file of files) {
    const kind = file.type.startsWith("image/") ? "image" : file.type.startsWith("video/") ? "video" : null;
    if (!kind) continue;
    const reader = new FileReader();
    reader.onload = () => {
      state.draft.push({ kind, url: reader.result, name: file.name, maxPixels: null });
      renderDraft();
    };
    reader.readAsDataURL(file);
  }
}

function part(item) {
  const inner = { url: item.url };
  if (item.maxPixels) inner.max_pixels = item.maxPixels;
  return item.kind === "image" ? { type: "image_url", image_url: inner } : { type: "video_url", video_url: inner };
}

function draftMessage() {
  const content = state.draft.map(part);
  content.push({ type: "text", text: $("text").value });
  return { role: "user", content };
}

function renderDraft() {
  const box = $("items");
  box.replaceChildren();
  state.draft.forEach((item, i) => {
    const el = document.createElement("div");
    el.className = "item";
    const media = document.createElement(item.kind === "image" ? "img" : "video");
    media.src = item.url;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.title = "Remove";
    remove.onclick = () => { state.draft.splice(i, 1); renderDraft(); };
    const budget = document.createElement("input");
    budget.type = "number";
    budget.min = "3136";
    budget.step = "784";
    budget.placeholder = "max pixels (default)";
    budget.value = item.maxPixels || "";
    budget.oninput = () => { item.maxPixels = parseInt(budget.value, 10) || null; schedulePlan(); };
    const cost = document.createElement("div");
    cost.className = "cost";
    cost.textContent = "…";
    el.append(remove, media, budget, cost);
    box.append(el);
    item.costEl = cost;
  });
  schedulePlan();
}

function schedulePlan() {
  clearTimeout(state.planTimer);
  state.planTimer = setTimeout(plan, 250);
}

async function plan() {
  if (!state.model) return;
  const out = $("plan");
  try {
    const p = await api("/v1/plan", { model: state.model, messages: [...state.history, draftMessage()] });
    const mine = p.items.slice(p.items.length - state.draft.length);
    mine.forEach((item, i) => {
      const [w, h] = item.source_size, [rw, rh] = item.resized_size;
      const frames = item.kind === "video" ? ` · ${item.frames} frames` : "";
      if (state.draft[i].costEl) state.draft[i].costEl.textContent = `${w}×${h} → ${rw}×${rh}${frames} · ${item.tokens} tokens`;
    });
    out.textContent = `prompt ${p.prompt_tokens} of ${p.context} tokens`;
    out.classList.toggle("over", !p.fits);
  } catch (e) {
    out.textContent = e.message;
    out.classList.add("over");
  }
}

// -- the conversation ------------------------------------------------------------------------------------------
function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

// A reply for reading: referring phrases in bold, box corners small, other special tokens dropped.
function renderText(raw) {
  return escapeHtml(raw)
    .replace(/&lt;\|object_ref_start\|&gt;(.*?)&lt;\|object_ref_end\|&gt;/g, '<span class="ref">$1</span>')
    .replace(/&lt;\|(box|quad)_start\|&gt;(.*?)&lt;\|\1_end\|&gt;/g, ' <span class="coords">[$2]</span>')
    .replace(/&lt;\|[a-z_]+\|&gt;/g, "");
}

function bubble(role) {
  const el = document.createElement("div");
  el.className = "msg " + role;
  $("log").append(el);
  return el;
}

function showUser(message) {
  const el = bubble("user");
  const media = document.createElement("div");
  media.className = "media";
  for (const p of message.content) {
    if (p.type === "text") continue;
    const m = document.createElement(p.type === "image_url" ? "img" : "video");
    m.src = (p.image_url || p.video_url).url;
    if (m.tagName === "VIDEO") m.controls = true;
    media.append(m);
  }
  if (media.childElementCount) el.append(media);
  el.append(document.createTextNode(message.content.at(-1).text));
}

function lastImage() {
  for (let i = state.history.length - 1; i >= 0; i--) {
    const content = state.history[i].content;
    if (state.history[i].role !== "user" || !Array.isArray(content)) continue;
    const images = content.filter((p) => p.type === "image_url");
    if (images.length) return images.at(-1).image_url.url;
  }
  return null;
}

// Boxes of `text` drawn over a copy of the image at `src`, inside `container`; resolves to the boxes drawn.
async function renderBoxes(text, src, container) {
  const img = new Image();
  img.src = src;
  await img.decode();
  const width = img.naturalWidth, height = img.naturalHeight;
  const { boxes } = await api("/v1/boxes", { text, width, height });
  if (!boxes.length) return boxes;
  const frame = document.createElement("div");
  frame.className = "grounded";
  const svgNS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  Object.assign(svg.style, { position: "absolute", left: 0, top: 0, width: "100%", height: "100%" });
  const stroke = Math.max(2, Math.round(Math.min(width, height) / 200));
  boxes.forEach((box, i) => {
    const colour = COLOURS[i % COLOURS.length];
    const points = box.pixels.map(([x, y]) => `${x},${y}`).join(" ");
    const shape = document.createElementNS(svgNS, "polygon");
    const [[x1, y1], [x2, y2]] = box.pixels;
    shape.setAttribute("points", box.pixels.length === 2 ? `${x1},${y1} ${x2},${y1} ${x2},${y2} ${x1},${y2}` : points);
    shape.setAttribute("class", "box-shape");
    shape.dataset.pixels = JSON.stringify(box.pixels);
    Object.assign(shape.style, { fill: "none", stroke: colour, strokeWidth: stroke });
    svg.append(shape);
    if (box.label) {
      const label = document.createElementNS(svgNS, "text");
      label.setAttribute("x", Math.min(...box.pixels.map((p) => p[0])));
      label.setAttribute("y", Math.max(12, Math.min(...box.pixels.map((p) => p[1])) - 3));
      label.setAttribute("fill", colour);
      label.setAttribute("font-size", Math.max(12, Math.round(height / 30)));
      label.textContent = box.label;
      svg.append(label);
    }
  });
  frame.append(img, svg);
  container.append(document.createElement("br"), frame);
  return boxes;
}

// POST /v1/chat/completions with stream=true; `onText` gets the reply so far after every chunk.
async function stream(messages, onText) {
  const r = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(),
    body: JSON.stringify({ model: state.model, messages, stream: true, skip_special_tokens: false }),
  });
  if (!r.ok) {
    const data = await r.json().catch(() => ({}));
    throw new Error((data.error && data.error.message) || r.statusText);
  }
  const reader = r.body.getReader(), decoder = new TextDecoder();
  let buffer = "", text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") return text;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices.length ? chunk.choices[0].delta.content : null;
      if (delta) { text += delta; onText(text); }
    }
  }
  return text;
}

async function send(event) {
  event.preventDefault();
  if (state.busy || !state.model || (!state.draft.length && !$("text").value.trim())) return;
  state.busy = true;
  $("send").disabled = true;
  const message = draftMessage();
  state.history.push(message);
  showUser(message);
  state.draft = [];
  $("text").value = "";
  renderDraft();
  const el = bubble("assistant");
  el.dataset.state = "streaming";
  try {
    let chunks = 0;
    const text = await stream(state.history, (t) => { el.innerHTML = renderText(t); el.dataset.chunks = ++chunks; });
    el.innerHTML = renderText(text);
    state.history.push({ role: "assistant", content: text });
    const src = lastImage();
    if (src && /<\|(box|quad)_start\|>/.test(text)) await renderBoxes(text, src, el);
    el.dataset.state = "done";
  } catch (e) {
    state.history.pop();
    el.className = "msg error";
    el.textContent = e.message;
    el.dataset.state = "error";
  } finally {
    state.busy = false;
    $("send").disabled = false;
    $("log").scrollTop = $("log").scrollHeight;
    schedulePlan();
  }
}

// -- wiring ----------------------------------------------------------------------------------------------------
$("composer").addEventListener("submit", send);
$("text").addEventListener("input", schedulePlan);
$("text").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("file").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });
document.addEventListener("paste", (e) => { if (e.clipboardData.files.length) addFiles(e.clipboardData.files); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); addFiles(e.dataTransfer.files); });
$("key").addEventListener("change", () => { sessionStorage.setItem("qwen2vl-key", $("key").value); connect(); });
$("reset").addEventListener("click", () => { state.history = []; $("log").replaceChildren(); schedulePlan(); });
$("key").value = sessionStorage.getItem("qwen2vl-key") || "";
if ($("key").value) $("key-box").hidden = false;

window.qwen2vl = { state, renderBoxes, renderText, stream };
connect();
