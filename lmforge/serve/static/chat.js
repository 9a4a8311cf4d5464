// The chat page: keeps the conversation, posts it to /v1/chat/completions with stream=true and
// appends each server-sent delta to the reply as it arrives (fetch + ReadableStream; no library).
// A server started with --api-key answers 401: the page then asks for the key and keeps it for this tab.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_ITEM = "lmforge-api-key";
let model = null;
let history = [];  // [{role, content}] sent with every request
let busy = false;
let apiKey = sessionStorage.getItem(KEY_ITEM) || "";

function headers(extra = {}) {
  return apiKey ? {...extra, Authorization: "Bearer " + apiKey} : extra;
}

function askForKey() {
  $("key-form").hidden = false;
  $("api-key").focus();
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({block: "end"});
  return div;
}

async function loadModel() {
  const r = await fetch("/v1/models", {headers: headers()});
  if (r.status === 401) return askForKey();
  const body = await r.json();
  model = body.data[0].id;
  $("model").textContent = model;
}

// Yields the parsed JSON of each "data:" event until "[DONE]".
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  busy = true;
  $("send").disabled = true;
  history.push({role: "user", content: text});
  bubble("user", text);
  const reply = bubble("assistant", "");
  reply.dataset.state = "streaming";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers({"Content-Type": "application/json"}),
      body: JSON.stringify({
        model, messages: history, stream: true,
        temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
      }),
    });
    if (!response.ok) {
      if (response.status === 401) askForKey();
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : "HTTP " + response.status);
    }
    for await (const event of sseEvents(response)) {
      if (event.error) throw new Error(event.error.message);
      const delta = event.choices.length ? event.choices[0].delta : {};
      if (delta.content) {
        reply.textContent += delta.content;
        reply.scrollIntoView({block: "end"});
      }
    }
    history.push({role: "assistant", content: reply.textContent});
    reply.dataset.state = "done";
  } catch (err) {
    history.pop();  // the failed user turn is not part of the conversation
    reply.className = "msg error";
    reply.textContent = "error: " + err.message;
    reply.dataset.state = "error";
  } finally {
    busy = false;
    $("send").disabled = false;
  }
}

$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || busy) return;
  $("input").value = "";
  send(text);
});

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  apiKey = $("api-key").value.trim();
  sessionStorage.setItem(KEY_ITEM, apiKey);
  $("api-key").value = "";
  $("key-form").hidden = true;
  loadModel().catch((err) => bubble("error", "could not reach the server: " + err.message));
});

$("reset").addEventListener("click", () => {
  history = [];
  $("messages").replaceChildren();
});

loadModel().catch((err) => bubble("error", "could not reach the server: " + err.message));
