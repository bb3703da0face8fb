// The chat page of `cake serve`: the conversation lives here and goes to
// /v1/chat/completions as `messages` each turn. Answers stream as plain text;
// the server renders their markdown (POST /ui/markdown) at most every
// RENDER_EVERY_MS while they stream, and once at the end.
"use strict";

const RENDER_EVERY_MS = 200;
const KEY_STORE = "cake.apiKey";

const $ = (id) => document.getElementById(id);
const history = []; // {role, content} of every finished turn; no system prompt
let controller = null; // the AbortController of the answer in flight
let conversation = 0; // New chat counts up: an answer of an older one is dropped

function authHeaders(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: "Bearer " + key } : extra;
}

async function errorOf(response) {
  try {
    const body = await response.json();
    if (body.error && body.error.message) return body.error.message;
  } catch (_) {
    // not OpenAI's error object: the status says it
  }
  return `${response.status} ${response.statusText}`;
}

function setStatus(text) {
  $("status").textContent = text;
}

async function loadModels() {
  const select = $("model");
  const keep = select.value;
  try {
    const r = await fetch("/v1/models", { headers: authHeaders() });
    if (!r.ok) {
      select.replaceChildren();
      if (r.status === 401) $("settings").open = true;
      setStatus(
        r.status === 401
          ? "This server needs an API key: enter it under Settings."
          : "Models: " + (await errorOf(r)),
      );
      return;
    }
    const models = (await r.json()).data;
    select.replaceChildren(...models.map((m) => new Option(m.id, m.id)));
    if (models.some((m) => m.id === keep)) select.value = keep;
    setStatus("");
  } catch (e) {
    setStatus("Cannot reach the server: " + e.message);
  }
}

async function markdown(text) {
  const r = await fetch("/ui/markdown", { method: "POST", body: text });
  if (!r.ok) throw new Error(await errorOf(r));
  return r.text();
}

// One answer on the page: the markdown rendered so far, then the text that
// came after it as plain text.
class Answer {
  constructor(body) {
    this.text = "";
    this.rendered = 0; // characters of `text` that `html` shows
    this.timer = null;
    this.inFlight = false;
    this.lastRender = 0;
    this.seq = 0; // of render requests; a late reply never overwrites a newer one
    this.applied = 0;
    this.finished = false;
    this.html = document.createElement("div");
    this.tail = document.createElement("div");
    this.tail.className = "tail";
    body.append(this.html, this.tail);
  }

  add(piece) {
    this.text += piece;
    this.tail.textContent = this.text.slice(this.rendered);
    this.schedule();
  }

  schedule() {
    if (this.timer !== null || this.inFlight || this.finished) return;
    const wait = Math.max(0, this.lastRender + RENDER_EVERY_MS - Date.now());
    this.timer = setTimeout(() => {
      this.timer = null;
      this.render();
    }, wait);
  }

  async render() {
    const text = this.text;
    const seq = ++this.seq;
    this.inFlight = true;
    this.lastRender = Date.now();
    try {
      const html = await markdown(text);
      if (seq > this.applied) {
        this.applied = seq;
        this.html.innerHTML = html; // markdown-it's output: raw HTML escaped
        this.rendered = text.length;
        this.tail.textContent = this.text.slice(this.rendered);
      }
    } catch (_) {
      // the plain text stays
    } finally {
      this.inFlight = false;
      if (this.text.length > this.rendered) this.schedule();
    }
  }

  async finish() {
    this.finished = true;
    clearTimeout(this.timer);
    this.timer = null;
    if (this.text) await this.render();
  }
}

// The JSON of each server-sent event until [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer
        .slice(0, end)
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trim())
        .join("\n");
      buffer = buffer.slice(end + 2);
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

function addMessage(role) {
  const msg = document.createElement("article");
  msg.className = "msg " + role;
  const who = document.createElement("h2");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("div");
  body.className = role === "user" ? "body plain" : "body md";
  msg.append(who, body);
  $("log").append(msg);
  return msg;
}

function note(msg, text) {
  const p = document.createElement("p");
  p.className = "note";
  p.textContent = text;
  msg.append(p);
}

function numberField(id, parse) {
  const value = parse($(id).value);
  return Number.isFinite(value) ? value : undefined;
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  return JSON.stringify({
    model: $("model").value || undefined,
    messages,
    stream: true,
    temperature: numberField("temperature", parseFloat),
    top_p: numberField("top-p", parseFloat),
    max_tokens: numberField("max-tokens", (v) => parseInt(v, 10)),
    seed: numberField("seed", (v) => parseInt(v, 10)),
  });
}

function busy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
}

function scrollToEnd() {
  const log = $("log");
  log.scrollTop = log.scrollHeight;
}

async function send(text) {
  const mine = conversation;
  history.push({ role: "user", content: text });
  const asked = addMessage("user");
  asked.querySelector(".body").textContent = text;
  const msg = addMessage("assistant");
  msg.dataset.state = "streaming";
  msg.setAttribute("aria-busy", "true");
  const answer = new Answer(msg.querySelector(".body"));
  controller = new AbortController();
  busy(true);
  setStatus("");
  scrollToEnd();
  let state = "done";
  let finish = null;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/json" }),
      body: requestBody(),
      signal: controller.signal,
    });
    if (!r.ok) throw new Error(await errorOf(r));
    for await (const chunk of events(r)) {
      if (chunk.error) throw new Error(chunk.error.message);
      for (const c of chunk.choices) {
        if (c.delta && c.delta.content) answer.add(c.delta.content);
        finish = c.finish_reason || finish;
      }
      scrollToEnd();
    }
  } catch (e) {
    state = e.name === "AbortError" ? "stopped" : "error";
    if (state === "error") setStatus("Error: " + e.message);
  }
  await answer.finish(); // the next turn may start once this one is in history
  controller = null;
  busy(false);
  if (mine !== conversation) return;
  if (!answer.text) {
    // nothing came back: the turn never happened; its text goes back to the box
    history.pop();
    asked.remove();
    msg.remove();
    if (!$("prompt").value) $("prompt").value = text;
  } else {
    history.push({ role: "assistant", content: answer.text });
    if (state === "stopped") note(msg, "Stopped.");
    else if (state === "error") note(msg, "The answer broke off.");
    else if (finish === "length") note(msg, "Cut at the token limit.");
  }
  msg.dataset.state = state;
  msg.removeAttribute("aria-busy");
  $("prompt").focus();
  scrollToEnd();
}

function newChat() {
  conversation += 1;
  if (controller) controller.abort();
  history.length = 0;
  $("log").replaceChildren();
  setStatus("");
  $("prompt").focus();
}

function storedKey() {
  try {
    return localStorage.getItem(KEY_STORE) || "";
  } catch (_) {
    return ""; // storage refused (private mode): the key lasts this page
  }
}

function storeKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORE, key);
    else localStorage.removeItem(KEY_STORE);
  } catch (_) {
    // see storedKey
  }
}

document.addEventListener("DOMContentLoaded", () => {
  // on a narrow screen the settings sit above the chat: folded until asked for
  if (matchMedia("(max-width: 48rem)").matches) $("settings").open = false;
  $("api-key").value = storedKey();
  $("api-key").addEventListener("change", () => {
    storeKey($("api-key").value.trim());
    loadModels();
  });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("new-chat").addEventListener("click", newChat);
  loadModels();
  $("prompt").focus();
});
