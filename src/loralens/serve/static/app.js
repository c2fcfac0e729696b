// The screening page: upload an adapter to /api/screen and show the answer; or, in an HTML
// report written by `loralens screen --html`, show the embedded records. Everything from a
// server or a file is put on the page as text (textContent), never parsed as HTML.
"use strict";

const $ = (sel) => document.querySelector(sel);
const SVG = "http://www.w3.org/2000/svg";
const screened = []; // every answer since the page opened (or the report's records)
let runs = [];
let selected = -1;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function num(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (typeof x !== "number") return String(x);
  if (x !== 0 && (Math.abs(x) >= 1e5 || Math.abs(x) < 1e-3)) return x.toExponential(digits - 1);
  return Number(x.toPrecision(digits)).toString();
}

// An interval "[lo, hi]", both ends with the same decimals: enough for `digits` significant
// digits of the larger end and one of the width (so [1.93, 2.00], not [1.93, 2]).
function interval(lo, hi, digits = 3) {
  const top = Math.max(Math.abs(lo), Math.abs(hi));
  if (!Number.isFinite(top) || top >= 1e5 || (top > 0 && top < 1e-3)) {
    return `[${lo.toExponential(digits - 1)}, ${hi.toExponential(digits - 1)}]`;
  }
  const decimals = [top > 0 ? digits - 1 - Math.floor(Math.log10(top)) : 0];
  if (hi > lo) decimals.push(-Math.floor(Math.log10(hi - lo)));
  const d = Math.min(Math.max(0, ...decimals), 12);
  return `[${lo.toFixed(d)}, ${hi.toFixed(d)}]`;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) tr.append(c instanceof Node ? c : el("td", c));
  return tr;
}

function td(text, cls) {
  return el("td", text, cls);
}

function setStatus(text, isError) {
  const s = $("#status");
  s.textContent = text;
  s.className = isError ? "error" : "";
}

function authHeaders() {
  const t = sessionStorage.getItem("loralens-token");
  return t ? { Authorization: "Bearer " + t } : {};
}

// ---------------------------------------------------------------------------------- result

function showResult(rec) {
  $("#result").hidden = false;
  $("#result-title").textContent = rec.path;
  const dl = $("#summary");
  dl.replaceChildren();
  $("#warnings").replaceChildren();
  $("#details").hidden = Boolean(rec.error);
  if (rec.error) {
    dl.append(el("dt", "error"), el("dd", rec.error, "error"));
    return;
  }
  const guess = rec.base_model_guess || {};
  // the same line as `loralens inspect` (families.base_model_label)
  const base = guess.label || (guess.name
    ? `${guess.name} (${guess.source === "metadata" ? "from the file" : "guessed from its layout"})`
    : guess.family
      ? `unknown ${guess.family} (hidden size ${num(guess.hidden_size)}, ${num(guess.blocks)} blocks)`
      : "unknown");
  const items = [
    ["format", rec.format || "?"],
    ["base model", base],
    ["layers", rec.num_layers],
    ["rank", (rec.ranks || []).join(" / ")],
    ["parameters", (rec.adapter_params || 0).toLocaleString("en")],
    ["screened in", num(rec.seconds, 2) + " s"],
  ];
  for (const [k, v] of items) dl.append(el("dt", k), el("dd", v));
  $("#warnings").replaceChildren(...(rec.warnings || []).map((w) => el("li", w)));
  showFlags(rec);
  showPredictions(rec);
  showLayers(rec);
  drawSpectra(rec);
}

function fitMarks(rec) {
  // what the runs' fit checks say: [run, text, class] for each run that flags or refuses it
  const out = [];
  for (const p of rec.predictions || []) {
    if (p.error) out.push([p.run, `does not fit ${p.run}: ${p.error}`, "error"]);
    else if (p.in_distribution === false) out.push([p.run, `\u26a0 ${p.run} flags it: ${(p.reasons || []).join("; ")}`, "warning"]);
  }
  return out;
}

