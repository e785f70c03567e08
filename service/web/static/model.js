// Real-model page: posts a sentence to /v1/tokens with "model": "minilm-l6", draws BertViz's
// head view in the browser (an SVG: wordpieces twice, lines whose opacity is the weight, one
// colour per head, hover to isolate one wordpiece) and shows the server's model view, with the
// pictures' PNG and SVG downloads. Plain browser JavaScript, nothing fetched from elsewhere.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const SVG_NS = "http://www.w3.org/2000/svg";
  // The server's head colours (service/render/model_views.py), so both views agree.
  const COLOURS = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939",
  ];
  const MIN_WEIGHT = 0.01; // lighter lines are not drawn (as the server's head view)
  const MAX_LINES = 20000; // beyond this many, only the heaviest are drawn (as the server's)

  // What was computed: weights (layers, heads, L, L) row-major, and the pictures' references.
  let result = null;
  let layer = 0;
  let shown = new Set();

  // ------------------------------------------------------------------------------------------
  // Requests

  const { authHeaders, keepKeyInSession, postJSON } = attentionApi; // api.js

  function decodeFloat32(value, shape) {
    // {"dtype": "float32", "shape", "b64"}: little-endian bytes.
    const raw = atob(value.b64);
    const bytes = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
    const view = new DataView(bytes.buffer);
    const out = new Float32Array(bytes.length / 4);
    for (let i = 0; i < out.length; i++) out[i] = view.getFloat32(4 * i, true);
    if (shape && out.length !== shape.reduce((a, b) => a * b, 1)) throw new Error("bad tensor");
    return out;
  }

  function clearErrors() {
    for (const id of ["text-error", "text_pair-error", "api-key-error"]) $(id).textContent = "";
    $("form-error").hidden = true;
    $("form-error").textContent = "";
  }

  function showProblem(response, data) {
    const detail = (data && (data.detail || data.title)) || response.statusText || "no details";
    if (response.status === 401 || response.status === 403) {
      $("api-key-error").textContent = `The service needs a valid API key (${response.status}): ${detail}`;
      $("api-key").focus();
      return;
    }
    const errors = (data && data.errors) || [];
    const leftovers = [];
    for (const e of errors) {
      const field = { text: "text-error", text_pair: "text_pair-error" }[String(e.loc[0])];
      if (field) $(field).textContent = e.msg;
      else leftovers.push(`${e.loc.join(".")}: ${e.msg}`);
    }
    if (!errors.length || leftovers.length) {
      const banner = $("form-error");
      const title = document.createElement("strong");
      title.textContent = (data && data.title) || `Error ${response.status}`;
      const body = document.createElement("div");
      body.textContent = leftovers.length ? leftovers.join("; ") : detail;
      banner.replaceChildren(title, body);
      banner.hidden = false;
    }
  }

  async function run(event) {
    event.preventDefault();
    clearErrors();
    const body = {
      model: "minilm-l6",
      text: $("text").value,
      truncate: $("truncate").checked,
      encoding: "b64",
      heatmap: { views: ["model", "head"] },
    };
    const pair = $("text-pair").value;
    if (pair.trim() !== "") body.text_pair = pair;
    $("submit").disabled = true;
    $("status").textContent = "Running the model…";
    try {
      const { response, data } = await postJSON("/v1/tokens", body);
      if (!response.ok) {
        showProblem(response, data);
        $("status").textContent = "";
        return;
      }
      show(data);
      $("status").textContent = `Done in ${data.meta.elapsed_ms.toFixed(0)} ms`;
    } catch (e) {
      $("status").textContent = "";
      $("form-error").textContent = `The service could not be reached: ${e.message}`;
      $("form-error").hidden = false;
    } finally {
      $("submit").disabled = false;
    }
  }

  // ------------------------------------------------------------------------------------------
  // Showing a result

  function show(data) {
    const n = data.tokens.length;
    const nl = data.layers.length;
    const nh = data.heads.length;
    result = {
      tokens: data.tokens,
      typeIds: data.token_type_ids,
      layers: data.layers,
      heads: data.heads,
      n,
      weights: decodeFloat32(data.weights, [nl, nh, n, n]),
      images: data.heatmaps,
    };
    const summary = $("summary");
    summary.replaceChildren();
    const rows = [
      ["wordpieces", `${n}${data.meta.truncated ? ` of ${data.meta.wordpieces}` : ""}`],
      ["layers × heads", `${nl} × ${nh}`],
      ["time", `${data.meta.elapsed_ms.toFixed(1)} ms, of which ${data.meta.kernel_ms.toFixed(1)} ms in the kernel`],
      ["embedding", `${data.meta.embedding_wordpieces} wordpieces, mean-pooled, unit length`],
    ];
    for (const [k, v] of rows) {
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.textContent = v;
      summary.append(dt, dd);
    }
    $("notes").replaceChildren(
      ...data.notes.map((note) => {
        const li = document.createElement("li");
        li.textContent = note;
        return li;
      }),
    );
    const select = $("layer");
    select.replaceChildren(
      ...result.layers.map((l, i) => {
        const o = document.createElement("option");
        o.value = String(i);
        o.textContent = `layer ${l}`;
        return o;
      }),
    );
    layer = Math.min(layer, nl - 1);
    select.value = String(layer);
    if (shown.size === 0 || [...shown].some((h) => h >= nh)) shown = new Set(result.heads.map((_, i) => i));
    buildHeadPicker();
    drawHeadView();
    showModelView();
    $("empty").hidden = true;
    $("result").hidden = false;
  }

  function buildHeadPicker() {
    const picker = $("head-picker");
    picker.replaceChildren(
      ...result.heads.map((head, k) => {
        const label = document.createElement("label");
        const box = document.createElement("input");
        box.type = "checkbox";
        box.checked = shown.has(k);
        box.dataset.head = String(k);
        box.addEventListener("change", () => {
          if (box.checked) shown.add(k);
          else shown.delete(k);
          drawHeadView();
        });
        const swatch = document.createElement("span");
        swatch.className = "swatch";
        swatch.style.background = COLOURS[head % COLOURS.length];
        label.append(box, swatch, document.createTextNode(`head ${head}`));
        return label;
      }),
    );
  }

  function weightAt(l, k, i, j) {
    const n = result.n;
    return result.weights[((l * result.heads.length + k) * n + i) * n + j];
  }

  function lineFloor(heads) {
    // The lightest weight drawn: 1 %, raised so that at most MAX_LINES lines are drawn.
    const visible = [];
    const n = result.n;
    for (const k of heads) {
      for (let i = 0; i < n * n; i++) {
        const w = result.weights[(layer * result.heads.length + k) * n * n + i];
        if (w >= MIN_WEIGHT) visible.push(w);
      }
    }
    if (visible.length <= MAX_LINES) return MIN_WEIGHT;
    visible.sort((a, b) => b - a);
    return visible[MAX_LINES - 1];
  }

  function drawHeadView() {
    const svg = $("head-view");
    const n = result.n;
    const row = 20;
    const width = 560;
    const xLeft = 200;
    const xRight = 360;
    svg.setAttribute("width", String(width));
    svg.setAttribute("height", String(row * n + 24));
    svg.setAttribute("viewBox", `0 0 ${width} ${row * n + 24}`);
    svg.classList.remove("focused");
    const heads = [...shown].sort((a, b) => a - b);
    const floor = lineFloor(heads);
    const parts = [];
    const y = (i) => 12 + row * i + row / 2;
    for (const k of heads) {
      const colour = COLOURS[result.heads[k] % COLOURS.length];
      for (let i = 0; i < n; i++) {
        for (let j = 0; j < n; j++) {
          const w = weightAt(layer, k, i, j);
          if (w < floor) continue;
          const line = document.createElementNS(SVG_NS, "line");
          line.setAttribute("x1", String(xLeft));
          line.setAttribute("y1", String(y(i)));
          line.setAttribute("x2", String(xRight));
          line.setAttribute("y2", String(y(j)));
          line.setAttribute("stroke", colour);
          line.setAttribute("stroke-width", "2");
          line.setAttribute("stroke-opacity", String(Math.min(1, w)));
          line.dataset.q = String(i);
          line.dataset.k = String(j);
          line.dataset.head = String(k);
          parts.push(line);
        }
      }
    }
    for (let i = 0; i < n; i++) {
      for (const side of ["query", "key"]) {
        const t = document.createElementNS(SVG_NS, "text");
        t.textContent = result.tokens[i];
        t.setAttribute("x", String(side === "query" ? xLeft - 8 : xRight + 8));
        t.setAttribute("y", String(y(i)));
        t.setAttribute("text-anchor", side === "query" ? "end" : "start");
        t.setAttribute("dominant-baseline", "middle");
        t.dataset.side = side;
        t.dataset.index = String(i);
        t.addEventListener("mouseenter", (e) => focus(side, i, e));
        t.addEventListener("mouseleave", unfocus);
        parts.push(t);
      }
    }
    svg.replaceChildren(...parts);
  }

  function focus(side, i, event) {
    const svg = $("head-view");
    svg.classList.add("focused");
    const attr = side === "query" ? "q" : "k";
    for (const line of svg.querySelectorAll("line")) {
      line.classList.toggle("on", line.dataset[attr] === String(i));
    }
    for (const t of svg.querySelectorAll("text")) {
      t.classList.toggle("focus", t.dataset.side === side && t.dataset.index === String(i));
    }
    // The tooltip: this wordpiece's heaviest partners in each head shown.
    const tip = $("tooltip");
    const lines = [];
    for (const k of [...shown].sort((a, b) => a - b)) {
      let best = -1;
      let bestW = -1;
      for (let j = 0; j < result.n; j++) {
        const w = side === "query" ? weightAt(layer, k, i, j) : weightAt(layer, k, j, i);
        if (w > bestW) {
          bestW = w;
          best = j;
        }
      }
      lines.push(`head ${result.heads[k]}: ${side === "query" ? "→" : "←"} ${result.tokens[best]} ${bestW.toFixed(4)}`);
    }
    const title = document.createElement("strong");
    title.textContent = `${side} ${result.tokens[i]} (${i})`;
    tip.replaceChildren(title, ...lines.map((text) => {
      const div = document.createElement("div");
      div.textContent = text;
      return div;
    }));
    tip.hidden = false;
    tip.style.left = `${event.pageX + 14}px`;
    tip.style.top = `${event.pageY + 10}px`;
  }

  function unfocus() {
    $("head-view").classList.remove("focused");
    for (const t of $("head-view").querySelectorAll("text.focus")) t.classList.remove("focus");
    $("tooltip").hidden = true;
  }

  function imageRef(view, layerIndex) {
    const wanted = view === "model" ? null : result.layers[layerIndex];
    return result.images.find((im) => im.view === view && im.layer === wanted);
  }

  async function fetchBlob(url) {
    // Fetched (not <img src>) so that the API key goes along when one is configured.
    const r = await fetch(url, { headers: authHeaders() });
    if (!r.ok) throw new Error(`${r.status} ${r.statusText}`);
    return URL.createObjectURL(await r.blob());
  }

  async function showModelView() {
    const ref = imageRef("model");
    const img = $("model-view");
    if (!ref) return;
    img.src = await fetchBlob(ref.url);
  }

  async function download(view, ext) {
    const ref = imageRef(view, layer);
    if (!ref) return;
    const href = await fetchBlob(ext === "svg" ? ref.svg_url : ref.url);
    const a = document.createElement("a");
    a.href = href;
    a.download = view === "model" ? `minilm-l6-model-view.${ext}` : `minilm-l6-layer${ref.layer}-head-view.${ext}`;
    document.body.append(a);
    a.click();
    a.remove();
  }

  async function modelStatus() {
    try {
      const r = await fetch("/v1/models", { headers: authHeaders() });
      if (!r.ok) return;
      const { models } = await r.json();
      const m = models.find((x) => x.name === "minilm-l6");
      if (m && !m.installed) {
        $("model-status").textContent = `This server does not have the model installed: ${m.install}`;
        $("submit").disabled = true;
      } else if (m) {
        $("model-status").textContent = `Weights: ${m.source} (${m.licence}), sha256 ${m.sha256.slice(0, 12)}…`;
      }
    } catch {
      /* the page still works; the request will say what is wrong */
    }
  }

  // ------------------------------------------------------------------------------------------
  // Wiring

  function init() {
    keepKeyInSession();
    $("form").addEventListener("submit", run);
    $("layer").addEventListener("change", () => {
      layer = Number($("layer").value);
      drawHeadView();
    });
    $("heads-all").addEventListener("click", () => {
      shown = new Set(result.heads.map((_, i) => i));
      buildHeadPicker();
      drawHeadView();
    });
    $("heads-none").addEventListener("click", () => {
      shown = new Set();
      buildHeadPicker();
      drawHeadView();
    });
    for (const id of ["head-png", "head-svg"]) {
      $(id).addEventListener("click", () => download("head", $(id).dataset.ext));
    }
    for (const id of ["model-png", "model-svg"]) {
      $(id).addEventListener("click", () => download("model", $(id).dataset.ext));
    }
    modelStatus();
    document.body.dataset.ready = "true";
  }

  init();
})();
