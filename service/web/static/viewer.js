// Attention viewer: posts the form to /v1/tokens or /v1/attention, draws every head's weights
// on canvases (hover for values, click to enlarge) beside the server-rendered PNGs.
// Plain browser JavaScript: no framework, no build step, nothing fetched from elsewhere.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  // matplotlib's viridis, 256 RGB entries: the same colours as the server's PNGs.
  const VIRIDIS_HEX =
    "44015444025645045745055946075a46085c460a5d460b5e470d60470e61471063471164471365481467481668481769" +
    "48186a481a6c481b6d481c6e481d6f481f70482071482173482374482475482576482677482878482979472a7a472c7a" +
    "472d7b472e7c472f7d46307e46327e46337f463480453581453781453882443983443a83443b84433d84433e85423f85" +
    "4240864241864142874144874045884046883f47883f48893e49893e4a893e4c8a3d4d8a3d4e8a3c4f8a3c508b3b518b" +
    "3b528b3a538b3a548c39558c39568c38588c38598c375a8c375b8d365c8d365d8d355e8d355f8d34608d34618d33628d" +
    "33638d32648e32658e31668e31678e31688e30698e306a8e2f6b8e2f6c8e2e6d8e2e6e8e2e6f8e2d708e2d718e2c718e" +
    "2c728e2c738e2b748e2b758e2a768e2a778e2a788e29798e297a8e297b8e287c8e287d8e277e8e277f8e27808e26818e" +
    "26828e26828e25838e25848e25858e24868e24878e23888e23898e238a8d228b8d228c8d228d8d218e8d218f8d21908d" +
    "21918c20928c20928c20938c1f948c1f958b1f968b1f978b1f988b1f998a1f9a8a1e9b8a1e9c891e9d891f9e891f9f88" +
    "1fa0881fa1881fa1871fa28720a38620a48621a58521a68522a78522a88423a98324aa8325ab8225ac8226ad8127ad81" +
    "28ae8029af7f2ab07f2cb17e2db27d2eb37c2fb47c31b57b32b67a34b67935b77937b87838b9773aba763bbb753dbc74" +
    "3fbc7340bd7242be7144bf7046c06f48c16e4ac16d4cc26c4ec36b50c46a52c56954c56856c66758c7655ac8645cc863" +
    "5ec96260ca6063cb5f65cb5e67cc5c69cd5b6ccd5a6ece5870cf5773d05675d05477d1537ad1517cd2507fd34e81d34d" +
    "84d44b86d54989d5488bd6468ed64590d74393d74195d84098d83e9bd93c9dd93ba0da39a2da37a5db36a8db34aadc32" +
    "addc30b0dd2fb2dd2db5de2bb8de29bade28bddf26c0df25c2df23c5e021c8e020cae11fcde11dd0e11cd2e21bd5e21a" +
    "d8e219dae319dde318dfe318e2e418e5e419e7e419eae51aece51befe51cf1e51df4e61ef6e620f8e621fbe723fde725";
  const VIRIDIS = new Uint8Array(768);
  for (let i = 0; i < 768; i++) VIRIDIS[i] = parseInt(VIRIDIS_HEX.substr(2 * i, 2), 16);
  const NAN_RGB = [200, 200, 200];
  const TENSORS = ["q", "k", "v"]; // one .npy file field each; k and v default to q

  // ------------------------------------------------------------------------------------------
  // Errors next to their fields

  class FieldError extends Error {
    constructor(loc, msg) {
      super(msg);
      this.loc = loc;
    }
  }

  const errorElements = () => Array.from(document.querySelectorAll(".field-error"));

  function controlsFor(errorEl) {
    // The inputs that name this message in aria-describedby are the ones marked invalid.
    return Array.from(document.querySelectorAll("[aria-describedby]")).filter((el) =>
      el.getAttribute("aria-describedby").split(/\s+/).includes(errorEl.id),
    );
  }

  function clearErrors() {
    for (const el of errorElements()) {
      el.textContent = "";
      for (const c of controlsFor(el)) {
        c.classList.remove("invalid");
        c.removeAttribute("aria-invalid");
      }
    }
    const banner = $("form-error");
    banner.hidden = true;
    banner.textContent = "";
  }

  function findErrorElement(loc) {
    // The most specific field that claims the location: ["window", "left"] -> "window.left",
    // then "window". Element data-loc lists every location a field answers for.
    const parts = (Array.isArray(loc) ? loc : [loc]).map(String);
    for (let n = parts.length; n > 0; n--) {
      const key = parts.slice(0, n).join(".");
      const el = errorElements().find((e) => (e.dataset.loc || "").split(/\s+/).includes(key));
      if (el && !el.closest("[hidden]")) return el;
    }
    return null;
  }

  function showBanner(title, lines) {
    const banner = $("form-error");
    banner.textContent = "";
    const strong = document.createElement("strong");
    strong.textContent = title;
    banner.append(strong);
    if (lines.length) {
      const ul = document.createElement("ul");
      for (const line of lines) {
        const li = document.createElement("li");
        li.textContent = line;
        ul.append(li);
      }
      banner.append(ul);
    }
    banner.hidden = false;
  }

  function showErrors(items, title) {
    // items: [{loc, msg}]; those without a field of their own go to the banner.
    const leftovers = [];
    let first = null;
    for (const { loc, msg } of items) {
      const el = findErrorElement(loc);
      if (!el) {
        leftovers.push(loc && loc.length ? `${[].concat(loc).join(".")}: ${msg}` : msg);
        continue;
      }
      el.textContent = el.textContent ? `${el.textContent}; ${msg}` : msg;
      for (const c of controlsFor(el)) {
        c.classList.add("invalid");
        c.setAttribute("aria-invalid", "true");
        first = first || c;
      }
    }
    if (leftovers.length) showBanner(title || "The service could not compute this", leftovers);
    if (first && typeof first.focus === "function") first.focus({ preventScroll: false });
  }

  // ------------------------------------------------------------------------------------------
  // Reading the form

  function intField(id, loc, { optional = false } = {}) {
    const el = $(id);
    if (el.validity && el.validity.badInput) throw new FieldError(loc, "enter a whole number");
    const raw = el.value.trim();
    if (raw === "") {
      if (optional) return undefined;
      throw new FieldError(loc, "required");
    }
    const n = Number(raw);
    if (!Number.isInteger(n)) throw new FieldError(loc, `enter a whole number, not ${raw}`);
    return n; // Range checks are the service's: its messages name the limits.
  }

  function floatField(id, loc) {
    const el = $(id);
    if (el.validity && el.validity.badInput) throw new FieldError(loc, "enter a number");
    const raw = el.value.trim();
    if (raw === "") return undefined;
    const n = Number(raw);
    if (!Number.isFinite(n)) throw new FieldError(loc, `enter a finite number, not ${raw}`);
    return n;
  }

  function collect(errors, fn) {
    try {
      return fn();
    } catch (e) {
      if (!(e instanceof FieldError)) throw e;
      errors.push({ loc: e.loc, msg: e.message });
      return undefined;
    }
  }

  function maskingOptions(errors) {
    const body = {};
    const causal = $("causal").value;
    if (causal !== "off") body.causal = causal === "top_left" ? true : causal;
    const left = collect(errors, () => intField("window-left", ["window", "left"], { optional: true }));
    const right = collect(errors, () =>
      intField("window-right", ["window", "right"], { optional: true }),
    );
    const dilation = collect(errors, () =>
      intField("window-dilation", ["window", "dilation"], { optional: true }),
    );
    if (left !== undefined || right !== undefined || (dilation !== undefined && dilation !== 1)) {
      body.window = {};
      if (left !== undefined) body.window.left = left;
      if (right !== undefined) body.window.right = right;
      if (dilation !== undefined) body.window.dilation = dilation;
    }
    const globals = $("global_tokens").value.trim();
    if (globals) {
      const parts = globals.split(/[\s,;]+/).filter(Boolean);
      const bad = parts.filter((p) => !/^[+-]?\d+$/.test(p));
      if (bad.length) {
        errors.push({ loc: ["global_tokens"], msg: `not whole numbers: ${bad.join(", ")}` });
      } else {
        body.global_tokens = parts.map(Number);
      }
    }
    return body;
  }

  function tokensRequest(errors) {
    const text = $("text").value;
    const perLine = document.querySelector("input[name=split]:checked").value === "tokens";
    const body = {};
    if (perLine) {
      const tokens = text.split(/\r?\n/).map((t) => t.trim()).filter((t) => t !== "");
      if (!tokens.length) errors.push({ loc: ["tokens"], msg: "enter at least one token" });
      body.tokens = tokens;
    } else {
      if (!text.trim()) errors.push({ loc: ["text"], msg: "enter a sentence" });
      body.text = text;
    }
    body.d_model = collect(errors, () => intField("d_model", ["d_model"]));
    body.num_heads = collect(errors, () => intField("num_heads", ["num_heads"]));
    body.positional = $("positional").value;
    body.seed = collect(errors, () => intField("seed", ["seed"]));
    Object.assign(body, maskingOptions(errors));
    body.heatmap = { heads: "all" };
    body.encoding = "b64";
    return body;
  }

  async function attentionRequest(errors) {
    const tensors = {};
    for (const name of TENSORS) {
      const file = $(`file-${name}`).files[0];
      if (!file) continue;
      try {
        tensors[name] = npyToWire(parseNpy(await file.arrayBuffer()));
      } catch (e) {
        errors.push({ loc: [name], msg: `${file.name}: ${e.message}` });
      }
    }
    if (!$("file-q").files[0]) errors.push({ loc: ["q"], msg: "choose a .npy file for q" });
    const body = {
      q: tensors.q,
      k: tensors.k || tensors.q,
      v: tensors.v || tensors.k || tensors.q,
    };
    const scale = collect(errors, () => floatField("scale", ["scale"]));
    if (scale !== undefined) body.scale = scale;
    Object.assign(body, maskingOptions(errors));
    const heatmap = { heads: "all" };
    heatmap.batch = collect(errors, () => intField("batch", ["heatmap", "batch"])) ?? 0;
    const labels = $("labels").value.trim();
    if (labels) heatmap.tokens = labels.split(/\s+/);
    body.heatmap = heatmap;
    body.return_weights = true;
    body.encoding = "b64";
    return body;
  }

  // ------------------------------------------------------------------------------------------
  // .npy files (format: magic, version, header length, a Python dict literal, raw data)

  const NPY_MAGIC = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59];

  function parseNpy(buffer) {
    const bytes = new Uint8Array(buffer);
    if (bytes.length < 10 || NPY_MAGIC.some((b, i) => bytes[i] !== b)) {
      throw new Error("not a .npy file (it does not start with \\x93NUMPY)");
    }
    const view = new DataView(buffer);
    const major = bytes[6];
    let headerLen;
    let start;
    if (major === 1) {
      headerLen = view.getUint16(8, true);
      start = 10;
    } else if (major === 2 || major === 3) {
      if (bytes.length < 12) throw new Error("truncated .npy header");
      headerLen = view.getUint32(8, true);
      start = 12;
    } else {
      throw new Error(`unsupported .npy format version ${major}.${bytes[7]}`);
    }
    if (start + headerLen > bytes.length) throw new Error("truncated .npy header");
    const header = new TextDecoder(major === 3 ? "utf-8" : "latin1").decode(
      bytes.subarray(start, start + headerLen),
    );
    const descr = /['"]descr['"]\s*:\s*['"]([^'"]*)['"]/.exec(header);
    if (!descr) {
      if (/['"]descr['"]\s*:\s*\[/.test(header)) {
        throw new Error("structured (record) arrays are not supported");
      }
      throw new Error("the .npy header has no dtype ('descr')");
    }
    const fortran = /['"]fortran_order['"]\s*:\s*(True|False)/.exec(header);
    const shapeText = /['"]shape['"]\s*:\s*\(([^)]*)\)/.exec(header);
    if (!fortran || !shapeText) throw new Error("the .npy header lacks fortran_order or shape");
    const shape = shapeText[1]
      .split(",")
      .map((s) => s.trim().replace(/L$/, ""))
      .filter((s) => s !== "")
      .map((s) => {
        if (!/^\d+$/.test(s)) throw new Error(`bad dimension '${s}' in the .npy shape`);
        return Number(s);
      });
    const dt = /^([<>|=]?)([fiub?])(\d*)$/.exec(descr[1]);
    if (!dt) throw new Error(`unsupported dtype '${descr[1]}'`);
    const kind = dt[2] === "?" ? "b" : dt[2];
    const itemsize = Number(dt[3] || 1);
    if (kind === "b") throw new Error("holds booleans; q, k and v must be numbers");
    const known = { f: [2, 4, 8], i: [1, 2, 4, 8], u: [1, 2, 4, 8] };
    if (!known[kind].includes(itemsize)) throw new Error(`unsupported dtype '${descr[1]}'`);
    const count = shape.reduce((a, b) => a * b, 1);
    const dataStart = start + headerLen;
    const need = count * itemsize;
    if (bytes.length - dataStart < need) {
      throw new Error(
        `truncated: the shape (${shape.join(", ")}) needs ${need} bytes of data, ` +
          `the file has ${bytes.length - dataStart}`,
      );
    }
    let data = bytes.slice(dataStart, dataStart + need);
    if (dt[1] === ">" && itemsize > 1) swapBytes(data, itemsize);
    if (fortran[1] === "True" && shape.length > 1) data = fortranToC(data, shape, itemsize);
    return { kind, itemsize, shape, data, descr: descr[1] };
  }

  function swapBytes(data, itemsize) {
    for (let o = 0; o < data.length; o += itemsize) {
      for (let a = o, b = o + itemsize - 1; a < b; a++, b--) {
        const t = data[a];
        data[a] = data[b];
        data[b] = t;
      }
    }
  }

  function fortranToC(src, shape, itemsize) {
    // Element (i0, .., in) sits at sum(i_d * prod(shape[:d])) in Fortran order.
    const nd = shape.length;
    const strides = [];
    let s = 1;
    for (let d = 0; d < nd; d++) {
      strides.push(s);
      s *= shape[d];
    }
    const out = new Uint8Array(src.length);
    const idx = new Array(nd).fill(0);
    const count = src.length / itemsize;
    for (let c = 0; c < count; c++) {
      let off = 0;
      for (let d = 0; d < nd; d++) off += idx[d] * strides[d];
      for (let b = 0; b < itemsize; b++) out[c * itemsize + b] = src[off * itemsize + b];
      for (let d = nd - 1; d >= 0; d--) {
        if (++idx[d] < shape[d]) break;
        idx[d] = 0;
      }
    }
    return out;
  }

  function npyToWire(arr) {
    // Floats travel as they are (little-endian bytes); integers are sent as float32 values.
    let dtype;
    let bytes = arr.data;
    if (arr.kind === "f") {
      dtype = { 2: "float16", 4: "float32", 8: "float64" }[arr.itemsize];
    } else {
      const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      const n = bytes.length / arr.itemsize;
      const out = new Float32Array(n);
      const signed = arr.kind === "i";
      for (let i = 0; i < n; i++) {
        const o = i * arr.itemsize;
        switch (arr.itemsize) {
          case 1: out[i] = signed ? view.getInt8(o) : view.getUint8(o); break;
          case 2: out[i] = signed ? view.getInt16(o, true) : view.getUint16(o, true); break;
          case 4: out[i] = signed ? view.getInt32(o, true) : view.getUint32(o, true); break;
          default:
            out[i] = Number(signed ? view.getBigInt64(o, true) : view.getBigUint64(o, true));
        }
      }
      bytes = littleEndianFloat32(out);
      dtype = "float32";
    }
    return { dtype, shape: arr.shape, b64: toBase64(bytes) };
  }

  function littleEndianFloat32(values) {
    const bytes = new Uint8Array(values.length * 4);
    const view = new DataView(bytes.buffer);
    for (let i = 0; i < values.length; i++) view.setFloat32(i * 4, values[i], true);
    return bytes;
  }

  function toBase64(bytes) {
    let s = "";
    const chunk = 0x8000;
    for (let i = 0; i < bytes.length; i += chunk) {
      s += String.fromCharCode.apply(null, bytes.subarray(i, i + chunk));
    }
    return btoa(s);
  }

  // ------------------------------------------------------------------------------------------
  // Tensors in responses: nested lists (null = NaN) or {dtype, shape, b64}

  function decodeTensor(value) {
    if (value && typeof value === "object" && !Array.isArray(value)) {
      const raw = atob(value.b64);
      const bytes = new Uint8Array(raw.length);
      for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
      const view = new DataView(bytes.buffer);
      const size = { float16: 2, bfloat16: 2, float32: 4, float64: 8 }[value.dtype];
      if (!size) throw new Error(`unexpected dtype ${value.dtype} in the response`);
      const n = bytes.length / size;
      const out = new Float64Array(n);
      for (let i = 0; i < n; i++) {
        if (value.dtype === "float32") out[i] = view.getFloat32(i * 4, true);
        else if (value.dtype === "float64") out[i] = view.getFloat64(i * 8, true);
        else if (value.dtype === "float16") out[i] = half(view.getUint16(i * 2, true));
        else out[i] = bfloat(view.getUint16(i * 2, true));
      }
      return { shape: value.shape, data: out };
    }
    const shape = [];
    for (let v = value; Array.isArray(v); v = v[0]) shape.push(v.length);
    const flat = value.flat(Infinity).map((x) => (x === null ? NaN : x));
    return { shape, data: Float64Array.from(flat) };
  }

  function half(bits) {
    const sign = bits & 0x8000 ? -1 : 1;
    const exp = (bits >> 10) & 0x1f;
    const frac = bits & 0x3ff;
    if (exp === 0) return sign * 2 ** -14 * (frac / 1024);
    if (exp === 31) return frac ? NaN : sign * Infinity;
    return sign * 2 ** (exp - 15) * (1 + frac / 1024);
  }

  function bfloat(bits) {
    const view = new DataView(new ArrayBuffer(4));
    view.setUint32(0, bits << 16, false);
    return view.getFloat32(0, false);
  }

  // ------------------------------------------------------------------------------------------
  // Talking to the service

  const { apiKey, authHeaders, keepKeyInSession, postJSON } = attentionApi; // api.js

  // One request in flight per purpose ("compute", "images"); a newer one cancels the older.
  const inflight = new Map();

  async function post(path, body, purpose) {
    if (inflight.has(purpose)) inflight.get(purpose).abort();
    const controller = new AbortController();
    inflight.set(purpose, controller);
    return postJSON(path, body, controller.signal);
  }

  function reportProblem(response, data) {
    const status = response.status;
    const detail = (data && (data.detail || data.title)) || response.statusText || "no details";
    if (status === 401 || status === 403) {
      const msg = apiKey()
        ? `The service refused this API key (${status}): ${detail}`
        : `The service needs an API key (${status}): ${detail}`;
      showErrors([{ loc: ["authorization"], msg }]);
      $("api-key").focus();
      return;
    }
    if (data && Array.isArray(data.errors) && data.errors.length) {
      showErrors(data.errors, data.title || `Error ${status}`);
      return;
    }
    let title = (data && data.title) || `Error ${status}`;
    if (status === 503) {
      const retry = response.headers.get("Retry-After");
      title = `The service is busy${retry ? `; try again in ${retry} s` : ""}`;
    }
    showBanner(title, [detail]);
  }

  const imageCache = new Map();

  async function imageBlobUrl(url) {
    // Fetched (not <img src>) so that the API key goes along when one is configured.
    if (!imageCache.has(url)) {
      imageCache.set(
        url,
        fetch(url, { headers: authHeaders() }).then((r) => {
          if (!r.ok) throw new Error(`${r.status} ${r.statusText}`);
          return r.blob().then((b) => URL.createObjectURL(b));
        }),
      );
    }
    try {
      return await imageCache.get(url);
    } catch (e) {
      imageCache.delete(url);
      throw e;
    }
  }

  function imageSource(ref) {
    if (!ref) return null;
    if (ref.png) return Promise.resolve(`data:image/png;base64,${ref.png}`);
    if (ref.url) return imageBlobUrl(ref.url);
    return null;
  }

  // ------------------------------------------------------------------------------------------
  // Drawing

  // What the page shows: maps[h] is (Lq * Lk) row-major; key "mean" is the head average.
  let view = null;

  function buildView(weights, queries, keys, images, extra) {
    const [heads, lq, lk] = weights.shape;
    const maps = [];
    for (let h = 0; h < heads; h++) {
      maps.push(weights.data.subarray(h * lq * lk, (h + 1) * lq * lk));
    }
    const mean = new Float64Array(lq * lk);
    for (const m of maps) for (let i = 0; i < mean.length; i++) mean[i] += m[i] / heads;
    return {
      heads, lq, lk, maps, mean, queries, keys, images, extra,
      selected: "mean",
      imagesState: "pending",
    };
  }

  function mapOf(key) {
    return key === "mean" ? view.mean : view.maps[key];
  }

  function maxOf(data) {
    let top = 0;
    for (const x of data) if (x > top) top = x;
    return top > 0 ? top : 1;
  }

  function colourLimit(key) {
    // As the server's PNGs: 0 to the map's largest weight, or to the largest of all heads.
    if ($("shared-scale").checked) {
      if (view.sharedMax === undefined) {
        view.sharedMax = Math.max(...view.maps.map(maxOf), maxOf(view.mean));
      }
      return view.sharedMax;
    }
    return maxOf(mapOf(key));
  }

  function bitmap(data, rows, cols, vmax) {
    const canvas = document.createElement("canvas");
    canvas.width = cols;
    canvas.height = rows;
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(cols, rows);
    for (let i = 0; i < data.length; i++) {
      const x = data[i];
      let r;
      let g;
      let b;
      if (Number.isFinite(x)) {
        const c = 3 * Math.max(0, Math.min(255, Math.floor((x / vmax) * 255.999)));
        r = VIRIDIS[c];
        g = VIRIDIS[c + 1];
        b = VIRIDIS[c + 2];
      } else {
        [r, g, b] = NAN_RGB;
      }
      img.data[4 * i] = r;
      img.data[4 * i + 1] = g;
      img.data[4 * i + 2] = b;
      img.data[4 * i + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    return canvas;
  }

  function paint(canvas, source, cssWidth, cssHeight, highlight) {
    const ratio = window.devicePixelRatio || 1;
    canvas.style.width = `${cssWidth}px`;
    canvas.style.height = `${cssHeight}px`;
    canvas.width = Math.round(cssWidth * ratio);
    canvas.height = Math.round(cssHeight * ratio);
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(source, 0, 0, canvas.width, canvas.height);
    if (highlight) {
      const cw = canvas.width / view.lk;
      const ch = canvas.height / view.lq;
      ctx.lineWidth = Math.max(1, 2 * ratio);
      ctx.strokeStyle = "rgba(255, 255, 255, 0.95)";
      ctx.strokeRect(highlight.j * cw, highlight.i * ch, cw, ch);
    }
  }

  function headTitle(key) {
    return key === "mean" ? `Mean of ${view.heads} heads` : `Head ${key}`;
  }

  function renderTiles() {
    const grid = $("heads");
    grid.textContent = "";
    const keys = [...view.maps.keys(), "mean"];
    const aspect = view.lq / view.lk;
    const side = 132;
    const w = aspect <= 1 ? side : side / aspect;
    const h = aspect <= 1 ? side * aspect : side;
    view.bitmaps = new Map();
    for (const key of keys) {
      const tile = document.createElement("button");
      tile.type = "button";
      tile.className = key === "mean" ? "tile mean" : "tile";
      tile.dataset.head = String(key);
      tile.setAttribute("aria-pressed", String(key === view.selected));
      tile.title = `${headTitle(key)}: click to enlarge`;
      const canvas = document.createElement("canvas");
      canvas.className = "heatmap";
      const source = bitmap(mapOf(key), view.lq, view.lk, colourLimit(key));
      view.bitmaps.set(String(key), source);
      paint(canvas, source, w, h);
      attachHover(canvas, key);
      const caption = document.createElement("span");
      caption.className = "tile-caption";
      caption.textContent = key === "mean" ? "mean" : `head ${key}`;
      tile.append(canvas, caption);
      tile.addEventListener("click", () => select(key));
      grid.append(tile);
    }
  }

  function detailSize() {
    // Square cells where possible, at most 44 px, fitting the panel.
    const panel = $("matrix").parentElement;
    view.panelWidth = panel.clientWidth;
    const room = Math.max(200, Math.min(560, panel.clientWidth - 150));
    const cell = Math.max(0.25, Math.min(44, room / Math.max(view.lq, view.lk)));
    return { cell, width: cell * view.lk, height: cell * view.lq };
  }

  function renderLabels(cell) {
    const show = cell >= 9;
    $("matrix").classList.toggle("no-labels", !show);
    const make = (container, labels, kind) => {
      container.textContent = "";
      container.hidden = !show;
      if (!show) return;
      labels.forEach((text, index) => {
        const span = document.createElement("span");
        span.className = "label-cell";
        span.dataset.index = String(index);
        span.textContent = text;
        span.title = `${kind} ${index}: ${text}`;
        container.append(span);
      });
    };
    make($("key-labels"), view.keys, "key");
    make($("query-labels"), view.queries, "query");
    const size = cell >= 20 ? 13 : cell >= 13 ? 11 : 9;
    $("matrix").style.setProperty("--label-size", `${size}px`);
  }

  function renderDetail(highlight) {
    const key = view.selected;
    const { cell, width, height } = detailSize();
    $("detail-title").textContent = headTitle(key);
    const canvas = $("detail-canvas");
    canvas.dataset.head = String(key);
    $("key-labels").style.width = `${width}px`;
    $("query-labels").style.height = `${height}px`;
    paint(canvas, view.bitmaps.get(String(key)), width, height, highlight);
    if (!highlight) {
      renderLabels(cell);
      const vmax = colourLimit(key);
      $("legend-min").textContent = "0";
      $("legend-max").textContent = String(Number(vmax.toPrecision(3)));
    }
  }

  function renderLegend() {
    const bar = $("legend-bar");
    const ctx = bar.getContext("2d");
    const img = ctx.createImageData(256, 1);
    for (let i = 0; i < 256; i++) {
      img.data.set([VIRIDIS[3 * i], VIRIDIS[3 * i + 1], VIRIDIS[3 * i + 2], 255], 4 * i);
    }
    ctx.putImageData(img, 0, 0);
  }

  async function renderServerImage() {
    const key = view.selected;
    const img = $("server-png");
    const link = $("png-download");
    const note = $("png-note");
    const hide = (text) => {
      img.hidden = true;
      link.hidden = true;
      note.textContent = text;
    };
    if (view.imagesState === "pending") return hide("Rendering the server's PNGs…");
    if (view.imagesState === "failed") return hide(`The server drew no image: ${view.imagesError}`);
    let ref = view.images[String(key)];
    if (!ref && view.heads === 1) ref = view.images[key === "mean" ? "0" : "mean"];
    if (!ref) return hide("The server drew no image of this view.");
    const wanted = view;
    try {
      const src = await imageSource(ref);
      if (view !== wanted || view.selected !== key) return; // a newer selection won
      img.src = src;
      img.alt = `server-rendered heatmap: ${headTitle(key).toLowerCase()}`;
      img.hidden = false;
      link.href = src;
      link.download = `attention-${key === "mean" ? "mean" : `head-${key}`}.png`;
      link.hidden = false;
      note.textContent = "";
    } catch (e) {
      hide(`Could not load the server's image: ${e.message}`);
    }
  }

  async function setDownload(id, ref, filename) {
    const link = $(id);
    link.hidden = true;
    const source = imageSource(ref);
    if (!source) return;
    try {
      link.href = await source;
      link.download = filename;
      link.hidden = false;
    } catch {
      link.hidden = true;
    }
  }

  function select(key) {
    view.selected = key;
    for (const tile of document.querySelectorAll("#heads .tile")) {
      tile.setAttribute("aria-pressed", String(tile.dataset.head === String(key)));
    }
    renderDetail();
    renderServerImage();
  }

  function formatWeight(w) {
    if (!Number.isFinite(w)) return "NaN (no key allowed)";
    if (w === 0) return "0";
    return Math.abs(w) >= 0.001 ? w.toFixed(4) : w.toExponential(2);
  }

  // ------------------------------------------------------------------------------------------
  // Hover tooltip

  function cellAt(canvas, event) {
    const rect = canvas.getBoundingClientRect();
    const x = (event.clientX - rect.left) / rect.width;
    const y = (event.clientY - rect.top) / rect.height;
    if (x < 0 || x >= 1 || y < 0 || y >= 1) return null;
    return { i: Math.floor(y * view.lq), j: Math.floor(x * view.lk) };
  }

  function markLabels(cell) {
    for (const el of document.querySelectorAll(".label-cell.hot")) el.classList.remove("hot");
    if (!cell) return;
    const q = $("query-labels").children[cell.i];
    const k = $("key-labels").children[cell.j];
    if (q) q.classList.add("hot");
    if (k) k.classList.add("hot");
  }

  function attachHover(canvas, keyOrSelected) {
    const headKey = () => (keyOrSelected === undefined ? view.selected : keyOrSelected);
    canvas.addEventListener("mousemove", (event) => {
      const cell = cellAt(canvas, event);
      if (!cell) return hideTooltip();
      const key = headKey();
      const w = mapOf(key)[cell.i * view.lk + cell.j];
      $("tt-query").textContent = `${view.queries[cell.i]}  (#${cell.i})`;
      $("tt-key").textContent = `${view.keys[cell.j]}  (#${cell.j})`;
      $("tt-weight").textContent = formatWeight(w);
      $("tt-head").textContent = headTitle(key);
      const tip = $("tooltip");
      tip.dataset.query = String(cell.i);
      tip.dataset.key = String(cell.j);
      tip.dataset.head = String(key);
      tip.hidden = false;
      const pad = 14;
      const { innerWidth, innerHeight } = window;
      const box = tip.getBoundingClientRect();
      let left = event.clientX + pad;
      let top = event.clientY + pad;
      if (left + box.width > innerWidth - 4) left = event.clientX - pad - box.width;
      if (top + box.height > innerHeight - 4) top = event.clientY - pad - box.height;
      tip.style.left = `${Math.max(4, left)}px`;
      tip.style.top = `${Math.max(4, top)}px`;
      if (String(key) === String(view.selected)) {
        renderDetail(cell);
        markLabels(cell);
      }
    });
    canvas.addEventListener("mouseleave", () => {
      hideTooltip();
      if (view) {
        renderDetail(null);
        markLabels(null);
      }
    });
  }

  function hideTooltip() {
    $("tooltip").hidden = true;
  }

  // ------------------------------------------------------------------------------------------
  // Results

  function summaryRows(data, kind) {
    const m = data.meta || {};
    const rows = [];
    if (kind === "tokens") {
      rows.push(["tokens", String(data.tokens.length)]);
      rows.push(["d_model", String(m.d_model)]);
      rows.push(["heads", `${m.num_heads} × ${m.d_model / m.num_heads} dims`]);
      rows.push(["positional", m.positional]);
      rows.push(["parameters", Number(m.param_count).toLocaleString("en")]);
    } else {
      rows.push(["output", `(${(m.shape || []).join(", ")})`]);
      rows.push(["queries × keys", `${view.lq} × ${view.lk}`]);
      rows.push(["heads", String(view.heads)]);
      rows.push(["method", m.method]);
    }
    rows.push(["kernel time", `${Number(m.elapsed_ms).toFixed(3)} ms`]);
    rows.push(["FLOPs", Number(m.flops).toLocaleString("en")]);
    return rows;
  }

  function showResult(data, kind, batch, labels) {
    let weights = decodeTensor(data.weights);
    // Weights are (.., H, Lq, Lk) with q's rank: bring them to (H, Lq, Lk) of one batch item.
    const shape = weights.shape;
    if (shape.length < 2) throw new Error(`unexpected weights shape (${shape.join(", ")})`);
    const [lq, lk] = shape.slice(-2);
    const heads = shape.length >= 3 ? shape[shape.length - 3] : 1;
    const items = shape.length === 4 ? shape[0] : 1;
    // The same checks (and words) as the service applies to the heatmap it draws.
    if (batch >= items) {
      throw new FieldError(["heatmap", "batch"], `batch ${batch} is outside [0, ${items})`);
    }
    if (labels && labels.length !== lk) {
      throw new FieldError(["heatmap", "tokens"], `${labels.length} labels for ${lk} key positions`);
    }
    const perItem = heads * lq * lk;
    weights = {
      shape: [heads, lq, lk],
      data: weights.data.subarray(batch * perItem, (batch + 1) * perItem),
    };
    let queries;
    let keys;
    if (kind === "tokens") {
      queries = data.tokens;
      keys = data.tokens;
    } else {
      keys = labels || range(lk);
      queries = labels && lq === lk ? labels : range(lq);
    }
    imageCache.clear();
    view = buildView(weights, queries, keys, {}, data);

    const dl = $("summary");
    dl.textContent = "";
    for (const [name, value] of summaryRows(data, kind)) {
      const div = document.createElement("div");
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = name;
      dd.textContent = value;
      div.append(dt, dd);
      dl.append(div);
    }
    $("empty").hidden = true;
    $("result").hidden = false;
    $("grid-download").hidden = true;
    $("pe-download").hidden = true;
    renderTiles();
    select("mean");
  }

  async function loadImages(path, body, forView) {
    // The server's PNGs take longer than the numbers: they come from a second request with the
    // same inputs (deterministic, so the same weights), while the canvases are already shown.
    const started = performance.now();
    try {
      const { response, data } = await post(path, body, "images");
      if (view !== forView) return false;
      if (!response.ok) {
        const items = (data && data.errors) || [];
        forView.imagesState = "failed";
        forView.imagesError = items.length
          ? items.map((e) => `${[].concat(e.loc).join(".")}: ${e.msg}`).join("; ")
          : (data && data.detail) || `${response.status} ${response.statusText}`;
        renderServerImage();
        return false;
      }
      for (const ref of data.heatmaps || []) forView.images[String(ref.head)] = ref;
      forView.imagesState = "ready";
      forView.imagesMs = performance.now() - started;
      renderServerImage();
      setDownload("grid-download", forView.images.all, "attention-all-heads.png");
      setDownload("pe-download", data.positional_encoding, "positional-encoding.png");
      return true;
    } catch (e) {
      if (e.name === "AbortError" || view !== forView) return false;
      forView.imagesState = "failed";
      forView.imagesError = e.message;
      renderServerImage();
      return false;
    }
  }

  const range = (n) => Array.from({ length: n }, (_, i) => String(i));

  // ------------------------------------------------------------------------------------------
  // Wiring

  let mode = "tokens";

  function setMode(next) {
    mode = next;
    for (const [tab, pane] of [
      ["tab-tokens", "pane-tokens"],
      ["tab-qkv", "pane-qkv"],
    ]) {
      const on = pane === `pane-${next}`;
      $(tab).setAttribute("aria-selected", String(on));
      $(pane).hidden = !on;
    }
    clearErrors();
  }

  const elapsed = (ms) => (ms < 1000 ? `${ms.toFixed(0)} ms` : `${(ms / 1000).toFixed(1)} s`);

  function setStatus(text, kind) {
    $("status").textContent = text;
    $("status").className = `status ${kind || ""}`;
  }

  async function onSubmit(event) {
    event.preventDefault();
    clearErrors();
    hideTooltip();
    if (inflight.has("images")) inflight.get("images").abort();
    const errors = [];
    let body;
    try {
      body = mode === "tokens" ? tokensRequest(errors) : await attentionRequest(errors);
    } catch (e) {
      showBanner("Could not read the form", [e.message]);
      return;
    }
    if (errors.length) {
      showErrors(errors, "Please check the form");
      setStatus("");
      return;
    }
    const path = mode === "tokens" ? "/v1/tokens" : "/v1/attention";
    const batch = mode === "tokens" ? 0 : body.heatmap.batch;
    const labels = mode === "tokens" ? null : body.heatmap.tokens || null;
    // First the numbers (fast), then the PNGs (slower) with the same inputs.
    const numbers = { ...body, heatmap: false };
    const pictures = { ...body, ...(mode === "tokens" ? { need_weights: false } : {}) };
    if (mode !== "tokens") pictures.return_weights = false;
    $("submit").disabled = true;
    setStatus("Computing…", "busy");
    const started = performance.now();
    let shown = null;
    try {
      const { response, data } = await post(path, numbers, "compute");
      if (!response.ok) {
        reportProblem(response, data);
        setStatus(`Failed (${response.status})`, "failed");
        return;
      }
      try {
        showResult(data, mode, batch, labels);
      } catch (e) {
        if (!(e instanceof FieldError)) throw e;
        showErrors([{ loc: e.loc, msg: e.message }]);
        setStatus("Failed", "failed");
        return;
      }
      shown = view;
      setStatus(`Drawn in ${elapsed(performance.now() - started)}; rendering PNGs…`, "busy");
    } catch (e) {
      if (e.name === "AbortError") return;
      showBanner("Could not reach the service", [e.message]);
      setStatus("Failed", "failed");
      return;
    } finally {
      $("submit").disabled = false;
    }
    const ok = await loadImages(path, pictures, shown);
    if (view !== shown) return;
    const total = elapsed(performance.now() - started);
    setStatus(ok ? `Done in ${total}` : `Drawn; the PNGs failed (${total})`, ok ? "done" : "failed");
  }

  async function describeFile(name) {
    const input = $(`file-${name}`);
    const info = $(`file-${name}-info`);
    info.textContent = "";
    const err = $(`file-${name}-error`);
    err.textContent = "";
    input.classList.remove("invalid");
    const file = input.files[0];
    if (!file) return;
    try {
      const arr = parseNpy(await file.arrayBuffer());
      const note = arr.kind === "f" ? "" : " (sent as float32)";
      info.textContent = `${arr.descr} · shape (${arr.shape.join(", ")})${note}`;
    } catch (e) {
      err.textContent = `${file.name}: ${e.message}`;
      input.classList.add("invalid");
    }
  }

  // A .npy field a tensor, from the page's template: the input file-<name>, described by
  // file-<name>-info and file-<name>-error (the error answers for the location <name>).
  function addFileFields() {
    const template = $("file-field");
    for (const name of TENSORS) {
      const field = template.content.firstElementChild.cloneNode(true);
      const [label, input, info, error] = field.children;
      input.id = `file-${name}`;
      info.id = `${input.id}-info`;
      error.id = `${input.id}-error`;
      error.dataset.loc = name;
      input.setAttribute("aria-describedby", `${info.id} ${error.id}`);
      label.htmlFor = input.id;
      if (name === "q") label.replaceChildren(name); // k and v are optional: they default to q
      else label.prepend(`${name} `);
      input.addEventListener("change", () => describeFile(name));
      template.before(field);
    }
  }

  function init() {
    keepKeyInSession(() => imageCache.clear());
    $("tab-tokens").addEventListener("click", () => setMode("tokens"));
    $("tab-qkv").addEventListener("click", () => setMode("qkv"));
    $("form").addEventListener("submit", onSubmit);
    addFileFields();
    $("shared-scale").addEventListener("change", () => {
      if (!view) return;
      renderTiles();
      select(view.selected);
    });
    attachHover($("detail-canvas"));
    // Re-fit the enlarged map when its panel changes width (not on every height change).
    window.addEventListener("resize", () => {
      if (view && $("matrix").parentElement.clientWidth !== view.panelWidth) renderDetail();
    });
    document.addEventListener("keydown", (e) => e.key === "Escape" && hideTooltip());
    // Enter in the textarea submits with Ctrl/Cmd, as in most editors.
    $("text").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("form").requestSubmit();
    });
    renderLegend();
    document.body.dataset.ready = "true";
  }

  init();
})();
