"""The report's inline stylesheet and script (no third-party code, no external resources)."""

from __future__ import annotations

# The report forbids every fetch: inline styles and scripts only, images only as data: URIs.
CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"

STYLE = """
:root{--fg:#1c2230;--muted:#5c6577;--line:#e2e6ed;--bg:#f4f6f9;--card:#fff;--accent:#2b5ea7;
--crit:#c0392b;--warn:#d9822b;--info:#2f7ebc}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;background:var(--bg);color:var(--fg);
font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,"Liberation Sans","DejaVu Sans",sans-serif}
.ht-wrap{max-width:1240px;margin:0 auto;padding:0 24px}
header.ht-head{background:#18223b;color:#fff;padding:20px 0 18px}
header.ht-head h1{margin:0;font-size:22px;font-weight:600;letter-spacing:.01em;word-break:break-word}
header.ht-head .ht-sub{color:#c3cbe0;margin-top:3px;font-size:13px;word-break:break-word}
header.ht-head .ht-brand{color:#8fa3cf;font-size:12px;text-transform:uppercase;letter-spacing:.12em}
nav.ht-nav{position:sticky;top:0;z-index:5;background:#fff;border-bottom:1px solid var(--line);
padding:7px 0;box-shadow:0 1px 3px rgba(20,30,50,.06)}
nav.ht-nav .ht-wrap{display:flex;gap:18px;flex-wrap:wrap}
nav.ht-nav a{color:var(--accent);text-decoration:none;font-size:13px}
nav.ht-nav a:hover{text-decoration:underline}
main{max-width:1240px;margin:0 auto;padding:12px 24px 40px}
section.ht-sec{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:16px 22px 18px;margin:16px 0}
section.ht-sec h2{font-size:17px;margin:0 0 4px;font-weight:600}
section.ht-sec h3{font-size:14px;margin:14px 0 6px;font-weight:600;word-break:break-all}
.ht-desc{color:var(--muted);margin:0 0 12px;max-width:980px;font-size:13px}
.ht-cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:12px;margin-top:16px}
.ht-card{background:#fff;border:1px solid var(--line);border-radius:8px;padding:10px 14px}
.ht-card .v{font-size:21px;font-weight:600;font-variant-numeric:tabular-nums;word-break:break-word}
.ht-card .k{font-size:12px;color:var(--muted);font-weight:600}
.ht-card .n{font-size:12px;color:var(--muted);overflow-wrap:anywhere}
.ht-card.bad .v{color:var(--crit)}
table.ht-table{border-collapse:collapse;width:100%;font-size:13px}
.ht-table th,.ht-table td{padding:5px 9px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
.ht-table th{background:#eef1f6;font-weight:600;position:sticky;top:0;z-index:1;white-space:nowrap}
.ht-table td.num,.ht-table th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.ht-table tr:hover td{background:#fafbfd}
.ht-scroll-x{overflow-x:auto}
#summary-table,#settings-table{width:auto;min-width:min(100%,720px)}#summary-table td.num,#summary-table th.num{min-width:150px}
.ht-scroll{max-height:520px;overflow:auto;border:1px solid var(--line);border-radius:6px}
.ht-badge{display:inline-block;padding:0 7px;border-radius:9px;font-size:11px;font-weight:600;color:#fff;line-height:18px}
.sev-critical{background:var(--crit)}.sev-warning{background:var(--warn)}.sev-info{background:var(--info)}
.sev-other{background:#7a8396}
.ht-swatch{display:inline-block;width:11px;height:11px;border-radius:2px;vertical-align:-1px;margin-right:6px;
border:1px solid rgba(0,0,0,.15)}
svg.ht-chart{width:100%;height:auto;display:block;overflow:visible}
svg.ht-chart text,svg.ht-legend text{font-family:inherit;fill:#2a3140}
svg.ht-legend{display:block;max-width:100%;height:auto}
svg image.ht-cells{image-rendering:pixelated;image-rendering:crisp-edges}
.ht-legend-row{display:flex;align-items:center;gap:18px;flex-wrap:wrap;margin:2px 0 8px}
.ht-legend-title{font-size:12px;color:var(--muted);font-weight:600}
.ht-missing{color:var(--muted);font-style:italic;background:#f6f7fa;border:1px dashed #ccd3de;padding:12px 14px;border-radius:6px;margin:0}
.ht-tooltip{position:fixed;display:none;pointer-events:none;background:rgba(18,23,34,.95);color:#fff;padding:6px 9px;
border-radius:5px;font-size:12px;line-height:1.45;max-width:480px;z-index:10;box-shadow:0 3px 10px rgba(0,0,0,.25);
overflow-wrap:anywhere}
.ht-tip-title{font-weight:600}
code,.mono{font-family:ui-monospace,"DejaVu Sans Mono","Liberation Mono",Menlo,Consolas,monospace;font-size:12px}
code{background:#eef1f6;padding:0 3px;border-radius:3px}
.ht-table td.ht-layer{white-space:nowrap}
.ht-layer{font-family:ui-monospace,"DejaVu Sans Mono","Liberation Mono",Menlo,Consolas,monospace;font-size:12px;overflow-wrap:anywhere}
dl.ht-meta{display:grid;grid-template-columns:max-content 1fr;gap:3px 20px;margin:0;font-size:13px}
dl.ht-meta dt{color:var(--muted)}dl.ht-meta dd{margin:0;overflow-wrap:anywhere}
details{margin-top:10px}details summary{cursor:pointer;color:var(--accent);font-size:13px}
pre{background:#f6f7fa;border:1px solid var(--line);padding:10px;border-radius:6px;overflow:auto;font-size:12px;max-height:420px;
white-space:pre-wrap;overflow-wrap:anywhere}
.ht-grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(540px,1fr));gap:10px 22px}
.ht-grid>div{min-width:0}
.ht-note{border-left:4px solid var(--accent);background:#eef3fb;padding:10px 14px;white-space:pre-wrap;border-radius:0 6px 6px 0;
overflow-wrap:anywhere}
.ht-banner{border:1px solid #e7b46a;border-left:5px solid var(--warn);background:#fff6e8;padding:10px 14px;
border-radius:0 6px 6px 0;margin-top:16px;overflow-wrap:anywhere}
.ht-checks{margin:10px 0 0;padding-left:20px;font-size:13px}
.ht-ok{color:#2e7d32;font-weight:600}.ht-diff{color:var(--crit);font-weight:600}
.ht-low{color:var(--crit);font-weight:600}
footer.ht-foot{color:var(--muted);font-size:12px;text-align:center;padding:8px 24px 28px;overflow-wrap:anywhere}
@media print{nav.ht-nav{display:none}section.ht-sec{break-inside:avoid}.ht-scroll{max-height:none}}
"""

