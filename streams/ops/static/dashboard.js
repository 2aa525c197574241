// Polls /api/figures and renders tiles, tables and uPlot charts.
"use strict";
const charts = {};
const fmt = (v) => (v === null || v === undefined ? "–" : Number(v).toLocaleString("en-US"));

function setFigure(name, text) {
  document.querySelectorAll(`[data-figure="${name}"]`).forEach((el) => { el.textContent = text; });
}

function columns(rows, width) {
  // [[t, a, b], ...] -> [[t...], [a...], [b...]]
  const out = Array.from({ length: width }, () => []);
  for (const r of rows) for (let i = 0; i < width; i++) out[i].push(r[i]);
  return out;
}

// the time ranges offered; until one is chosen (#minutes=N in the address), the page
// opens on the shortest that holds all of the last 24 hours' activity
const RANGES = [[15, "15 min"], [60, "1 h"], [360, "6 h"], [1440, "24 h"]];
let windowMinutes = RANGES.some(([m]) => `#minutes=${m}` === location.hash)
  ? Number(location.hash.slice("#minutes=".length)) : null;

function fittingRange(f) {
  const times = [f.invoices_per_minute, f.payments_per_minute, f.refund_latency, f.api_per_minute]
    .flatMap((rows) => (rows || []).map((r) => r[0]));
  if (!times.length) return 60;
  const age = Date.now() / 1000 - Math.min(...times);
  return (RANGES.find(([m]) => age <= m * 60) || RANGES[RANGES.length - 1])[0];
}

function chart(id, rows, series) {
  const el = document.getElementById(id);
  const data = columns(rows, series.length + 1);
  const opts = {
    width: el.clientWidth || 560, height: 180,
    series: [{}, ...series.map(([label, stroke]) => ({ label, stroke, width: 2 }))],
    axes: [{}, { size: 60 }],
    // the time axis always spans the window, however few points there are
    scales: { x: { time: true, range: () => {
      const now = Date.now() / 1000;
      return [now - windowMinutes * 60, now];
    } } },
  };
  if (charts[id]) { charts[id].setData(data); return; }
  charts[id] = new uPlot(opts, data, el);
}

const text = (v) => String(v).replace(/[<&"]/g, "");

function rowsHtml(rows) {
  return rows.map((cells) => "<tr>" + cells.map(([v, num]) =>
    `<td${num ? ' class="n"' : ""}>${num ? fmt(v) : text(v)}</td>`).join("") + "</tr>").join("");
}

function lagHtml(groups) {
  // one row per group, worst first; its partitions unfold (and stay open across refreshes)
  const open = new Set([...document.querySelectorAll("#lag details[open]")].map((d) => d.dataset.group));
  return groups.map((g) =>
    `<details data-group="${text(g.group)}" data-lag="${g.lag}"${open.has(g.group) ? " open" : ""}>` +
    `<summary><span>${text(g.group)}</span><span class="n${g.lag > 0 ? " bad" : ""}">${fmt(g.lag)}</span></summary>` +
    "<table><thead><tr><th>topic</th><th class=\"n\">partition</th><th class=\"n\">lag</th></tr></thead><tbody>" +
    rowsHtml(g.partitions.map((p) => [[p.topic], [p.partition, true], [p.lag, true]])) +
    "</tbody></table></details>").join("");
}

function showRange() {
  document.querySelectorAll("#ranges button").forEach((b) => {
    b.classList.toggle("on", Number(b.dataset.minutes) === windowMinutes);
  });
  setFigure("range", RANGES.find(([m]) => m === windowMinutes)[1]);
}

async function figures(minutes) {
  const res = await fetch(`/api/figures?minutes=${minutes}`);
  return res.json();
}

async function refresh() {
  let f;
  if (windowMinutes === null) {
    f = await figures(RANGES[RANGES.length - 1][0]);
    windowMinutes = fittingRange(f);
    if (windowMinutes !== f.minutes) f = await figures(windowMinutes);
  } else {
    f = await figures(windowMinutes);
  }
  if (f.minutes !== windowMinutes) return;  // the range changed while this was asked
  const t = f.totals || {};
  showRange();
  setFigure("generated_at", new Date(f.generated_at).toLocaleTimeString());
  setFigure("invoices", fmt(t.invoices));
  setFigure("payments", fmt(t.payments));
  setFigure("payment_success_rate",
    t.payment_success_rate === null || t.payment_success_rate === undefined
      ? "–" : (100 * t.payment_success_rate).toFixed(1) + " %");
  setFigure("refunds", fmt(t.refunds));
  setFigure("refund_p50_ms", fmt(t.refund_p50_ms));
  setFigure("refund_p99_ms", fmt(t.refund_p99_ms));
  setFigure("dead_letters", fmt(t.dead_letters));
  setFigure("api_requests", fmt(f.api_totals.requests));
  setFigure("api_errors_5xx", fmt(f.api_totals.errors_5xx));
  setFigure("api_refused_4xx", fmt(f.api_totals.refused_4xx));
  const lag = f.lag || [];
  setFigure("lag_total", fmt(lag.reduce((s, g) => s + g.lag, 0)));
  setFigure("lag_groups", fmt(lag.length));
  document.getElementById("lag").innerHTML = lagHtml(lag);
  document.getElementById("dead-letters").innerHTML = rowsHtml(
    (f.dead_letters || []).map((d) => [[d.processor], [d.reason], [d.count, true]]));
  document.getElementById("runs").innerHTML = (f.runs || []).map((r) =>
    `<tr${r.margin_s !== null && r.margin_s < 0 ? ' class="late"' : ""}><td>${text(r.kind)}</td>` +
    `<td>${text(r.run)}</td><td class="n">${r.eta_s === null ? "never" : fmt(r.eta_s)}</td>` +
    `<td class="n">${r.margin_s === null ? "–" : fmt(r.margin_s)}</td></tr>`).join("");
  document.getElementById("calendar").innerHTML = rowsHtml((f.calendar || []).map((c) =>
    [[c.day], [c.currency], [c.invoices, true], [c.payments, true], [c.retries, true]]));
  document.getElementById("errors").textContent =
    [f.warehouse_error, f.kafka_error].filter(Boolean).join(" · ");
  chart("chart-invoices", f.invoices_per_minute || [], [["invoices", "#2962ff"]]);
  chart("chart-payments", f.payments_per_minute || [], [["succeeded", "#2e7d32"], ["failed", "#c62828"]]);
  chart("chart-refunds", f.refund_latency || [], [["p50", "#6a1b9a"], ["p99", "#ef6c00"]]);
  chart("chart-api", f.api_per_minute || [], [["requests", "#00838f"], ["5xx", "#c62828"], ["4xx", "#f9a825"]]);
  document.body.dataset.loaded = "true";
}

document.getElementById("ranges").innerHTML = RANGES.map(([m, label]) =>
  `<button type="button" data-minutes="${m}">${label}</button>`).join("");
document.querySelectorAll("#ranges button").forEach((b) => b.addEventListener("click", () => {
  windowMinutes = Number(b.dataset.minutes);
  history.replaceState(null, "", `#minutes=${windowMinutes}`);
  showRange();
  refresh().catch((e) => { document.getElementById("errors").textContent = String(e); });
}));
refresh().catch((e) => { document.getElementById("errors").textContent = String(e); });
setInterval(() => refresh().catch((e) => {
  document.getElementById("errors").textContent = String(e);
}), 5000);
