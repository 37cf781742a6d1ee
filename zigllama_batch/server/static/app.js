/* zigllama_batch's page: a live view of the processor and a chat playground.
 *
 * The charts poll /metrics, the numbers Prometheus scrapes (one definition of each figure),
 * and keep what they read since the page opened. The playground streams from
 * /v1/chat/completions as any OpenAI client does, with the model id from /v1/models and the
 * API key, when the server has one, from the "API key" panel (kept in sessionStorage).
 * URL parameters: ?chat=TEXT sends TEXT once the model is known; ?max_tokens=N and
 * ?temperature=T preset those fields. Plain JavaScript, no build step; uPlot draws the charts.
 */
"use strict";

const POLL_MS = 1000; // how often /metrics is read
const HISTORY_S = 300; // what the charts show: the last five minutes
// Rates and means are taken over this much history: a request ends between two polls, and its
// tokens and timings arrive at once; over 5 s that reads as a rate, not a one-second spike.
const WINDOW_S = 5;
const KEY_STORAGE = "zigllama_batch.api_key";

const $ = (id) => document.getElementById(id);

// ---- the numbers ------------------------------------------------------------------------------

/** Prometheus text format -> Map of series ("name" or "name{labels}") to value. */
function parsePrometheus(text) {
  const values = new Map();
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = /^([A-Za-z_:][\w:]*(?:\{.*\})?)\s+(\S+)/.exec(line);
    if (match) values.set(match[1], Number(match[2]));
  }
  return values;
}

const finite = (v) => (Number.isFinite(v) ? v : null);
/** How much a counter grew from sample a to sample b (null when it went back: a restart). */
const grew = (a, b, name) => {
  const d = b.get(name) - a.get(name);
  return d >= 0 ? d : null;
};
const ratio = (x, y) => (x != null && y > 0 ? x / y : null);

const BATCH = "zigllama_step_batch_size";
const TTFT = "zigllama_time_to_first_token_seconds";
const TOKENS = "zigllama_generated_tokens_total";
const HITS = "zigllama_prefix_cache_hits_tokens_total";
const QUERIES = "zigllama_prefix_cache_queries_tokens_total";

/* Each chart: its value at sample b, given the sample a about WINDOW_S earlier and the seconds
   between them, and a line about the whole run since the server started. */
const FIGURES = {
  queue: { value: (a, b) => finite(b.get("zigllama_queue_depth")), integer: true },
  running: { value: (a, b) => finite(b.get("zigllama_running_sequences")), integer: true },
  batch: {
    value: (a, b) => ratio(grew(a, b, `${BATCH}_sum`), grew(a, b, `${BATCH}_count`)),
    total: (m) => `mean since start ${format(ratio(m.get(`${BATCH}_sum`), m.get(`${BATCH}_count`)), 1)}`,
  },
  tokens: {
    value: (a, b, seconds) => ratio(grew(a, b, TOKENS), seconds),
    total: (m) => `${format(m.get(TOKENS), 0)} since start`,
  },
  ttft: {
    value: (a, b) => scale(ratio(grew(a, b, `${TTFT}_sum`), grew(a, b, `${TTFT}_count`)), 1000),
    total: (m) => `mean since start ${format(scale(ratio(m.get(`${TTFT}_sum`), m.get(`${TTFT}_count`)), 1000), 0)} ms`,
  },
  hits: {
    value: (a, b) => scale(ratio(grew(a, b, HITS), grew(a, b, QUERIES)), 100),
    total: (m) => `${format(scale(ratio(m.get(HITS), m.get(QUERIES)), 100), 0)} % since start`,
    max: 100,
  },
};

const scale = (v, factor) => (v == null ? null : v * factor);