# Hover read-outs. The charts are complete without it (static SVG with <title> tooltips); the script only adds
# values under the pointer. It reads the embedded JSON and writes text with textContent, never innerHTML.
SCRIPT = r"""
(function () {
  "use strict";
  var src = document.getElementById("ht-data");
  var data = src ? JSON.parse(src.textContent) : {};
  var heatmaps = data.heatmaps || {}, lines = data.lines || {}, decoded = {}, activeGuide = null;
  var tip = document.createElement("div");
  tip.id = "ht-tooltip"; tip.className = "ht-tooltip"; tip.setAttribute("role", "tooltip");
  document.body.appendChild(tip);

  function fmt(v) {
    if (v === null || v === undefined || !isFinite(v)) return "no value";
    var a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(2);
    return String(Number(v.toPrecision(4)));
  }
  function show(ev, rows) {
    tip.textContent = "";
    for (var i = 0; i < rows.length; i++) {
      var d = document.createElement("div");
      if (i === 0) d.className = "ht-tip-title";
      d.textContent = rows[i];
      tip.appendChild(d);
    }
    tip.style.display = "block";
    var w = tip.offsetWidth, h = tip.offsetHeight, x = ev.clientX + 14, y = ev.clientY + 14;
    if (x + w > window.innerWidth - 4) x = ev.clientX - w - 14;
    if (y + h > window.innerHeight - 4) y = ev.clientY - h - 14;
    tip.style.left = Math.max(4, x) + "px";
    tip.style.top = Math.max(4, y) + "px";
  }
  function hide() { tip.style.display = "none"; }
  function values(id) {
    if (!decoded[id]) {
      var s = atob(heatmaps[id].values), u = new Uint8Array(s.length);
      for (var i = 0; i < s.length; i++) u[i] = s.charCodeAt(i);
      decoded[id] = new Float32Array(u.buffer);
    }
    return decoded[id];
  }
  function heatmapRows(ev, svg, id) {
    var h = heatmaps[id], img = svg.querySelector("image.ht-cells");
    if (!h || !img) return null;
    var r = img.getBoundingClientRect();
    var fx = (ev.clientX - r.left) / r.width, fy = (ev.clientY - r.top) / r.height;
    if (!(fx >= 0 && fx < 1 && fy >= 0 && fy < 1)) return null;
    var c = Math.floor(fx * h.cols), row = Math.floor(fy * h.rows);
    var v = values(id)[row * h.cols + c], lo = h.lo[c], hi = h.hi[c];
    return [h.layers[row], lo === hi ? "step " + lo : "steps " + lo + "\u2013" + hi + " (" + h.agg + ")",
            h.label + ": " + fmt(v)];
  }
  function nearest(steps, s) {
    var a = 0, b = steps.length - 1;
    if (b < 0) return -1;
    while (b - a > 1) { var m = (a + b) >> 1; if (steps[m] <= s) a = m; else b = m; }
    return Math.abs(steps[a] - s) <= Math.abs(steps[b] - s) ? a : b;
  }
  function lineRows(ev, svg, id) {
    var L = lines[id];
    if (!L) return null;
    var pt = svg.createSVGPoint(); pt.x = ev.clientX; pt.y = ev.clientY;
    var p = pt.matrixTransform(svg.getScreenCTM().inverse());
    var guide = svg.querySelector(".ht-guide");
    if (p.x < L.x0 || p.x > L.x1 || p.y < L.y0 || p.y > L.y1) { if (guide) guide.setAttribute("visibility", "hidden"); return null; }
    var s = L.xmin + (p.x - L.x0) / (L.x1 - L.x0) * (L.xmax - L.xmin), rows = [], step = null;
    for (var i = 0; i < L.series.length; i++) {
      var S = L.series[i], k = nearest(S.steps, s);
      if (k < 0) continue;
      if (step === null) step = S.steps[k];
      rows.push((L.series.length > 1 ? S.label + " \u00b7 step " + S.steps[k] + ": " : L.ylabel + ": ") + fmt(S.values[k]));
    }
    if (step === null) return null;
    if (guide) {
      var gx = L.x0 + (step - L.xmin) / ((L.xmax - L.xmin) || 1) * (L.x1 - L.x0);
      guide.setAttribute("x1", gx); guide.setAttribute("x2", gx); guide.setAttribute("visibility", "visible");
      activeGuide = guide;
    }
    rows.unshift("step " + step);
    return rows;
  }
  var marks = document.querySelectorAll("[data-tip]");
  for (var i = 0; i < marks.length; i++) {
    var t = marks[i].querySelector("title");
    if (t) t.parentNode.removeChild(t);  // the read-out replaces the native tooltip
  }
  document.addEventListener("mousemove", function (ev) {
    var t = ev.target, rows = null;
    var m = t && t.closest ? t.closest("[data-tip]") : null;
    if (m) rows = m.getAttribute("data-tip").split("\n");
    var svg = t && t.closest ? t.closest("svg[data-chart]") : null;
    if (activeGuide && !(svg && svg.contains(activeGuide))) { activeGuide.setAttribute("visibility", "hidden"); activeGuide = null; }
    if (!rows && svg) {
      var id = svg.getAttribute("data-chart");
      rows = svg.classList.contains("ht-heatmap") ? heatmapRows(ev, svg, id) : lineRows(ev, svg, id);
    }
    if (rows) show(ev, rows); else hide();
  });
  document.addEventListener("mouseleave", hide);
  // Self-check, read by the browser tests: every chart has its data and every heatmap decodes to rows x cols.
  var charts = document.querySelectorAll("svg[data-chart]"), ok = 0;
  for (var j = 0; j < charts.length; j++) {
    var cid = charts[j].getAttribute("data-chart"), h = heatmaps[cid];
    if (h ? values(cid).length === h.rows * h.cols && h.layers.length === h.rows : lines[cid]) ok++;
  }
  document.documentElement.setAttribute("data-ht-charts", String(ok));
  document.documentElement.setAttribute("data-ht-ready", "1");
})();
"""