function showFlags(rec) {
  const ul = $("#flags");
  ul.replaceChildren();
  const marks = fitMarks(rec);
  for (const [, text, cls] of marks) ul.append(el("li", text, cls));
  if (!rec.flags || rec.flags.length === 0) {
    const text = "no layer flags: finite, no dead, collapsed or outlier layers";
    ul.append(el("li", text, marks.length ? "" : "none"));
    return;
  }
  for (const f of rec.flags) {
    const li = el("li", `${f.kind} (${f.severity}): ${f.message}`, f.severity);
    li.title = f.layers.join("\n");
    ul.append(li);
  }
}

function predictionCells(p, target) {
  const value = p.prediction[target];
  const level = `(${Math.round((p.interval_level || 0) * 100)}%)`;
  const notes = [];
  if (p.in_distribution === false) notes.push(`\u26a0 flagged: ${(p.reasons || []).join("; ")}`);
  if (p.interval_level && p.calibrated === false) notes.push("not calibrated: its intervals failed on the run's test split");
  if (p.seen) notes.push("the run trained on this adapter: not a test of it");
  const flag = notes.length ? " \u2014 " + notes.join("; ") : "";
  if (p.task === "classification") {
    const label = p.label ? p.label[target] : value >= 0.5 ? 1 : 0;
    const set = p.set && p.set[target] ? `, set {${p.set[target].join(", ")}} ${level}` : "";
    return [td("p = " + num(value), "num"), td(`label ${label}${set}${flag}`)];
  }
  const iv = p.interval && p.interval[target];
  const text = iv ? `${interval(iv[0], iv[1])} ${level}` : p.interval ? "no interval at this coverage" : "";
  return [td(num(value, 4), "num"), td(text + flag)];
}

function showPredictions(rec) {
  const body = $("#predictions tbody");
  body.replaceChildren();
  if (!rec.predictions || rec.predictions.length === 0) {
    body.append(row([td("no runs loaded"), td(""), td(""), td("")]));
  }
  for (const p of rec.predictions || []) {
    const name = `${p.run} (${p.model})`;
    if (p.error) {
      const cell = td(p.error, "error");
      cell.colSpan = 3;
      body.append(row([td(name), cell]));
      continue;
    }
    for (const t of p.targets) body.append(row([td(name), td(t), ...predictionCells(p, t)]));
  }
}

function flaggedLayers(rec) {
  const marks = new Map();
  for (const f of rec.flags || []) for (const n of f.layers) marks.set(n, f.severity);
  return marks;
}

function showLayers(rec) {
  const body = $("#layers tbody");
  const marks = flaggedLayers(rec);
  body.replaceChildren();
  rec.layers.forEach((l, i) => {
    const sv = l.finite ? l.top_svals.slice(0, 4).map((x) => num(x, 2)).join(" ") : "NaN/inf";
    const tr = row([
      td(l.name, "name"),
      td(`${l.shape[0]}×${l.shape[1]}`, "num"),
      td(l.rank, "num"),
      td(num(l.scale), "num"),
      td(num(l.fro_norm), "num"),
      td(sv, l.finite ? "" : "error"),
      td(num(l.effective_rank, 2), "num"),
    ]);
    if (marks.has(l.name)) tr.className = marks.get(l.name) === "error" ? "bad" : "flagged";
    tr.addEventListener("mouseenter", () => highlight(i, true));
    tr.addEventListener("mouseleave", () => highlight(i, false));
    body.append(tr);
  });
}

// ---------------------------------------------------------------------------------- spectra

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

function highlight(i, on) {
  const line = document.querySelector(`#spectra polyline[data-layer="${i}"]`);
  if (line) line.classList.toggle("hot", on);
  const key = document.querySelector(`#spectra-legend li[data-layer="${i}"]`);
  if (key) key.classList.toggle("hot", on);
}

// A layer's colour in the spectra chart: hues from red (first layer) to violet (last).
function layerColour(i, n) {
  return `hsl(${Math.round((300 * i) / Math.max(1, n - 1))} 65% 45%)`;
}

// At most this many layers get a legend entry each; more get the colour scale and its ends.
const LEGEND_MAX = 16;

function legendEntry(i, n, name) {
  const li = el("li");
  li.dataset.layer = i;
  const key = svg("svg", { width: 22, height: 10, "aria-hidden": "true" });
  key.append(svg("line", { x1: 1, y1: 5, x2: 21, y2: 5, stroke: layerColour(i, n) }));
  li.append(key, el("span", name));
  li.addEventListener("mouseenter", () => highlight(i, true));
  li.addEventListener("mouseleave", () => highlight(i, false));
  return li;
}