function format(v, digits) {
  if (v == null || !Number.isFinite(v)) return "–";
  return v.toLocaleString(undefined, { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

// ---- the charts -------------------------------------------------------------------------------

const live = {
  samples: [], // {t: seconds since the epoch, m: Map} for the last HISTORY_S + WINDOW_S
  times: [], // x values on the charts
  charts: [], // {card, figure, ys, plot}
  failures: 0,
};

function setUpCharts() {
  const css = getComputedStyle(document.documentElement);
  const color = (name) => css.getPropertyValue(name).trim();
  for (const [name, figure] of Object.entries(FIGURES)) {
    const card = $(`chart-${name}`);
    const ys = [];
    const box = card.querySelector(".plot");
    const axis = {
      stroke: color("--muted"),
      grid: { stroke: color("--line"), width: 1 },
      ticks: { show: false },
      font: "11px system-ui, sans-serif",
    };
    const plot = new uPlot(
      {
        width: Math.max(box.clientWidth, 200),
        height: box.clientHeight || 110,
        legend: { show: false },
        cursor: { drag: { x: false, y: false }, points: { size: 6 } },
        scales: {
          x: { time: true, range: () => xRange() },
          y: { range: (u, min, max) => [0, figure.max ?? Math.max(1, (max ?? 0) * 1.15)] },
        },
        axes: [
          { ...axis, space: 60, size: 24 },
          { ...axis, size: 40, ...(figure.integer ? { incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000] } : {}) },
        ],
        series: [
          {},
          { stroke: color("--accent"), fill: color("--accent-fill"), width: 1.5, points: { show: false } },
        ],
      },
      [live.times, ys],
      box,
    );
    new ResizeObserver(() => plot.setSize({ width: box.clientWidth, height: box.clientHeight || 110 })).observe(box);
    live.charts.push({ card, figure, ys, plot });
  }
}

function xRange() {
  const last = live.times.at(-1) ?? Date.now() / 1000;
  return [last - HISTORY_S, last];
}

function addSample(m) {
  const t = Date.now() / 1000;
  live.samples.push({ t, m });
  while (live.samples[0].t < t - HISTORY_S - WINDOW_S) live.samples.shift();
  // The sample WINDOW_S ago (or the oldest, in the page's first seconds).
  let i = live.samples.length - 1;
  while (i > 0 && live.samples[i].t > t - WINDOW_S) i--;
  const then = live.samples[i];
  const seconds = t - then.t;

  live.times.push(t);
  const drop = live.times.findIndex((x) => x >= t - HISTORY_S);
  live.times.splice(0, drop);
  for (const chart of live.charts) {
    const v = chart.figure.value(then.m, m, seconds); // null: nothing to say (no steps, no requests)
    chart.ys.push(v);
    chart.ys.splice(0, drop);
    chart.plot.setData([live.times, chart.ys]);
    show(chart, v, m);
  }
}

function show(chart, v, m) {
  const { card, figure } = chart;
  const value = card.querySelector(".value");
  value.textContent = format(v, Number(card.dataset.digits));
  if (v != null && card.dataset.unit) {
    const unit = document.createElement("small");
    unit.textContent = card.dataset.unit;
    value.append(unit);
  }
  card.querySelector(".total").textContent = figure.total ? figure.total(m) : "";
  // What the charts hold, for anyone (or any test) reading the DOM.
  const seen = chart.ys.filter((y) => y != null);
  card.dataset.points = String(chart.ys.length);
  card.dataset.seen = String(seen.length);
  card.dataset.peak = String(seen.length ? Math.max(...seen) : 0);
}

async function poll() {
  try {
    const response = await fetch("metrics", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    addSample(parsePrometheus(await response.text()));
    live.failures = 0;
    setStatus("live", "live");
  } catch (error) {
    live.failures += 1;
    if (live.failures >= 2) setStatus("down", `unreachable (${error.message}); retrying`);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

function setStatus(state, text) {
  const status = $("status");
  status.dataset.state = state;
  status.textContent = text;
}

// ---- the playground ---------------------------------------------------------------------------

const chat = {
  model: null,
  messages: [], // the conversation sent with every request
  controller: null, // aborts the request in flight
  autoSend: new URLSearchParams(location.search).get("chat"),
};

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function needKey(message) {
  const panel = $("key-panel");
  panel.classList.add("needed");
  panel.open = true;
  $("key-note").textContent = message;
  $("key-input").focus();
}

async function loadModel() {
  try {
    const response = await fetch("v1/models", { headers: authHeaders(), cache: "no-store" });
    if (response.status === 401) {
      $("model-name").textContent = "(API key needed)";
      needKey(sessionStorage.getItem(KEY_STORAGE) ? "That key was refused; try another." : "This server needs an API key.");
      return;
    }
    if (!response.ok) throw new Error(await errorMessage(response));
    const model = (await response.json()).data[0];
    chat.model = model.id;
    $("model-name").textContent = model.id;
    $("context").textContent = model.max_model_len ? `· ${model.max_model_len} tokens of context` : "";
    $("key-panel").classList.remove("needed");
    $("send").disabled = false;
    if (chat.autoSend) {
      chat.autoSend = null;
      $("chat-form").requestSubmit(); // the message start() put in the box
    }
  } catch (error) {
    $("model-name").textContent = "(unknown)";
    addMessage("error", `Could not read /v1/models: ${error.message}`);
  }
}

function addMessage(role, text) {
  $("transcript").querySelector(".empty")?.remove();
  const div = document.createElement("div");
  div.className = `message ${role}`;
  div.textContent = text; // never markup: this is what a model or a user wrote
  $("transcript").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error?.message ?? `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

/** The data of each server-sent event of a response body, as it arrives, up to "[DONE]". */
async function* serverSentEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  let ended = false; // the body was read to its end
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) {
        ended = true;
        return;
      }
      buffer += value;
      const lines = buffer.split("\n");
      buffer = lines.pop(); // the last line may not have arrived whole
      for (const raw of lines) {
        const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
        if (line === "") {
          const event = data.join("\n");
          data = [];
          if (event === "[DONE]") {
            // The server ends the body next: read that end rather than cancel a finished
            // response (the browser would report it aborted).
            while (!(await reader.read()).done);
            ended = true;
            return;
          }
          if (event) yield event;
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        } // comments and the event, id and retry fields: this API sends none it needs
      }
    }
  } finally {
    // Leaving early (Stop, an error event) closes the connection: the server stops generating.
    if (!ended) reader.cancel().catch(() => {});
  }
}

async function send(text) {
  if (!chat.model || chat.controller) return;
  const section = $("chat");
  const conversation = chat.messages; // "Clear" starts another; this reply belongs to this one
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.classList.add("streaming");
  section.dataset.state = "streaming";
  $("chat-stats").textContent = "waiting for the first token…";
  setBusy(true);

  const body = { model: chat.model, messages: conversation, stream: true, stream_options: { include_usage: true } };
  const maxTokens = Number.parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  const temperature = Number.parseFloat($("temperature").value);
  if (Number.isFinite(temperature)) body.temperature = temperature;

  chat.controller = new AbortController();
  const started = performance.now();
  let firstAt = null;
  let deltas = 0;
  let usage = null;
  let finish = null;
  let error = null;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
      signal: chat.controller.signal,
    });
    if (!response.ok) {
      error = await errorMessage(response);
      if (response.status === 401) needKey("This server needs an API key.");
    } else {
      for await (const data of serverSentEvents(response.body)) {
        const event = JSON.parse(data);
        if (event.error) {
          error = event.error.message;
          break;
        }
        usage = event.usage ?? usage;
        const choice = event.choices?.[0];
        const content = choice?.delta?.content;
        if (content) {
          firstAt ??= performance.now();
          deltas += 1;
          reply.append(content); // a text node per piece, as it arrives
          reply.scrollIntoView({ block: "end" });
          $("chat-stats").textContent = `${deltas} pieces so far…`;
        }
        finish = choice?.finish_reason ?? finish;
      }
    }
  } catch (caught) {
    if (caught.name === "AbortError") finish = "stopped";
    else error = caught.message;
  } finally {
    chat.controller = null;
    setBusy(false);
  }

  const ended = performance.now();
  reply.classList.remove("streaming");
  reply.dataset.deltas = String(deltas);
  const said = reply.textContent;
  if (said) conversation.push({ role: "assistant", content: said });
  else reply.remove();
  if (error) {
    if (!said) conversation.pop(); // the question got no answer: leave it out of the next one
    addMessage("error", error);
  }
  const tokens = usage?.completion_tokens ?? deltas;
  const parts = [`${tokens} tokens`];
  if (firstAt != null) {
    parts.push(`first after ${format(firstAt - started, 0)} ms`);
    if (tokens > 1 && ended > firstAt) parts.push(`${format((tokens - 1) / ((ended - firstAt) / 1000), 1)} tokens/s`);
  }
  if (finish) parts.push(`finish: ${finish}`);
  $("chat-stats").textContent = parts.join(" · ");
  section.dataset.state = error ? "error" : "done";
}

function setBusy(busy) {
  $("send").disabled = busy || !chat.model;
  $("stop").disabled = !busy;
}

// ---- wiring -----------------------------------------------------------------------------------

function start() {
  const params = new URLSearchParams(location.search);
  if (params.has("max_tokens")) $("max-tokens").value = params.get("max_tokens");
  if (params.has("temperature")) $("temperature").value = params.get("temperature");
  if (chat.autoSend) $("chat-input").value = chat.autoSend;
  $("base-url").textContent = new URL("v1", location.href).href;

  $("chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("chat-input").value.trim();
    if (!text) return;
    $("chat-input").value = "";
    send(text);
  });
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => chat.controller?.abort());
  $("clear").addEventListener("click", () => {
    chat.controller?.abort();
    chat.messages = [];
    $("transcript").replaceChildren();
    $("chat-stats").textContent = "";
    $("chat").dataset.state = "idle";
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
    $("key-input").value = "";
    $("key-panel").open = false;
    loadModel();
  });

  setUpCharts();
  poll();
  loadModel();
}

start();
