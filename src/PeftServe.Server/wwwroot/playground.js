// PeftServe playground: chat streamed over SignalR (/hubs/chat), the adapter picker from /v1/models,
// and adapter upload to /v1/adapters.
"use strict";
(() => {
  const $ = id => document.getElementById(id);
  const key = () => $("api-key").value.trim();
  const authHeaders = () => key() ? { Authorization: "Bearer " + key() } : {};
  let history = [];
  let current = null; // the running stream's subscription

  const connection = new signalR.HubConnectionBuilder()
    .withUrl("hubs/chat", { accessTokenFactory: () => key() })
    .withAutomaticReconnect()
    .build();

  function setStatus(text, state) { const s = $("status"); s.textContent = text; s.dataset.state = state; }
  connection.onreconnecting(() => setStatus("reconnecting…", "connecting"));
  connection.onreconnected(() => setStatus("connected", "connected"));
  connection.onclose(() => setStatus("disconnected", "error"));
  // An adapter was stored or deleted (through any replica, with the Redis backplane): refresh the picker.
  connection.on("adaptersChanged", () => loadModels());

  async function connect() {
    try { await connection.start(); setStatus("connected", "connected"); }
    catch (e) { setStatus("cannot connect: " + e.message, "error"); setTimeout(connect, 2000); }
  }

  async function loadModels(select) {
    const response = await fetch("v1/models", { headers: authHeaders() });
    if (!response.ok) { setStatus("GET /v1/models: " + response.status, "error"); return; }
    const body = await response.json();
    const picker = $("model");
    const previous = select ?? picker.value;
    picker.replaceChildren(...body.data.map(m => {
      const o = document.createElement("option");
      o.value = m.id;
      o.textContent = m.parent ? `${m.id} (${m.peft_type ?? "adapter"})` : `${m.id} (base)`;
      return o;
    }));
    if (previous && body.data.some(m => m.id === previous)) picker.value = previous;
  }

  function addLine(role, text) {
    const li = document.createElement("li");
    li.className = role;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role;
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = text;
    li.append(who, body);
    $("transcript").append(li);
    return body;
  }

  function finish() {
    current = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }

  $("chat-form").addEventListener("submit", ev => {
    ev.preventDefault();
    const text = $("message").value.trim();
    if (!text || current) return;
    $("message").value = "";
    history.push({ role: "user", content: text });
    addLine("user", text);
    const out = addLine("assistant", "");
    out.parentElement.dataset.model = $("model").value;
    $("send").disabled = true;
    $("stop").disabled = false;
    const started = performance.now();
    let first = null, tokens = 0, reply = "";
    const arrivals = []; // one entry per streamed item, for the stats and the browser test
    window.peftserve.lastArrivals = arrivals;
    const request = {
      model: $("model").value,
      messages: history,
      maxTokens: parseInt($("max-tokens").value, 10) || 32,
      temperature: parseFloat($("temperature").value) || 0,
    };
    current = connection.stream("StreamChat", request).subscribe({
      next: t => {
        arrivals.push({ at: performance.now() - started, length: reply.length + t.text.length });
        if (t.tokenId >= 0) { tokens++; first ??= performance.now() - started; }
        reply += t.text;
        out.textContent = reply;
        out.parentElement.dataset.tokens = String(tokens);
        if (t.finishReason) {
          out.parentElement.dataset.finish = t.finishReason;
          const secs = (performance.now() - started) / 1000;
          $("stats").textContent = `${tokens} tokens, first after ${first?.toFixed(0)} ms, ${(tokens / secs).toFixed(1)} tokens/s, finish: ${t.finishReason}`;
        }
      },
      complete: () => { history.push({ role: "assistant", content: reply }); finish(); },
      error: e => { out.parentElement.classList.add("error"); out.textContent = reply + " [" + e.message + "]"; history.pop(); finish(); },
    });
  });

  $("stop").addEventListener("click", () => { if (current) { current.dispose(); finish(); } });
  $("refresh").addEventListener("click", () => loadModels());

  $("upload-form").addEventListener("submit", async ev => {
    ev.preventDefault();
    const files = $("adapter-files").files;
    const name = $("adapter-name").value.trim();
    const result = $("upload-result");
    if (!files.length) { result.textContent = "choose files first"; return; }
    const form = new FormData();
    if (name) form.append("name", name);
    for (const f of files) form.append("files", f, f.name);
    result.textContent = "uploading…";
    const response = await fetch("v1/adapters", { method: "POST", body: form, headers: authHeaders() });
    const body = await response.json();
    if (response.ok) {
      result.textContent = `stored ${body.id} (${body.peft_type}, ${body.bytes} bytes)`;
      await loadModels(body.id);
      result.dataset.uploaded = body.id;   // set once the picker offers and selects it (the tests wait on this)
    } else {
      result.textContent = `${response.status}: ${body.error?.message ?? "upload failed"}`;
    }
  });

  window.peftserve = { connection, loadModels };
  connect();
  loadModels();
})();