function drawLegend(rec) {
  const legend = $("#spectra-legend");
  const n = rec.layers.length;
  const shown = n <= LEGEND_MAX ? [...Array(n).keys()] : [0, Math.floor((n - 1) / 2), n - 1];
  const items = shown.map((i) => legendEntry(i, n, `${i + 1}. ${rec.layers[i].name}`));
  if (n > LEGEND_MAX) {
    items.splice(2, 0, el("li", "…", "gap"));
    items.splice(1, 0, el("li", "…", "gap"));
    items.push(el("li", `colour runs through the ${n} layers in table order`, "gap"));
  }
  legend.replaceChildren(...items);
}

function drawSpectra(rec) {
  const plot = $("#spectra");
  plot.replaceChildren();
  drawLegend(rec);
  const W = 640, H = 260, L = 52, R = 12, T = 12, B = 30;
  const series = rec.layers.map((l) => (l.top_svals || []).filter((x) => x > 0 && Number.isFinite(x)));
  const all = series.flat();
  if (all.length === 0) {
    plot.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no finite singular values"));
    return;
  }
  const kmax = Math.max(2, ...series.map((s) => s.length));
  let lo = Math.log10(Math.min(...all)), hi = Math.log10(Math.max(...all));
  if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
  const x = (k) => L + ((W - L - R) * k) / (kmax - 1);
  const y = (v) => T + ((H - T - B) * (hi - Math.log10(v))) / (hi - lo);
  plot.append(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }));
  plot.append(svg("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }));
  for (const e of [Math.ceil(lo), Math.floor(hi)].filter((v, i, a) => a.indexOf(v) === i)) {
    if (e < lo || e > hi) continue;
    plot.append(svg("text", { x: L - 4, y: y(10 ** e) + 3, "text-anchor": "end" }, `1e${e}`));
  }
  plot.append(svg("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, num(10 ** hi, 2)));
  plot.append(svg("text", { x: L - 4, y: H - B, "text-anchor": "end" }, num(10 ** lo, 2)));
  plot.append(svg("text", { x: (W + L) / 2, y: H - 6, "text-anchor": "middle" }, "index of the singular value"));
  for (const k of [0, kmax - 1]) plot.append(svg("text", { x: x(k), y: H - B + 12, "text-anchor": "middle" }, k + 1));
  series.forEach((s, i) => {
    if (s.length === 0) return;
    const pts = s.length === 1 ? [[x(0), y(s[0])], [x(0) + 3, y(s[0])]] : s.map((v, k) => [x(k), y(v)]);
    const line = svg("polyline", {
      points: pts.map((p) => p.map((c) => c.toFixed(1)).join(",")).join(" "),
      stroke: layerColour(i, series.length),
      "data-layer": i,
    });
    line.append(svg("title", {}, rec.layers[i].name));
    plot.append(line);
  });
}

// ---------------------------------------------------------------------------------- history

function targetsOf(list) {
  const cols = [];
  const seen = new Set();
  for (const rec of list) for (const p of rec.predictions || []) {
    for (const t of p.targets || []) {
      const key = `${p.run}/${t}`;
      if (!seen.has(key)) { seen.add(key); cols.push([p.run, t, key]); }
    }
  }
  return cols;
}

function showHistory() {
  $("#history-card").hidden = screened.length === 0;
  const cols = targetsOf(screened);
  const head = row(["file", "format", "layers", "rank", "flags", ...cols.map((c) => c[2])].map((h) => el("th", h)));
  $("#history thead").replaceChildren(head);
  const body = $("#history tbody");
  body.replaceChildren();
  screened.forEach((rec, i) => {
    let cells;
    if (rec.error) {
      const cell = td(rec.error, "error");
      cell.colSpan = 4 + cols.length;
      cells = [td(rec.path, "name"), cell];
    } else {
      const byRun = new Map((rec.predictions || []).map((p) => [p.run, p]));
      const marks = fitMarks(rec);
      const flags = [...(rec.flags || []).map((f) => f.kind), ...marks.map(([run, , cls]) => (cls === "error" ? `misfit ${run}` : `\u26a0 ${run}`))].join(", ") || "–";
      cells = [
        td(rec.path, "name"),
        td(rec.format || "?"),
        td(rec.num_layers, "num"),
        td((rec.ranks || []).join("/"), "num"),
        td(flags, (rec.flags || []).some((f) => f.severity === "error") || marks.length ? "error fit" : ""),
        ...cols.map(([run, t]) => {
          const p = byRun.get(run);
          if (!p || p.error) return td(p ? "does not fit" : "", "error");
          const mark = p.in_distribution === false ? " \u26a0" : "";
          return td(num(p.prediction[t], 4) + mark, mark ? "num error" : "num");
        }),
      ];
    }
    const tr = row(cells);
    if (!rec.error && fitMarks(rec).length) tr.classList.add("flagged");
    if (i === selected) tr.classList.add("selected");
    tr.addEventListener("click", () => select(i));
    body.append(tr);
  });
}

function select(i) {
  selected = i;
  showResult(screened[i]);
  showHistory();
}

function add(rec) {
  screened.push(rec);
  select(screened.length - 1);
}

// ---------------------------------------------------------------------------------- server

async function screen(file) {
  setStatus(`screening ${file.name} (${(file.size / 1048576).toFixed(1)} MB) …`);
  const form = new FormData();
  form.append("file", file, file.name);
  let res;
  try {
    res = await fetch("/api/screen", { method: "POST", body: form, headers: authHeaders() });
  } catch (e) {
    setStatus(`${file.name}: the server could not be reached (${e.message})`, true);
    return;
  }
  let body;
  try { body = await res.json(); } catch { body = { error: `${res.status} ${res.statusText}` }; }
  if (res.status === 401) $("#token-box").hidden = false;
  if (!res.ok) {
    const error = body.error || `${res.status} ${res.statusText}`;
    setStatus(error, true);
    add({ path: file.name, error });
    return;
  }
  setStatus(`${file.name}: screened in ${num(body.seconds, 2)} s`);
  add(body);
}

async function loadRuns() {
  const res = await fetch("/api/runs", { headers: authHeaders() });
  if (res.status === 401) {
    $("#token-box").hidden = false;
    setStatus("this server needs its token: enter it above", true);
    return;
  }
  if (!res.ok) return;
  runs = await res.json();
  showRuns();
}

function showRuns() {
  $("#runs-card").hidden = runs.length === 0;
  const body = $("#runs tbody");
  body.replaceChildren();
  for (const r of runs) {
    const n = r.trained_on && r.trained_on.n ? `${r.trained_on.n.train} LoRAs` : "";
    const store = r.trained_on && r.trained_on.store ? ` of ${r.trained_on.store}` : "";
    body.append(row([td(r.name), td(r.model), td(`${r.task}: ${r.targets.join(", ")}`), td(n + store), td(r.standing_line)]));
  }
}

function wireUpload() {
  const drop = $("#drop");
  const input = $("#file");
  input.addEventListener("change", () => {
    for (const f of input.files) screen(f);
    input.value = "";
  });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
  for (const ev of ["dragenter", "dragover"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const ev of ["dragleave", "drop"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => { for (const f of e.dataTransfer.files) screen(f); });
  const token = $("#token");
  token.value = sessionStorage.getItem("loralens-token") || "";
  token.addEventListener("change", () => {
    sessionStorage.setItem("loralens-token", token.value.trim());
    setStatus("");
    loadRuns();
  });
}

function start() {
  const embedded = document.getElementById("loralens-report");
  if (embedded) { // an HTML report: the records are in the page, there is no server
    const report = JSON.parse(embedded.textContent);
    $("#upload").hidden = true;
    $("#history-title").textContent = `${report.records.length} adapters screened`;
    runs = report.runs || [];
    showRuns();
    for (const rec of report.records) screened.push(rec);
    const first = screened.findIndex((rec) => !rec.error);
    if (screened.length) select(Math.max(0, first));
    return;
  }
  wireUpload();
  loadRuns();
}

document.addEventListener("DOMContentLoaded", start);
