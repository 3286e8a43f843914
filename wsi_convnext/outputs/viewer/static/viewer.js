// wsi-convnext view: OpenSeadragon over the slide's Deep Zoom tiles, with the store's overlays
// drawn as SVG in level-0 pixels (tissue outline, kept-tile grid, per-tile score heatmaps).
// Data from the server is only ever inserted as text (textContent), never as HTML.
(function () {
  "use strict";
  const NS = "http://www.w3.org/2000/svg";
  const sid = document.body.dataset.slide;
  const api = "/api/slides/" + encodeURIComponent(sid);
  const $ = (id) => document.getElementById(id);
  // viridis, 10 stops
  const STOPS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"]
    .map((h) => [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)));

  function colour(t) {
    if (t === null || !isFinite(t)) return null;
    t = Math.min(1, Math.max(0, t)) * (STOPS.length - 1);
    const i = Math.min(STOPS.length - 2, Math.floor(t)), f = t - i;
    const c = STOPS[i].map((v, k) => Math.round(v + (STOPS[i + 1][k] - v) * f));
    return "rgb(" + c.join(",") + ")";
  }

  function el(name, attrs, parent) {
    const e = document.createElementNS(NS, name);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }

  function fmt(v) {
    if (v === null || v === undefined) return "";
    return typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toPrecision(4)) : String(v);
  }

  const state = { info: null, ov: null, viewer: null, fully: false, svg: null, root: null, heat: null, grid: null, outline: null, pick: null };
  window.wsiView = {
    state: state,
    ready: false,
    fullyLoaded: () => state.fully,
    // Page (CSS px) coordinates of a level-0 point, for tests and bookmarks.
    imageToPage: (x, y) => {
      const p = state.viewer.viewport.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
      const r = state.viewer.element.getBoundingClientRect();
      return [p.x + r.left, p.y + r.top];
    },
  };

  function updateTransform() {
    const vp = state.viewer.viewport;
    const p = vp.pixelFromPoint(new OpenSeadragon.Point(0, 0), true);
    const s = (vp.getZoom(true) * vp.getContainerSize().x) / state.info.width;
    state.root.setAttribute("transform", "translate(" + p.x + "," + p.y + ") scale(" + s + ")");
    updateScalebar();
  }

  function updateScalebar() {
    const mpp = state.info.slide_mpp;
    if (!mpp) { $("scalebar").hidden = true; return; }
    const vp = state.viewer.viewport;
    const umPerPx = mpp / vp.viewportToImageZoom(vp.getZoom(true));
    const want = 120 * umPerPx;
    const p10 = Math.pow(10, Math.floor(Math.log10(want)));
    const nice = [5, 2, 1].map((m) => m * p10).find((v) => v <= want) || p10;
    $("scalebar-bar").style.width = Math.round(nice / umPerPx) + "px";
    $("scalebar-text").textContent = nice >= 1000 ? nice / 1000 + " mm" : (nice < 1 ? nice.toPrecision(1) : nice) + " µm";
  }

  function drawOverlays() {
    const ov = state.ov, e = ov.extent0;
    state.svg = el("svg", { class: "overlay" });
    state.svg.style.cssText = "position:absolute;left:0;top:0;width:100%;height:100%;pointer-events:none;overflow:visible";
    state.viewer.canvas.appendChild(state.svg);
    state.root = el("g", {}, state.svg);
    state.heat = el("g", { id: "layer-heat" }, state.root);
    state.grid = el("g", { id: "layer-grid", fill: "none", stroke: "#0550ae", "stroke-width": 1 }, state.root);
    state.outline = el("g", { id: "layer-outline", fill: "none", stroke: "#1a7f37", "stroke-width": 2 }, state.root);
    state.pick = el("rect", { id: "picked", fill: "none", stroke: "#cf222e", "stroke-width": 3, visibility: "hidden" }, state.root);
    ov.coords.forEach((c) => el("rect", { x: c[0], y: c[1], width: e, height: e }, state.grid));
    for (const poly of ov.outline) {
      const d = poly.map((ring) => "M" + ring.map((p) => p[0] + " " + p[1]).join("L") + "Z").join("");
      el("path", { d: d, "fill-rule": "evenodd" }, state.outline);
    }
    const sel = $("heatmap");
    const names = Object.keys(ov.scores);
    const cols = names.concat(ov.coords.length ? ["tissue_fraction"] : []);
    cols.forEach((n) => { const o = document.createElement("option"); o.value = n; o.textContent = n; sel.appendChild(o); });
    const first = names.find((n) => ov.scores[n].kind === "attention") || names.find((n) => n.startsWith("attention")) || names[0];
    if (first) sel.value = first;
    $("problems").textContent = ov.problems.join("; ");
    applyLayers();
    updateTransform();
  }

  function column(name) {
    if (name === "tissue_fraction") return { values: state.ov.tissue_fraction, min: 0, max: 1 };
    return state.ov.scores[name];
  }

  function applyLayers() {
    state.outline.style.display = $("show-outline").checked ? "" : "none";
    state.grid.style.display = $("show-grid").checked ? "" : "none";
    state.heat.setAttribute("opacity", $("opacity").value);
    while (state.heat.firstChild) state.heat.removeChild(state.heat.firstChild);
    const name = $("heatmap").value;
    $("legend").hidden = !name;
    if (!name) return;
    const col = column(name), e = state.ov.extent0;
    const lo = col.min === null ? 0 : col.min, hi = col.max === null ? 1 : col.max;
    const span = hi > lo ? hi - lo : 1;
    state.ov.coords.forEach((c, i) => {
      const fill = colour((col.values[i] - lo) / span);
      if (fill) el("rect", { x: c[0], y: c[1], width: e, height: e, fill: fill }, state.heat);
    });
    const ctx = $("legend-bar").getContext("2d");
    for (let x = 0; x < 200; x++) { ctx.fillStyle = colour(x / 199); ctx.fillRect(x, 0, 1, 12); }
    $("legend-min").textContent = fmt(lo);
    $("legend-max").textContent = fmt(hi);
    $("legend-name").textContent = name;
  }

  function tileAt(x, y) {
    const e = state.ov.extent0;
    let best = -1, bestD = Infinity;
    state.ov.coords.forEach((c, i) => {
      if (x >= c[0] && x < c[0] + e && y >= c[1] && y < c[1] + e) {
        const d = Math.hypot(x - c[0] - e / 2, y - c[1] - e / 2);
        if (d < bestD) { bestD = d; best = i; }
      }
    });
    return best;
  }

  function showTile(i) {
    const ov = state.ov, info = state.info, c = ov.coords[i];
    $("tile-info").hidden = false;
    $("tile-index").textContent = String(i);
    const rows = [["index", i], ["level-0 x", c[0]], ["level-0 y", c[1]], ["tissue fraction", ov.tissue_fraction[i]]];
    for (const n in ov.scores) rows.push([n, ov.scores[n].values[i]]);
    const body = $("tile-table");
    while (body.firstChild) body.removeChild(body.firstChild);
    for (const [k, v] of rows) {
      const tr = document.createElement("tr");
      tr.dataset.key = k;
      const a = document.createElement("td"), b = document.createElement("td");
      a.textContent = k; b.textContent = fmt(v);
      tr.appendChild(a); tr.appendChild(b); body.appendChild(tr);
    }
    const img = $("tile-image");
    img.src = api + "/tiles/" + i;
    $("tile-caption").textContent = "stored tile: " + info.tile_size + " px at " + info.target_mpp + " µm/px";
    const e = ov.extent0;
    for (const [k, v] of [["x", c[0]], ["y", c[1]], ["width", e], ["height", e]]) state.pick.setAttribute(k, v);
    state.pick.setAttribute("visibility", "visible");
  }

  async function main() {
    const resp = await fetch(api);
    if (!resp.ok) throw new Error("nothing to show for this slide (HTTP " + resp.status + ")");
    const info = await resp.json();
    state.info = info;
    if (info.message) $("message").textContent = info.message;
    if (info.prediction) {
      const p = info.prediction, probs = Object.entries(p.probabilities || {}).map(([k, v]) => k + " " + v.toFixed(2)).join(", ");
      $("prediction").textContent = "predicted " + p.label + (probs ? " (" + probs + ")" : "");
    }
    const viewer = OpenSeadragon({
      id: "osd",
      prefixUrl: "/static/openseadragon/images/",
      tileSources: "/dzi/" + encodeURIComponent(sid) + ".dzi",
      drawer: "canvas",
      showNavigator: true,
      navigatorPosition: "TOP_RIGHT",
      maxZoomPixelRatio: 4,
      gestureSettingsMouse: { clickToZoom: false },
      animationTime: 0.3,
    });
    state.viewer = viewer;
    viewer.addHandler("open", () => {
      const item = viewer.world.getItemAt(0);
      item.addHandler("fully-loaded-change", (ev) => { state.fully = ev.fullyLoaded; });
    });
    ["animation", "resize", "rotate", "update-viewport"].forEach((n) => viewer.addHandler(n, () => state.root && updateTransform()));
    viewer.addHandler("canvas-click", (ev) => {
      if (!ev.quick || !state.ov) return;
      const p = viewer.viewport.viewerElementToImageCoordinates(ev.position);
      const i = tileAt(p.x, p.y);
      if (i >= 0) showTile(i);
    });
    ["show-outline", "show-grid", "heatmap"].forEach((id) => $(id).addEventListener("input", applyLayers));
    $("opacity").addEventListener("input", () => state.heat && state.heat.setAttribute("opacity", $("opacity").value));
    await new Promise((resolve) => viewer.addOnceHandler("open", resolve));
    state.ov = await (await fetch(api + "/overlays")).json();
    drawOverlays();
    window.wsiView.ready = true;
  }

  main().catch((err) => { $("message").textContent = "viewer error: " + err; });
})();
