// The explorer page. One script for both modes:
//   "server": decodes and encodes go to the JSON API of `vaelab explore RUN`;
//   "static": the file written by `--export`, where a grid of precomputed decodes (an atlas PNG)
//             answers the mouse and nothing needs a server.
// A conditional model (DATA.conditional) decodes a class as well as a code: the class selector
// sets state.label, and every decode and encode the page makes (or atlas it reads) uses it.
// window.vaelab holds what the page last showed, so a test can check it against the model.
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("vaelab-data").textContent);
  const STATIC = DATA.mode === "static", COND = DATA.conditional;
  const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                  "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];  // matplotlib's tab10, as the PNG figures
  const D = DATA.latent_dim, P = DATA.plane;
  const [X0, X1, Y0, Y1] = P.box;
  const STRIP = 10, SERVER_GRID = 16;
  const $ = (id) => document.getElementById(id);
  const plane = $("plane"), overlay = $("overlay");
  const W = plane.width, H = plane.height;

  const state = {
    mode: DATA.mode, ready: false, shown: null, drawn: null, strip: null, pair: [], rtts: [], errors: [],
    offsets: new Array(D).fill(0), hover: null, grid: null, label: COND ? 0 : null,
  };
  window.vaelab = state;

  // --- coordinates: plane (x, y) <-> canvas pixels, plane -> latent z ---------------------------
  const toPx = (x, y) => [(x - X0) / (X1 - X0) * W, (Y1 - y) / (Y1 - Y0) * H];
  const fromPx = (px, py) => [X0 + px / W * (X1 - X0), Y1 - py / H * (Y1 - Y0)];
  function lift(x, y, offsets) {
    const z = new Array(D);
    for (let i = 0; i < D; i++) z[i] = P.origin[i] + x * P.axes[0][i] + y * P.axes[1][i] + (offsets ? offsets[i] : 0);
    return z;
  }

  // --- images ----------------------------------------------------------------------------------
  function bytesFromB64(s) {
    const bin = atob(s), out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }
  function drawDigit(canvas, bytes) {
    const ctx = canvas.getContext("2d"), img = ctx.createImageData(28, 28);
    for (let i = 0; i < 784; i++) {
      img.data[4 * i] = img.data[4 * i + 1] = img.data[4 * i + 2] = bytes[i];
      img.data[4 * i + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
  }
  function digitCanvas(bytes) {
    const c = document.createElement("canvas");
    c.width = c.height = 28;
    drawDigit(c, bytes);
    return c;
  }

  // --- the server's API ------------------------------------------------------------------------
  function report(err) {
    const text = String((err && err.message) || err);
    state.errors.push(text);
    $("status").textContent = text;
  }
  async function api(path, body) {
    const res = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"},
                                   body: typeof body === "string" ? body : JSON.stringify(body)});
    let answer;
    try { answer = await res.json(); } catch (e) { answer = {}; }
    if (!res.ok) throw new Error(`${res.status}: ${answer.error || res.statusText}`);
    $("status").textContent = "";
    return answer;
  }
  // The "class" field goes with every request of a conditional model and never otherwise: the
  // server refuses a missing one and an unexpected one alike.
  const withClass = (body, label) => (COND ? Object.assign(body, {class: label}) : body);
  async function decodeMany(zs, label) {
    const answer = await api("/api/decode", withClass({z: zs}, label));
    return answer.images.map(bytesFromB64);
  }

  // --- the atlases of an exported page (one per class for a conditional model) -------------------
  let atlases = [], atlas = null;  // each {n, img, pixels}; `atlas` is the selected class's
  async function loadAtlases() {
    const n = DATA.atlas.n;
    atlases = await Promise.all(DATA.atlas.pngs.map(async (png) => {
      const img = new Image();
      img.src = "data:image/png;base64," + png;
      await img.decode();
      const c = document.createElement("canvas");
      c.width = c.height = n * 28;
      const ctx = c.getContext("2d");
      ctx.drawImage(img, 0, 0);
      return {n, img, pixels: ctx.getImageData(0, 0, n * 28, n * 28).data};
    }));
    atlas = atlases[0];
  }
  function atlasCell(x, y) {
    // The nearest of the n x n grid centres; row 0 is the top (largest y), as space.grid_points.
    const n = atlas.n, clamp = (v) => Math.min(n - 1, Math.max(0, v));
    const col = clamp(Math.floor((x - X0) / (X1 - X0) * n)), row = clamp(Math.floor((Y1 - y) / (Y1 - Y0) * n));
    const cx = X0 + (col + 0.5) * (X1 - X0) / n, cy = Y1 - (row + 0.5) * (Y1 - Y0) / n;
    const bytes = new Uint8Array(784), stride = n * 28;
    for (let r = 0; r < 28; r++)
      for (let c = 0; c < 28; c++) bytes[r * 28 + c] = atlas.pixels[4 * ((row * 28 + r) * stride + col * 28 + c)];
    return {z: lift(cx, cy, null), xy: [cx, cy], bytes};
  }

  // --- the decoded point under the mouse ---------------------------------------------------------
  function fmt(v) { return (v >= 0 ? " " : "") + v.toFixed(2); }
  const asClass = (label) => (COND ? ` as “${DATA.classes[label]}”` : "");
  function show(z, bytes, label) {
    drawDigit($("decoded"), bytes);
    state.shown = {z: z, label: label, image: Array.from(bytes), seq: (state.shown ? state.shown.seq : 0) + 1};
    $("zread").textContent = "z = (" + z.slice(0, 8).map(fmt).join(",") + (D > 8 ? ", … " + D + " dims" : "") + ")" +
      (COND ? " decoded" + asClass(label) : "");
  }
  let pending = null, inflight = false;
  function requestDecode(z) { pending = {z, label: state.label}; pump(); }
  async function pump() {
    if (inflight || pending === null) return;
    const {z, label} = pending;
    pending = null;
    inflight = true;
    const t0 = performance.now();
    try {
      const [bytes] = await decodeMany([z], label);
      state.rtts.push(performance.now() - t0);
      if (state.rtts.length > 200) state.rtts.shift();
      show(z, bytes, label);
      showTiming();
    } catch (e) {
      report(e);
    } finally {
      inflight = false;
      pump();  // only the latest point waiting is decoded: the image keeps up with the mouse
    }
  }
  function showTiming() {
    const s = state.rtts.slice().sort((a, b) => a - b), med = s[Math.floor(s.length / 2)];
    $("timing").textContent = `decode round trip: last ${state.rtts[state.rtts.length - 1].toFixed(1)} ms, ` +
      `median ${med.toFixed(1)} ms over ${s.length}`;
  }
  function showAt(x, y) {
    if (STATIC) {
      const cell = atlasCell(x, y);
      show(cell.z, cell.bytes, state.label);
    } else {
      requestDecode(lift(x, y, state.offsets));
    }
  }

  // --- drawing the plane ------------------------------------------------------------------------
  function drawPlane() {
    const ctx = plane.getContext("2d");
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, W, H);
    if ($("show-grid").checked) {
      ctx.imageSmoothingEnabled = true;
      ctx.globalAlpha = 0.6;  // the decodes stay readable and the points stand out on them
      if (STATIC) {
        // Every step-th decode of the atlas, about as many as the server draws: 64 x 64 tiles of
        // 9 pixels would be a texture, not digits.
        const n = atlas.n, step = Math.max(1, Math.round(n / SERVER_GRID)), m = Math.ceil(n / step);
        for (let r = 0; r < m; r++)
          for (let c = 0; c < m; c++) {
            const tr = Math.min(n - 1, r * step + (step >> 1)), tc = Math.min(n - 1, c * step + (step >> 1));
            ctx.drawImage(atlas.img, tc * 28, tr * 28, 28, 28, c * W / m, r * H / m, W / m, H / m);
          }
      } else if (state.grid) {
        const n = state.grid.n;
        state.grid.tiles.forEach((tile, k) => ctx.drawImage(tile, (k % n) * W / n, Math.floor(k / n) * H / n, W / n, H / n));
      }
      ctx.globalAlpha = 1;
    }
    ctx.strokeStyle = "#ccc";
    ctx.lineWidth = 1;
    const [ox, oy] = toPx(0, 0);
    if (D <= 2) {  // the latent axes through 0 (a PCA plane has none worth drawing)
      ctx.beginPath();
      ctx.moveTo(ox, 0); ctx.lineTo(ox, H); ctx.moveTo(0, oy); ctx.lineTo(W, oy);
      ctx.stroke();
    }
    if ($("show-points").checked) {
      const xy = DATA.points.xy, labels = DATA.points.labels;
      ctx.globalAlpha = 0.75;
      for (let i = 0; i < labels.length; i++) {
        const [px, py] = toPx(xy[2 * i], xy[2 * i + 1]);
        ctx.fillStyle = COLORS[labels[i] % COLORS.length];
        ctx.beginPath();
        ctx.arc(px, py, 2.2, 0, 2 * Math.PI);
        ctx.fill();
      }
      ctx.globalAlpha = 1;
    }
  }
  function marker(ctx, x, y, color, label) {
    const [px, py] = toPx(x, y);
    ctx.strokeStyle = color; ctx.fillStyle = color; ctx.lineWidth = 2;
    ctx.beginPath(); ctx.arc(px, py, 6, 0, 2 * Math.PI); ctx.stroke();
    if (label) { ctx.font = "bold 13px sans-serif"; ctx.fillText(label, px + 8, py - 8); }
  }
  function drawOverlay() {
    const ctx = overlay.getContext("2d");
    ctx.clearRect(0, 0, W, H);
    if (state.pair.length) {
      ctx.strokeStyle = "#000"; ctx.lineWidth = 1.5; ctx.setLineDash([5, 4]);
      ctx.beginPath();
      state.pair.forEach((p, i) => { const [px, py] = toPx(...p.xy); i ? ctx.lineTo(px, py) : ctx.moveTo(px, py); });
      ctx.stroke(); ctx.setLineDash([]);
      state.pair.forEach((p, i) => marker(ctx, ...p.xy, "#000", "AB"[i]));
    }
    if (state.drawn) {
      const d = state.drawn, [px, py] = toPx(...d.point), scale = W / (X1 - X0);
      if (d.ellipse) {
        ctx.strokeStyle = "#c00"; ctx.lineWidth = 2;
        [1, 2].forEach((k) => {
          ctx.setLineDash(k === 1 ? [] : [4, 4]);
          ctx.beginPath();
          ctx.ellipse(px, py, Math.max(k * d.ellipse.radii[0] * scale, 0.5), Math.max(k * d.ellipse.radii[1] * scale, 0.5),
                      -d.ellipse.angle, 0, 2 * Math.PI);
          ctx.stroke();
        });
        ctx.setLineDash([]);
      }
      marker(ctx, ...d.point, "#c00", "drawn");
    }
    if (state.hover) {
      const [px, py] = toPx(...state.hover);
      ctx.strokeStyle = "#000"; ctx.lineWidth = 1;
      ctx.beginPath(); ctx.moveTo(px - 9, py); ctx.lineTo(px + 9, py); ctx.moveTo(px, py - 9); ctx.lineTo(px, py + 9);
      ctx.stroke();
    }
  }

  // The decoded grid behind the points (server mode: decoded for the current slider offsets and
  // class). Each of these answers is dropped if a newer request was made meanwhile, so a slow
  // answer for the previous class cannot replace the current one.
  let gridTimer = null, gridSeq = 0;
  function refreshGrid() {
    if (STATIC || !$("show-grid").checked) { drawPlane(); return; }
    clearTimeout(gridTimer);
    gridTimer = setTimeout(async () => {
      const n = SERVER_GRID, zs = [], seq = ++gridSeq, label = state.label;
      for (let r = 0; r < n; r++)
        for (let c = 0; c < n; c++)
          zs.push(lift(X0 + (c + 0.5) * (X1 - X0) / n, Y1 - (r + 0.5) * (Y1 - Y0) / n, state.offsets));
      let tiles;
      try { tiles = (await decodeMany(zs, label)).map(digitCanvas); } catch (e) { report(e); }
      if (seq !== gridSeq) return;
      if (tiles) state.grid = {n, label, tiles};
      drawPlane();
    }, 120);
  }

  // --- interpolation -------------------------------------------------------------------------------
  let stripSeq = 0;
  async function interpolate() {
    const [a, b] = state.pair, zs = [], strip = $("strip"), seq = ++stripSeq, label = state.label;
    let images;
    if (STATIC) {
      const cells = [];
      for (let k = 0; k < STRIP; k++) {
        const t = k / (STRIP - 1);
        cells.push(atlasCell((1 - t) * a.xy[0] + t * b.xy[0], (1 - t) * a.xy[1] + t * b.xy[1]));
      }
      cells.forEach((c) => zs.push(c.z));
      images = cells.map((c) => c.bytes);
    } else {
      for (let k = 0; k < STRIP; k++) {
        const t = k / (STRIP - 1);
        zs.push(a.z.map((v, i) => (1 - t) * v + t * b.z[i]));
      }
      try { images = await decodeMany(zs, label); } catch (e) { report(e); return; }
      if (seq !== stripSeq) return;
    }
    strip.replaceChildren(...images.map(digitCanvas));
    state.strip = {zs, label, images: images.map((b) => Array.from(b))};
  }

  // --- the drawing pad ---------------------------------------------------------------------------------
  const pad = $("pad"), pctx = pad.getContext("2d");
  function clearPad() {
    pctx.fillStyle = "#000";
    pctx.fillRect(0, 0, pad.width, pad.height);
  }
  function stroke(a, b) {
    pctx.strokeStyle = "#fff"; pctx.lineWidth = 20; pctx.lineCap = "round"; pctx.lineJoin = "round";
    pctx.beginPath(); pctx.moveTo(...a); pctx.lineTo(...b); pctx.stroke();
  }
  // The drawing as MNIST's images were made: the ink's bounding box scaled into 20 x 20 pixels,
  // then moved so that its centre of mass sits at the centre of the 28 x 28 image.
  function padImage() {
    const src = pctx.getImageData(0, 0, pad.width, pad.height).data;
    let x0 = pad.width, y0 = pad.height, x1 = -1, y1 = -1;
    for (let y = 0; y < pad.height; y++)
      for (let x = 0; x < pad.width; x++)
        if (src[4 * (y * pad.width + x)] > 16) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); }
    if (x1 < 0) return null;
    const bw = x1 - x0 + 1, bh = y1 - y0 + 1, s = 20 / Math.max(bw, bh);
    const small = document.createElement("canvas");
    small.width = small.height = 28;
    const sctx = small.getContext("2d");
    sctx.fillStyle = "#000"; sctx.fillRect(0, 0, 28, 28);
    sctx.imageSmoothingEnabled = true; sctx.imageSmoothingQuality = "high";
    sctx.drawImage(pad, x0, y0, bw, bh, (28 - bw * s) / 2, (28 - bh * s) / 2, bw * s, bh * s);
    const g = sctx.getImageData(0, 0, 28, 28).data;
    let m = 0, mx = 0, my = 0;
    for (let i = 0; i < 784; i++) { m += g[4 * i]; mx += g[4 * i] * (i % 28); my += g[4 * i] * Math.floor(i / 28); }
    const dx = Math.round(13.5 - mx / m), dy = Math.round(13.5 - my / m);
    const out = new Float64Array(784);
    for (let y = 0; y < 28; y++)
      for (let x = 0; x < 28; x++) {
        const sx = x - dx, sy = y - dy;
        out[y * 28 + x] = sx >= 0 && sx < 28 && sy >= 0 && sy < 28 ? g[4 * (sy * 28 + sx)] / 255 : 0;
      }
    return out;
  }
  let padSeq = 0;
  async function encodePad() {
    const img = padImage();
    if (!img) return;
    const seq = ++padSeq, label = state.label;
    drawDigit($("pad-input"), Uint8Array.from(img, (v) => Math.round(v * 255)));
    let r;
    try { r = await api("/api/encode", withClass({image: Array.from(img)}, label)); } catch (e) { report(e); return; }
    if (seq !== padSeq) return;
    const recon = bytesFromB64(r.reconstruction);
    drawDigit($("pad-recon"), recon);
    state.drawn = {input: Array.from(img), label, mu: r.mu, std: r.std, point: r.point, ellipse: r.ellipse,
                   reconstruction: Array.from(recon)};
    $("pad-note").textContent = "posterior mean z = (" + r.mu.slice(0, 8).map(fmt).join(",") + (D > 8 ? ", …" : "") + ")" +
      (COND ? " given" + asClass(label) + ", reconstructed as it" : "") +
      (r.std ? "; on the plane: the red circle, with the 1- and 2-std ellipses of q(z|x) projected on it"
             : "; on the plane: the red circle (an autoencoder has no posterior spread to draw)");
    drawOverlay();
  }
  let drawing = false, last = null;
  pad.addEventListener("pointerdown", (e) => {
    drawing = true;
    pad.setPointerCapture(e.pointerId);
    last = [e.offsetX, e.offsetY];
    stroke(last, last);
  });
  pad.addEventListener("pointermove", (e) => {
    if (!drawing) return;
    const p = [e.offsetX, e.offsetY];
    stroke(last, p);
    last = p;
  });
  pad.addEventListener("pointerup", () => { if (drawing) { drawing = false; encodePad(); } });

  // --- the class of a conditional model ----------------------------------------------------------------
  const centre = [(X0 + X1) / 2, (Y0 + Y1) / 2];
  function setLabel(label) {
    // Everything on show is redone as the new class, for the same codes (and the same drawing).
    state.label = label;
    if (STATIC) atlas = atlases[label];
    showAt(...(state.hover || centre));
    refreshGrid();
    if (state.pair.length === 2) interpolate();
    if (state.drawn) encodePad();
  }

  // --- wiring ---------------------------------------------------------------------------------------------
  function setUp() {
    $("title").textContent = "vaelab explore: " + DATA.title;
    const n = DATA.points.labels.length;
    $("subtitle").textContent = `run ${DATA.run} · ${DATA.kind} · the codes (posterior means` +
      (COND ? ", each given its own label" : "") + `) of ${n} test images` +
      (STATIC ? ` · exported page, no server: the image under the mouse is the nearest of ` +
                `${DATA.atlas.n} × ${DATA.atlas.n} decodes precomputed over this view` +
                (COND ? " for each class" : "") : "");
    document.title = "vaelab explore: " + DATA.title;
    $("plane-note").textContent = P.note;
    $("pad-title").textContent = DATA.pad_title;
    $("xlabel").textContent = `${P.labels[0]} → [${X0.toFixed(2)}, ${X1.toFixed(2)}]`;
    $("ylabel").textContent = `${P.labels[1]} ↑ [${Y0.toFixed(2)}, ${Y1.toFixed(2)}]`;
    DATA.classes.forEach((name, i) => {
      const li = document.createElement("li"), sw = document.createElement("span");
      sw.className = "swatch";
      sw.style.background = COLORS[i % COLORS.length];
      li.append(sw, document.createTextNode(name));
      $("legend").append(li);
    });
    if (COND) {
      const select = $("class-select");
      DATA.classes.forEach((name, i) => select.append(new Option(name, String(i))));
      select.value = String(state.label);
      select.addEventListener("change", () => setLabel(Number(select.value)));
      $("class-note").textContent = DATA.class_note;
      $("class-card").hidden = false;
    }
    if (STATIC) {
      $("timing").textContent = "precomputed decodes: no server round trip";
      $("pad-card").querySelector(".row").hidden = true;
      $("pad-note").textContent = "The drawing pad needs the model: run `vaelab explore RUN` for it.";
    }
    if (DATA.sliders.length) {
      $("slider-card").hidden = false;
      $("slider-note").textContent = DATA.slider_note + (STATIC ? " Exported page: the grid is the plane itself " +
        "(sliders at 0); run `vaelab explore RUN` to move off it." : " Each slider adds an offset along its axis.");
      DATA.sliders.forEach((s) => {
        const row = document.createElement("div"), name = document.createElement("span");
        const input = document.createElement("input"), value = document.createElement("span");
        const about = document.createElement("span");
        row.className = "slider";
        name.textContent = s.label;
        about.className = "about";
        about.textContent = s.about;
        Object.assign(input, {type: "range", min: -s.range, max: s.range, step: s.range / 100, value: 0,
                              disabled: STATIC});
        input.dataset.dim = s.dim;
        value.textContent = fmt(0);
        input.addEventListener("input", () => {
          state.offsets[s.dim] = Number(input.value);
          value.textContent = fmt(state.offsets[s.dim]);
          if (state.hover) showAt(...state.hover);
          refreshGrid();
        });
        row.append(name, input, value, about);
        $("sliders").append(row);
      });
      $("reset-sliders").addEventListener("click", () => {
        state.offsets.fill(0);
        $("sliders").querySelectorAll("input").forEach((el) => { el.value = 0; el.nextSibling.textContent = fmt(0); });
        if (state.hover) showAt(...state.hover);
        refreshGrid();
      });
    }
    overlay.addEventListener("pointermove", (e) => {
      state.hover = fromPx(e.offsetX, e.offsetY);
      showAt(...state.hover);
      drawOverlay();
    });
    overlay.addEventListener("click", (e) => {
      const xy = fromPx(e.offsetX, e.offsetY);
      const z = STATIC ? atlasCell(...xy).z : lift(...xy, state.offsets);
      state.pair = state.pair.length >= 2 ? [] : state.pair;
      state.pair.push({xy, z});
      drawOverlay();
      if (state.pair.length === 2) interpolate();
    });
    $("clear-pair").addEventListener("click", () => {
      state.pair = []; state.strip = null; stripSeq++;
      $("strip").replaceChildren();
      drawOverlay();
    });
    $("show-grid").addEventListener("change", refreshGrid);
    $("show-points").addEventListener("change", drawPlane);
    $("pad-clear").addEventListener("click", () => {
      clearPad(); state.drawn = null; padSeq++;
      ["pad-input", "pad-recon"].forEach((id) => $(id).getContext("2d").clearRect(0, 0, 28, 28));
      $("pad-note").textContent = "";
      drawOverlay();
    });
    clearPad();
    // Something to look at before the mouse arrives: the point at the centre of the view.
    showAt(...centre);
    drawPlane();
    drawOverlay();
    state.requestDecode = requestDecode;  // for tests: a request the page itself makes
    state.ready = true;
  }

  (STATIC ? loadAtlases() : Promise.resolve()).then(setUp).catch(report);
})();
