// The web chat: plain JavaScript over the server's own OpenAI API (/v1/chat/completions, stream: true).
// Model output is untrusted text: it only ever goes into textContent, never into HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = []; // {role, content} turns sent with every request; the system prompt is added per request
let model = null;
let controller = null; // the AbortController of the reply being streamed
let epoch = 0; // bumped by "New conversation": a reply still arriving then belongs to no conversation

function headers() {
  const key = $("api-key").value.trim();
  return { "Content-Type": "application/json", ...(key ? { Authorization: `Bearer ${key}` } : {}) };
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function add(cls, text) {
  const div = document.createElement("div");
  div.className = cls;
  div.textContent = text;
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function errorOf(response) {
  // the server answers every bad request with an OpenAI error object: show its message
  try {
    const body = await response.json();
    return `${response.status}: ${body.error.message}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) {
      const hint = response.status === 401 ? " (enter the API key in Settings)" : "";
      throw new Error((await errorOf(response)) + hint);
    }
    model = (await response.json()).data[0].id;
    $("model").textContent = model;
    clearError();
  } catch (e) {
    showError(`Cannot reach the model: ${e.message}`);
  }
}

function settings() {
  // an empty field is left out, so the server's default applies; a bad value comes back as a 400 to show
  const out = {};
  for (const [id, name] of [["temperature", "temperature"], ["top-p", "top_p"], ["top-k", "top_k"],
                            ["max-tokens", "max_tokens"], ["seed", "seed"]]) {
    const raw = $(id).value.trim();
    if (raw !== "") out[name] = Number(raw);
  }
  return out;
}

// Server-sent events: "data: {json}" lines separated by a blank line, "data: [DONE]" at the end.
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const data = JSON.parse(line.slice(6));
        if (data.error) throw new Error(data.error.message); // an error after the stream began
        yield data;
      }
    }
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

async function send(text) {
  if (model === null) await loadModel();
  if (model === null) return;
  clearError();
  const mine = epoch;
  const sent = add("msg user", text);
  conversation.push({ role: "user", content: text });
  const system = $("system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...conversation] : [...conversation];
  const bubble = add("msg assistant streaming", "");
  bubble.dataset.chunks = "0";
  let reply = "";
  let finish = null;
  controller = new AbortController();
  setBusy(true);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({ model, messages, stream: true, ...settings() }),
    });
    if (!response.ok) throw new Error(await errorOf(response));
    for await (const chunk of events(response)) {
      const choice = chunk.choices[0];
      if (!choice) continue;
      if (choice.delta.content) {
        reply += choice.delta.content;
        bubble.textContent = reply;
        bubble.dataset.chunks = String(Number(bubble.dataset.chunks) + 1);
        bubble.scrollIntoView({ block: "end" });
      }
      finish = choice.finish_reason || finish;
    }
  } catch (e) {
    if (e.name !== "AbortError") showError(e.message);
  } finally {
    controller = null;
    setBusy(false);
    bubble.classList.remove("streaming");
  }
  if (mine !== epoch) return;
  if (reply || finish) {
    conversation.push({ role: "assistant", content: reply });
    bubble.dataset.finish = finish || "stopped";
    if (finish === "length") add("note", "(cut at the token limit)");
    if (!finish) add("note", "(stopped)");
  } else {
    // nothing came back: take the message out of the conversation and give it back for another try
    conversation.pop();
    bubble.remove();
    sent.classList.add("failed");
    if (!$("input").value) $("input").value = text;
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});

$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", () => controller && controller.abort());

$("new").addEventListener("click", () => {
  epoch += 1;
  if (controller) controller.abort();
  conversation.length = 0;
  $("messages").replaceChildren();
  clearError();
  $("input").focus();
});

$("api-key").addEventListener("change", loadModel);

loadModel();
