// The operator's console: one live stream (/console/events) paints the state, the cards, the
// queue, the charts and the event log; the prompt and image boxes stream their own answers.
"use strict";

(function () {
  const { Key, AuthError, authHeaders, postJSON, readEvents, LiveStream, ensureKey, el, errorText } = window.Live;
  const { drawChart, formatNumber } = window.Charts;
  const $ = (id) => document.getElementById(id);
  const HOUR = 3600;
  const MAX_LOG = 200;

  let history = [];
  let imageModels = new Set();
  let jobs = new Map(); // id -> the latest we heard of a job (queue and progress events)
  let queueHeard = false;

  // --- state, cards, queue ----------------------------------------------------------------------
  function showState(s) {
    const badge = $("state");
    badge.textContent = s.state;
    badge.dataset.state = s.state;
    $("state-reason").textContent = s.reason || "";
    if (!queueHeard) { // until the first job list: afterwards the header counts the table's rows
      $("queue-depth").textContent = s.queue_depth;
      $("running").textContent = s.running;
    }
    $("queue-max").textContent = s.queue_max;
    $("pause").disabled = s.state === "paused";
    $("resume").disabled = s.state !== "paused";
    document.body.dataset.state = s.state;
  }

  const CARD_FIELDS = [
    ["temperature_c", "temperature", (v) => v.toFixed(1) + " °C"],
    ["cmm_free_mib", "CMM free", (v, c) => Math.round(v) + (c.cmm_total_mib ? " / " + Math.round(c.cmm_total_mib) : "") + " MiB"],
    ["npu_load_pct", "NPU load", (v) => v.toFixed(0) + " %"],
    ["thermal", "thermal level", (v) => v],
    ["recoveries", "recoveries", (v) => String(v)],
  ];

  function showCards(cards) {
    const box = $("cards");
    box.replaceChildren();
    for (const card of cards) {
      const node = el("div", { className: "card" });
      node.dataset.device = card.device_id;
      node.dataset.thermal = card.thermal;
      node.appendChild(el("h3", null, "card " + card.device_id));
      const list = el("dl");
      for (const [field, label, format] of CARD_FIELDS) {
        const value = card[field];
        list.appendChild(el("dt", null, label));
        const dd = el("dd", null, value === null || value === undefined ? "–" : format(value, card));
        dd.dataset.field = field;
        list.appendChild(dd);
      }
      const status = card.failed ? "failed: " + card.failed : card.recovering ? "recovering" : card.loaded ? "ok" : "loading";
      list.appendChild(el("dt", null, "status"));
      const dd = el("dd", { className: card.failed ? "error" : "" }, status);
      dd.dataset.field = "status";
      list.appendChild(dd);
      node.appendChild(list);
      if (card.temperature_c == null && card.npu_load_pct == null && card.cmm_free_mib == null) {
        node.appendChild(el("p", { className: "note" }, "No card readings: the CPU twin runs the models (no NPU card)."));
      }
      box.appendChild(node);
    }
  }

  // A queue event holds every job: {jobs: [{id, kind, sender, state, position, step, steps, ...}]}.
  function showQueue(data) {
    jobs = new Map((data.jobs || []).map((job) => [job.id, job]));
    const eta = data.eta_s;
    $("queue-eta").textContent = typeof eta !== "number" || eta < 1 ? "" :
      "A request sent now would start in about " + Math.round(eta) + " s.";
    paintQueue();
  }

  // A progress event updates one job: {id, state, position, step, steps, ...}.
  function jobProgress(data) {
    if (!data || data.id === undefined) return;
    if (data.state === "done") jobs.delete(data.id);
    else jobs.set(data.id, Object.assign(jobs.get(data.id) || {}, data));
    paintQueue();
  }

  function paintQueue() {
    const rows = $("queue-rows");
    rows.replaceChildren();
    const list = [...jobs.values()].sort((a, b) => (a.position || 0) - (b.position || 0));
    for (const job of list) {
      const row = el("tr");
      row.dataset.job = job.id;
      row.appendChild(el("td", null, job.state === "running" ? "▶" : job.position || ""));
      row.appendChild(el("td", null, job.kind || ""));
      row.appendChild(el("td", null, job.sender || ""));
      row.appendChild(el("td", null, job.state || ""));
      row.appendChild(el("td", null, progressText(job)));
      rows.appendChild(row);
    }
    $("queue-empty").hidden = list.length > 0;
    // The header and the chart's current figure read the same list as the table.
    const running = list.filter((job) => job.state === "running").length;
    queueHeard = true;
    $("running").textContent = running;
    $("queue-depth").textContent = list.length - running;
    $("now-queue").textContent = String(list.length - running);
  }

  function progressText(job) {
    if (job.steps) return job.step + " / " + job.steps;
    if (job.prompt_tokens) return (job.prompt_done || 0) + " / " + job.prompt_tokens + " prompt";
    if (job.tokens) return job.tokens + " tokens";
    if (job.eta_s !== undefined && job.eta_s !== null) {
      return (job.state === "running" ? "ends" : "starts") + " in about " + Math.round(job.eta_s) + " s";
    }
    return "";
  }

  // --- charts -------------------------------------------------------------------------------------
  function addSample(point) {
    history.push(point);
    const cutoff = Date.now() / 1000 - HOUR;
    while (history.length && history[0].ts < cutoff) history.shift();
    drawCharts();
  }

  function drawCharts() {
    const series = (name) => history.map((p) => ({ ts: p.ts, value: p[name] }));
    // The hour, or since the appliance started when that is shorter (at least a minute).
    const since = history.length ? Date.now() / 1000 - history[0].ts : 0;
    const span = Math.min(HOUR, Math.max(60, since));
    $("chart-span").textContent = span >= HOUR ? "The last hour" : "The last " + Math.ceil(span / 60) + " min";
    drawChart($("chart-tokens"), series("tokens_per_s"), { min: 0, floor: 5, span });
    drawChart($("chart-queue"), series("queue_depth"), { min: 0, floor: 2, span });
    drawChart($("chart-temp"), series("temperature_c"), { min: 30, floor: 10, span });
    $("temp-none").hidden = history.length === 0 || history.some((p) => p.temperature_c != null);
    const last = history[history.length - 1] || {};
    $("now-tokens").textContent = last.tokens_per_s == null ? "" : formatNumber(last.tokens_per_s);
    if (!queueHeard) $("now-queue").textContent = last.queue_depth == null ? "" : String(last.queue_depth);
    $("now-temp").textContent = last.temperature_c == null ? "" : formatNumber(last.temperature_c);
  }

  // --- event log ----------------------------------------------------------------------------------
  function logClass(name) {
    if (name.startsWith("thermal_")) return name === "thermal_normal" ? "ok" : "warn";
    if (/fail|dead|hung|fault|refus/.test(name)) return "error";
    if (/recover|reset|reload/.test(name)) return "warn";
    return "";
  }

  function addLog(entry) {
    const { event, ts, ...fields } = entry;
    const item = el("li", { className: logClass(String(event)) });
    item.dataset.event = event;
    const when = new Date((ts || Date.now() / 1000) * 1000);
    item.appendChild(el("time", null, when.toLocaleTimeString()));
    item.appendChild(el("strong", null, event));
    const details = Object.entries(fields).filter(([, v]) => v !== null && v !== undefined).map(([k, v]) => k + "=" + (typeof v === "object" ? JSON.stringify(v) : v));
    item.appendChild(el("span", null, details.join(" ")));
    const log = $("log");
    log.prepend(item);
    while (log.children.length > MAX_LOG) log.lastChild.remove();
  }

  // --- the stream ---------------------------------------------------------------------------------
  const handlers = {
    hello(data) {
      imageModels = new Set(data.models.filter((m) => m.kind === "image").map((m) => m.id));
      fillSelect($("image-model"), [...imageModels]);
      $("image-panel").hidden = imageModels.size === 0; // no image model here: no image box
      $("image-none").hidden = imageModels.size > 0; // ... and a line saying why
      loadChatModels(data.models);
    },
    state: showState,
    devices: showCards,
    history(points) { history = points; drawCharts(); },
    sample: addSample,
    log(entries) { $("log").replaceChildren(); entries.forEach(addLog); },
    event: addLog,
    queue: showQueue,
    progress: jobProgress,
    mqtt: showMqtt,
  };

  // The appliance's own MQTT link: the broker down means no MQTT request reaches it.
  function showMqtt(data) {
    const node = $("mqtt");
    const status = data.connected === null ? "none" : data.connected ? "up" : "down";
    node.dataset.status = status;
    node.textContent = { up: "MQTT up", down: "MQTT down", none: "no MQTT" }[status];
    node.title = { up: "the appliance is connected to its broker",
      down: "the broker is unreachable: MQTT requests cannot reach the appliance (HTTP still works)",
      none: "this appliance has no MQTT link" }[status];
  }

  function linkStatus(status) {
    const link = $("link");
    link.dataset.status = status;
    link.textContent = { live: "live", connecting: "reconnecting…", login: "sign in" }[status] || status;
    document.body.dataset.link = status;
    if (status === "login") signIn();
  }

  const stream = new LiveStream("/console/events", handlers, linkStatus);

  async function signIn() {
    stream.stop();
    $("main").hidden = true;
    await ensureKey();
    $("main").hidden = false;
    stream.start();
  }

  // Forgets the key (this tab's and a remembered one) and asks for it again.
  function signOut() {
    Key.clear();
    stream.stop();
    linkStatus("login");
  }

  function fillSelect(select, ids) {
    const current = select.value;
    select.replaceChildren();
    for (const id of ids) select.appendChild(el("option", { value: id }, id));
    if (ids.includes(current)) select.value = current;
  }

  // Chat models and personas as /v1/models lists them (it knows personas and aliases; the engine
  // knows each model's kind): a voice, speech-to-text or image model cannot answer a prompt.
  async function loadChatModels(engineModels) {
    const chat = new Set(engineModels.filter((m) => m.kind === "chat").map((m) => m.id));
    let ids = [...chat];
    try {
      const response = await fetch("/v1/models", { headers: authHeaders() });
      if (response.ok) {
        const listed = (await response.json()).data;
        ids = listed.filter((m) => chat.has(m.id) || (m.parent ? chat.has(m.parent) : m.persona === true))
          .map((m) => m.id);
      }
    } catch (_) { /* keep the engine's list */ }
    fillSelect($("chat-model"), ids);
  }

  // --- controls -----------------------------------------------------------------------------------
  async function act(button, url, body, doing, done) {
    const note = $("action-note");
    button.disabled = true;
    note.textContent = doing || "";
    note.className = "note";
    try {
      const answer = await postJSON(url, body);
      note.textContent = done ? done(answer || {}) : "";
    } catch (error) {
      note.textContent = error.message;
      note.className = "note error";
      if (error instanceof AuthError) {
        signIn();
      }
    } finally {
      button.disabled = false;
    }
  }

  function wireControls() {
    const now = () => new Date().toLocaleTimeString();
    $("pause").addEventListener("click", () => act($("pause"), "/console/pause", {}, "pausing…",
      (a) => "Paused at " + now() + " (state " + a.state + "): running jobs finish, new ones wait."));
    $("resume").addEventListener("click", () => act($("resume"), "/console/resume", {}, "resuming…",
      (a) => "Resumed at " + now() + " (state " + a.state + ")."));
    $("reload").addEventListener("click", () => act($("reload"), "/console/reload", {}, "reloading the models…",
      (a) => "Models reloaded at " + now() + " (state " + a.state + ")."));
    $("signout").addEventListener("click", signOut);
    $("restart").addEventListener("click", () => { $("restart-confirm").hidden = false; });
    $("restart-no").addEventListener("click", () => { $("restart-confirm").hidden = true; });
    $("restart-yes").addEventListener("click", async () => {
      $("restart-confirm").hidden = true;
      await act($("restart"), "/console/restart", { confirm: true }, "restarting…",
        () => "Restarted at " + now() + ".");
    });
  }

  // --- the prompt box -----------------------------------------------------------------------------
  let chatController = null;

  function numberOr(input, fallback) {
    return input.value === "" ? fallback : Number(input.value);
  }

  async function sendChat(event) {
    event.preventDefault();
    const answer = $("chat-answer");
    const note = $("chat-note");
    const messages = [];
    const system = $("chat-system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push({ role: "user", content: $("chat-prompt").value });
    // Only what the operator set: an empty field leaves the persona's (or the model's) own setting.
    const body = { model: $("chat-model").value || undefined, messages, stream: true };
    const temperature = numberOr($("chat-temperature"), null);
    if (temperature !== null) body.temperature = temperature;
    const maxTokens = numberOr($("chat-max"), null);
    if (maxTokens !== null) body.max_tokens = maxTokens;
    const seed = numberOr($("chat-seed"), null);
    if (seed !== null) body.seed = seed;
    answer.textContent = "";
    answer.dataset.done = "false";
    note.textContent = "waiting…";
    note.className = "note";
    $("chat-send").disabled = true;
    $("chat-stop").disabled = false;
    chatController = new AbortController();
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST", signal: chatController.signal, body: JSON.stringify(body),
        headers: authHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" }),
      });
      if (!response.ok) {
        const data = await response.json().catch(() => ({}));
        throw new Error(errorText(data, response.status));
      }
      let finish = "";
      await readEvents(response, (_, data) => {
        if (data === "[DONE]" || typeof data !== "object") return;
        if (data.error) throw new Error(errorText(data, 500));
        const choice = (data.choices || [])[0];
        if (!choice) return;
        if (choice.delta && choice.delta.content) {
          answer.textContent += choice.delta.content;
          note.textContent = "writing…";
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      });
      note.textContent = finish ? "finished: " + finish : "";
    } catch (error) {
      note.textContent = error.name === "AbortError" ? "stopped" : error.message;
      note.className = "note error";
    } finally {
      answer.dataset.done = "true";
      $("chat-send").disabled = false;
      $("chat-stop").disabled = true;
      chatController = null;
    }
  }

  // --- the image box ------------------------------------------------------------------------------
  async function sendImage(event) {
    event.preventDefault();
    const note = $("image-note");
    const progress = $("image-progress");
    const preview = $("image-preview-img");
    const result = $("image-result");
    const body = { prompt: $("image-prompt").value, preview: $("image-preview").checked };
    if ($("image-model").value) body.model = $("image-model").value;
    const steps = numberOr($("image-steps"), null);
    if (steps !== null) body.steps = steps;
    const seed = numberOr($("image-seed"), null);
    if (seed !== null) body.seed = seed;
    const display = $("image-display").value.trim();
    if (display) body.display = display;
    $("image-send").disabled = true;
    progress.value = 0;
    progress.hidden = false;
    note.textContent = "waiting…";
    note.className = "note";
    result.dataset.done = "false";
    preview.dataset.count = "0";
    try {
      const response = await fetch("/console/image", {
        method: "POST", body: JSON.stringify(body),
        headers: authHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" }),
      });
      if (!response.ok) {
        const data = await response.json().catch(() => ({}));
        throw new Error(errorText(data, response.status));
      }
      await readEvents(response, (name, data) => {
        if (name === "progress") {
          if (data.steps) progress.value = data.step / data.steps;
          note.textContent = data.stage + (data.steps ? " " + data.step + " / " + data.steps : "");
        } else if (name === "preview") {
          preview.src = data.src;
          preview.hidden = false;
          preview.dataset.count = String(Number(preview.dataset.count || 0) + 1);
        } else if (name === "done") {
          progress.value = 1;
          result.src = data.src;
          result.hidden = false;
          preview.hidden = true;
          note.textContent = data.width + "×" + data.height + ", seed " + data.seed + ", " +
            Math.round(data.ms) + " ms" + (data.display ? ", on display " + data.display : "");
        } else if (name === "error") {
          throw new Error(data.message);
        }
      });
    } catch (error) {
      note.textContent = error.message;
      note.className = "note error";
    } finally {
      result.dataset.done = "true";
      $("image-send").disabled = false;
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    wireControls();
    $("chat").addEventListener("submit", sendChat);
    $("chat-stop").addEventListener("click", () => chatController && chatController.abort());
    $("image").addEventListener("submit", sendImage);
    signIn();
  });
})();
