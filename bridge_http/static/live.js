// What both pages share: the API key kept in the browser, authenticated fetch, and a
// Server-Sent Events reader over fetch() (EventSource cannot send an Authorization header, and
// the key must never go into a URL), with reconnection after the appliance or the network was gone.
"use strict";

const KEY_NAME = "appliance.api_key";

const Key = {
  get() {
    return sessionStorage.getItem(KEY_NAME) || localStorage.getItem(KEY_NAME) || "";
  },
  set(key, remember) {
    sessionStorage.setItem(KEY_NAME, key);
    if (remember) localStorage.setItem(KEY_NAME, key);
    else localStorage.removeItem(KEY_NAME);
  },
  clear() {
    sessionStorage.removeItem(KEY_NAME);
    localStorage.removeItem(KEY_NAME);
  },
};

class AuthError extends Error {}

function authHeaders(extra) {
  const headers = Object.assign({}, extra || {});
  const key = Key.get();
  if (key) headers.Authorization = "Bearer " + key;
  return headers;
}

// A POST of JSON with the key; resolves to the parsed answer, rejects with the server's message.
async function postJSON(url, body) {
  const response = await fetch(url, {
    method: "POST",
    headers: authHeaders({ "Content-Type": "application/json" }),
    body: JSON.stringify(body || {}),
  });
  if (response.status === 401) throw new AuthError("the API key was refused");
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(errorText(data, response.status));
  return data;
}

function errorText(data, status) {
  const error = data && data.error;
  return (error && (error.message || error)) || "HTTP " + status;
}

// Reads an SSE body: calls onEvent(name, data) for each event; data is parsed JSON where it is JSON.
async function readEvents(response, onEvent, signal, onChunk) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    if (signal && signal.aborted) return;
    if (onChunk) onChunk();
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") name = text;
        else if (field === "data") data.push(text);
      }
      if (!data.length) continue;
      const raw = data.join("\n");
      let parsed = raw;
      try { parsed = JSON.parse(raw); } catch (_) { /* [DONE] and other plain text */ }
      onEvent(name, parsed);
    }
  }
}

// One live stream for the page: reconnects with a growing pause (1 s up to 10 s), and starts
// again from the server's snapshot each time. The server sends a ping at least every 15 s, so a
// stream silent for 40 s went through a network that dropped it without a word: it is reopened.
// onStatus("live" | "connecting" | "login").
const SILENT_LIMIT = 40000;

class LiveStream {
  constructor(url, handlers, onStatus) {
    this.url = url;
    this.handlers = handlers;
    this.onStatus = onStatus || (() => {});
    this.controller = null;
    this.stopped = false;
  }

  start() {
    if (this.controller) this.controller.abort();
    this.stopped = false;
    this.generation = (this.generation || 0) + 1;
    this.loop(this.generation);
  }

  stop() {
    this.stopped = true;
    this.generation = (this.generation || 0) + 1;
    if (this.controller) this.controller.abort();
  }

  async loop(generation) {
    let pause = 1000;
    let watchdog = null;
    const current = () => !this.stopped && generation === this.generation;
    while (current()) {
      this.onStatus("connecting");
      this.controller = new AbortController();
      try {
        const response = await fetch(this.url, {
          headers: authHeaders({ Accept: "text/event-stream" }),
          cache: "no-store",
          signal: this.controller.signal,
        });
        if (!current()) return;
        if (response.status === 401) {
          this.onStatus("login");
          return;
        }
        if (response.ok) {
          this.onStatus("live");
          pause = 1000;
          let heard = Date.now();
          const controller = this.controller;
          watchdog = setInterval(() => {
            if (Date.now() - heard > SILENT_LIMIT) controller.abort();
          }, 5000);
          await readEvents(response, (name, data) => {
            const handler = this.handlers[name];
            if (handler && current()) handler(data);
          }, this.controller.signal, () => { heard = Date.now(); });
        }
      } catch (_) {
        // The appliance or the network is gone: try again below.
      } finally {
        clearInterval(watchdog);
      }
      if (!current()) return;
      this.onStatus("connecting");
      await new Promise((resolve) => setTimeout(resolve, pause));
      pause = Math.min(pause * 2, 10000);
    }
  }
}

// The login form (a <form id="login">): resolves once a key was entered.
function askForKey(message) {
  const form = document.getElementById("login");
  const note = document.getElementById("login-note");
  const input = document.getElementById("login-key");
  const remember = document.getElementById("login-remember");
  note.textContent = message || "";
  form.hidden = false;
  input.focus();
  return new Promise((resolve) => {
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) return;
      Key.set(key, remember ? remember.checked : true);
      input.value = "";
      form.hidden = true;
      resolve(key);
    }, { once: true });
  });
}

// Until the appliance accepts the key in this browser (or needs none): asks for it with the
// login form. /console/auth answers 200 either way, so a missing key is never a refused request.
async function ensureKey() {
  let note = "";
  for (;;) {
    let answer = null;
    try {
      const response = await fetch("/console/auth", { headers: authHeaders(), cache: "no-store" });
      if (response.ok) answer = await response.json();
    } catch (_) { /* the appliance is not there yet */ }
    if (answer && (!answer.required || answer.accepted)) return;
    if (!answer) {
      await new Promise((resolve) => setTimeout(resolve, 2000));
      continue;
    }
    await askForKey(note || (Key.get() ? "That key was refused." : ""));
    note = "That key was refused.";
  }
}

// Element helper: el("td", {className: "x"}, "text") — text always goes in as textContent.
function el(tag, props, text) {
  const node = document.createElement(tag);
  if (props) Object.assign(node, props);
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

window.Live = { Key, AuthError, authHeaders, postJSON, readEvents, LiveStream, askForKey, ensureKey, el,
                errorText };
