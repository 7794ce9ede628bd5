// MiniGPT-4 local chat page: talks to this server's OpenAI-compatible API (/v1/chat/completions,
// streamed), keeps the conversation in the page, and never loads anything from another origin.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp", "image/gif"];
  const KEY_STORAGE = "minigpt4-local.apiKey";

  const state = {
    messages: [], // the conversation in OpenAI's shape, sent whole with every question
    pending: [], // images chosen for the next question: {url, name}
    images: 0,
    busy: false,
    controller: null,
    model: null,
    key: localStorage.getItem(KEY_STORAGE) || "",
  };

  const el = {
    transcript: $("transcript"), empty: $("empty"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
    reset: $("reset"), attach: $("attach"), file: $("file-input"), dropzone: $("dropzone"), pending: $("pending"),
    gallery: $("gallery"), temperature: $("temperature"), temperatureValue: $("temperature-value"),
    maxTokens: $("max-tokens"), maxTokensValue: $("max-tokens-value"), modelName: $("model-name"),
    speed: $("speed"), health: $("health"), overlay: $("drop-overlay"), keyRow: $("key-row"), key: $("api-key"),
    composer: $("composer"),
  };

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function headers() {
    const h = { "Content-Type": "application/json" };
    if (state.key) h.Authorization = "Bearer " + state.key;
    return h;
  }

  // ----- server status and model -----

  function setHealth(kind, title) {
    el.health.className = "dot " + kind;
    el.health.title = title;
  }

  async function waitUntilReady() {
    for (;;) {
      try {
        const r = await fetch("/health", { cache: "no-store" });
        if (r.ok) {
          setHealth("ok", "ready");
          return;
        }
        const body = await r.json().catch(() => ({}));
        setHealth("", body.status || "starting");
        el.modelName.textContent = body.status === "loading" ? "loading model…" : body.status || "starting…";
      } catch (err) {
        setHealth("down", "server unreachable");
        el.modelName.textContent = "server unreachable";
      }
      await sleep(1000);
    }
  }

  async function loadModel() {
    const r = await fetch("/v1/models", { headers: headers() });
    if (r.status === 401) {
      el.keyRow.hidden = false;
      el.modelName.textContent = "API key needed";
      el.key.focus();
      return false;
    }
    if (!r.ok) {
      el.modelName.textContent = "model unavailable";
      return false;
    }
    const model = (await r.json()).data[0];
    state.model = model.id;
    el.modelName.textContent = model.name || model.id;
    el.modelName.title = model.id + (model.context_length ? ` · context ${model.context_length}` : "");
    const defaults = model.defaults || {};
    if (model.context_length) el.maxTokens.max = String(Math.min(model.context_length - 1, 2048));
    if (defaults.max_tokens) el.maxTokens.value = String(defaults.max_tokens);
    if (defaults.temperature !== undefined) el.temperature.value = String(defaults.temperature);
    showSliders();
    return true;
  }

  async function connect() {
    await waitUntilReady();
    await loadModel();
    // Keep the status dot honest while the page stays open.
    setInterval(async () => {
      try {
        const r = await fetch("/health", { cache: "no-store" });
        setHealth(r.ok ? "ok" : "", r.ok ? "ready" : "busy or restarting");
      } catch (err) {
        setHealth("down", "server unreachable");
      }
    }, 10000);
  }

  function showSliders() {
    const t = Number(el.temperature.value);
    el.temperatureValue.textContent = t === 0 ? "greedy" : t.toFixed(2);
    el.maxTokensValue.textContent = el.maxTokens.value;
  }

  // ----- images -----

  function readAsDataURL(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  async function addFiles(files) {
    for (const file of files) {
      if (!IMAGE_TYPES.includes(file.type)) {
        addError(`${file.name || "That file"} is not a PNG, JPEG, WebP or GIF image.`);
        continue;
      }
      state.pending.push({ url: await readAsDataURL(file), name: file.name || "pasted image" });
    }
    renderPending();
    el.prompt.focus();
  }

  function renderPending() {
    el.pending.replaceChildren();
    state.pending.forEach((image, index) => {
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.src = image.url;
      img.alt = image.name;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "×";
      remove.title = "Remove this image";
      remove.addEventListener("click", () => {
        state.pending.splice(index, 1);
        renderPending();
      });
      figure.append(img, remove);
      el.pending.append(figure);
    });
    el.pending.hidden = state.pending.length === 0;
  }

  // ----- transcript -----

  function scrollDown() {
    el.transcript.scrollTop = el.transcript.scrollHeight;
  }

  function addMessage(role, text, images) {
    el.empty.hidden = true;
    const wrap = document.createElement("div");
    wrap.className = "msg " + role;
    if (images && images.length) {
      const thumbs = document.createElement("div");
      thumbs.className = "thumbs";
      for (const image of images) {
        const img = document.createElement("img");
        img.src = image.url;
        img.alt = image.name;
        thumbs.append(img);
      }
      wrap.append(thumbs);
    }
    const bubble = document.createElement("div");
    bubble.className = "bubble";
    bubble.textContent = text;
    if (text || role !== "user") wrap.append(bubble);
    el.transcript.append(wrap);
    scrollDown();
    return { wrap, bubble };
  }

  function addError(message) {
    addMessage("error", message);
  }

  function setBusy(busy) {
    state.busy = busy;
    document.body.dataset.busy = String(busy);
    el.send.hidden = busy;
    el.stop.hidden = !busy;
  }

  // ----- asking -----

  async function errorMessage(response) {
    try {
      const body = await response.json();
      return (body.error && body.error.message) || response.statusText;
    } catch (err) {
      return `${response.status} ${response.statusText}`;
    }
  }

  async function ask() {
    if (state.busy) return;
    const text = el.prompt.value.trim();
    if (!text && state.pending.length === 0) {
      el.prompt.focus();
      return;
    }
    const images = state.pending.splice(0);
    renderPending();
    const content = images.map((image) => ({ type: "image_url", image_url: { url: image.url } }));
    if (text) content.push({ type: "text", text });
    const userMessage = { role: "user", content };
    addMessage("user", text, images);
    for (const image of images) {
      const img = document.createElement("img");
      img.src = image.url;
      img.alt = image.name;
      el.gallery.append(img);
    }
    el.prompt.value = "";
    autosize();
    state.messages.push(userMessage);

    const { wrap, bubble } = addMessage("assistant", "");
    wrap.dataset.done = "false";
    const meta = document.createElement("div");
    meta.className = "meta";
    setBusy(true);
    state.controller = new AbortController();
    const started = performance.now();
    let firstToken = 0;
    let answer = "";
    let usage = null;
    let finish = null;
    let failed = null;
    try {
      const temperature = Number(el.temperature.value);
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: headers(),
        signal: state.controller.signal,
        body: JSON.stringify({
          model: state.model || undefined,
          messages: state.messages,
          stream: true,
          stream_options: { include_usage: true },
          max_tokens: Number(el.maxTokens.value),
          temperature,
        }),
      });
      if (!response.ok) {
        if (response.status === 401) el.keyRow.hidden = false;
        failed = await errorMessage(response);
      } else {
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        let done = false;
        while (!done) {
          const chunk = await reader.read();
          if (chunk.done) break;
          buffer += decoder.decode(chunk.value, { stream: true });
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const event = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            for (const line of event.split("\n")) {
              if (!line.startsWith("data:")) continue;
              const data = line.slice(5).trim();
              if (data === "[DONE]") {
                done = true;
                continue;
              }
              const obj = JSON.parse(data);
              if (obj.error) {
                failed = obj.error.message;
                continue;
              }
              if (obj.usage) usage = obj.usage;
              const choice = (obj.choices || [])[0];
              if (!choice) continue;
              const delta = (choice.delta && choice.delta.content) || "";
              if (delta) {
                if (!firstToken) firstToken = performance.now();
                answer += delta;
                bubble.textContent = answer;
                scrollDown();
              }
              if (choice.finish_reason) finish = choice.finish_reason;
            }
          }
        }
      }
    } catch (err) {
      if (err.name === "AbortError") finish = "stopped";
      else failed = "The server could not be reached (" + err.message + ").";
    } finally {
      state.controller = null;
      setBusy(false);
    }
    const ended = performance.now();
    wrap.dataset.done = "true";
    if (failed !== null && !answer) {
      wrap.remove();
      state.messages.pop(); // the question was not answered: leave it out of the conversation
      addError(failed);
      return;
    }
    if (answer) state.messages.push({ role: "assistant", content: answer });
    else bubble.textContent = finish === "stopped" ? "(stopped)" : "(no answer)";
    const tokens = usage ? usage.completion_tokens : null;
    const parts = [];
    if (tokens !== null) {
      const seconds = (ended - (firstToken && tokens > 1 ? firstToken : started)) / 1000;
      const rate = tokens > 1 && firstToken ? (tokens - 1) / Math.max(seconds, 1e-3) : tokens / Math.max(seconds, 1e-3);
      parts.push(`${tokens} tokens`, `${rate.toFixed(1)} tok/s`);
      el.speed.textContent = `${rate.toFixed(1)} tok/s`;
    }
    parts.push(`${((ended - started) / 1000).toFixed(2)} s`);
    if (finish === "length") parts.push("stopped at max tokens");
    if (finish === "stopped") parts.push("stopped");
    if (failed) parts.push("error: " + failed);
    meta.textContent = parts.join(" · ");
    wrap.append(meta);
    scrollDown();
  }

  function stop() {
    if (state.controller) state.controller.abort();
  }

  function reset() {
    stop();
    state.messages = [];
    state.pending = [];
    renderPending();
    el.gallery.replaceChildren();
    for (const node of [...el.transcript.children]) if (node !== el.empty) node.remove();
    el.empty.hidden = false;
    el.prompt.value = "";
    autosize();
    el.prompt.focus();
  }

  function autosize() {
    el.prompt.style.height = "auto";
    el.prompt.style.height = Math.min(el.prompt.scrollHeight, 180) + "px";
  }

  // ----- wiring -----

  el.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    ask();
  });
  el.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      ask();
    }
  });
  el.prompt.addEventListener("input", autosize);
  el.stop.addEventListener("click", stop);
  el.reset.addEventListener("click", reset);
  el.attach.addEventListener("click", () => el.file.click());
  el.file.addEventListener("change", () => {
    addFiles([...el.file.files]);
    el.file.value = "";
  });
  el.dropzone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      el.file.click();
    }
  });
  for (const input of [el.temperature, el.maxTokens]) input.addEventListener("input", showSliders);
  el.key.addEventListener("change", async () => {
    state.key = el.key.value.trim();
    localStorage.setItem(KEY_STORAGE, state.key);
    if (await loadModel()) el.keyRow.hidden = true;
  });
  for (const chip of document.querySelectorAll(".chip")) {
    chip.addEventListener("click", () => {
      el.prompt.value = chip.dataset.question;
      autosize();
      if (state.pending.length) ask();
      else el.prompt.focus();
    });
  }

  // Drag and drop anywhere on the page; paste from the clipboard.
  let dragDepth = 0;
  const hasFiles = (event) => event.dataTransfer && [...event.dataTransfer.types].includes("Files");
  window.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    dragDepth += 1;
    el.overlay.hidden = false;
    el.dropzone.classList.add("over");
  });
  window.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) {
      el.overlay.hidden = true;
      el.dropzone.classList.remove("over");
    }
  });
  window.addEventListener("dragover", (event) => {
    if (hasFiles(event)) event.preventDefault();
  });
  window.addEventListener("drop", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    dragDepth = 0;
    el.overlay.hidden = true;
    el.dropzone.classList.remove("over");
    addFiles([...event.dataTransfer.files]);
  });
  window.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData ? event.clipboardData.items : [])]
      .filter((item) => item.kind === "file" && IMAGE_TYPES.includes(item.type))
      .map((item) => item.getAsFile())
      .filter(Boolean);
    if (files.length) {
      event.preventDefault();
      addFiles(files);
    }
  });

  showSliders();
  connect();
})();
