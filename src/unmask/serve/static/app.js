// The page: send a streamed completion with canvas frames and draw each frame as it arrives.
// Masked positions are grey blanks; a committed token is coloured by the step it was committed at.
"use strict";
const $ = (id) => document.getElementById(id);
let modelId = null, objective = "mdm";
// what the end-to-end test reads: frames drawn and the masked count of each
window.unmaskFrames = [];

async function loadModel() {
  try {
    const res = await fetch("/v1/models");
    const info = (await res.json()).data[0];
    modelId = info.id;
    objective = info.objective;
    $("model").textContent = `${info.id} · ${info.objective === "ar" ? "autoregressive" : "masked diffusion"} · context ${info.context_length}`;
    document.body.classList.toggle("ar", objective === "ar");
    if (objective === "ar") $("infill-mode").hidden = true;
  } catch (e) {
    $("model").textContent = "cannot reach the server";
  }
}

function colour(step, total) {
  const x = total > 1 ? Math.min(1, Math.max(0, (step - 1) / (total - 1))) : 0;
  return `hsl(${210 - 210 * x}, 75%, 76%)`;  // blue (early) to red (late)
}

function escapeText(text) {
  return text.replace(/\n/g, "↵\n");
}

function draw(frame, prompt, totalSteps) {
  const canvas = $("canvas");
  canvas.textContent = "";
  let masked = 0;
  for (const choice of frame.choices) {
    const row = document.createElement("div");
    row.className = "choice";
    if (prompt) {
      const p = document.createElement("span");
      p.className = "prompt";
      p.textContent = prompt;
      row.appendChild(p);
    }
    choice.tokens.forEach((piece, i) => {
      const span = document.createElement("span");
      if (piece === null) {
        span.className = "mask";
        masked += 1;
      } else {
        const at = choice.committed_at[i];
        span.className = at === 0 ? "tok given" : "tok";
        if (at > 0) span.style.backgroundColor = colour(at, totalSteps);
        span.title = at === 0 ? "given" : `step ${at}`;
        span.textContent = escapeText(piece);
      }
      row.appendChild(span);
    });
    canvas.appendChild(row);
  }
  $("step").textContent = frame.step;
  $("nfe").textContent = frame.nfe;
  $("masked").textContent = masked;
  const filled = frame.choices.reduce((n, c) => n + c.committed_at.filter((s) => s > 0).length, 0);
  $("rate").textContent = frame.seconds > 0 ? (filled / frame.seconds).toFixed(1) : "–";
  window.unmaskFrames.push(masked);
}

function number(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

function request() {
  const infill = document.querySelector("input[name=mode]:checked").value === "infill" && objective !== "ar";
  const body = { model: modelId, prompt: $("prompt").value, stream: true, stream_canvas: true, max_tokens: number("max_tokens") };
  const temperature = number("temperature"), seed = number("seed");
  if (temperature !== null) body.temperature = temperature;
  if (seed !== null) body.seed = seed;
  if (objective !== "ar") {
    body.sampler = $("sampler").value;
    if (infill) body.infill = true;
    const block = number("block_length"), cfg = number("cfg_scale");
    if (block && !infill) body.block_length = block;
    if (cfg) body.cfg_scale = cfg;
    if (["ancestral", "confidence", "cached"].includes(body.sampler) && number("steps")) body.steps = number("steps");
    if (body.sampler === "threshold" && temperature === null) delete body.temperature;
  }
  return body;
}

// frames are drawn at most every 40 ms, so a fast decode still shows its intermediate canvases
async function play(queue, state) {
  while (!state.finished || queue.length) {
    if (queue.length) {
      draw(queue.shift(), state.prompt, state.totalSteps);
      await new Promise((r) => setTimeout(r, 40));
    } else {
      await new Promise((r) => setTimeout(r, 10));
    }
  }
}

// an error replaces the canvas, where the user is looking, so no stale canvas is left beside it
function showError(message) {
  const box = document.createElement("div");
  box.className = "error";
  box.setAttribute("role", "alert");
  box.textContent = message;
  $("canvas").replaceChildren(box);
  for (const id of ["step", "nfe", "masked", "rate"]) $(id).textContent = "–";
  $("status").dataset.state = "error";
  $("status").textContent = "error";
}

async function generate(event) {
  event.preventDefault();
  $("generate").disabled = true;
  $("status").dataset.state = "running";
  $("status").textContent = "decoding…";
  window.unmaskFrames = [];
  const body = request();
  const state = { finished: false, prompt: body.infill ? "" : body.prompt,
                  totalSteps: objective === "ar" ? body.max_tokens : (body.steps || body.max_tokens) };
  const queue = [];
  const player = play(queue, state);
  let failed = null;
  try {
    const res = await fetch("/v1/completions", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    if (!res.ok) {
      const err = await res.json().catch(() => ({ error: { message: res.statusText } }));
      throw new Error(err.error.message + (err.error.param ? ` (field: ${err.error.param})` : ""));
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let kind = "message", data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) kind = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        if (data === "[DONE]") continue;
        const msg = JSON.parse(data);
        if (msg.error) throw new Error(msg.error.message);
        if (kind === "canvas") {
          if (msg.step > state.totalSteps) state.totalSteps = msg.step;
          queue.push(msg);
        }
      }
    }
  } catch (e) {
    failed = e;
  }
  state.finished = true;
  await player;
  $("generate").disabled = false;
  if (failed) {
    showError(String(failed.message || failed));
  } else {
    $("status").dataset.state = "done";
    $("status").textContent = "done";
  }
}

document.querySelectorAll("input[name=mode]").forEach((r) => r.addEventListener("change", () => {
  if (r.checked && r.value === "infill" && !/\[MASK/.test($("prompt").value)) {
    $("prompt").value = "ROMEO. [MASK:6] my love, [MASK:4] the night.";
  }
}));
$("form").addEventListener("submit", generate);
loadModel();
