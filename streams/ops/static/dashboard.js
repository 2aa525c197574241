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

let windowHours = 6;

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
      return [now - windowHours * 3600, now];
    } } },
  };
  if (charts[id]) { charts[id].setData(data); return; }
  charts[id] = new uPlot(opts, data, el);
}

function rowsHtml(rows) {
  return rows.map((cells) => "<tr>" + cells.map(([v, num]) =>
    `<td${num ? ' class="n"' : ""}>${num ? fmt(v) : String(v).replace(/[<&]/g, "")}</td>`).join("") + "</tr>").join("");
}

async function refresh() {
  const res = await fetch("/api/figures");
  const f = await res.json();
  const t = f.totals || {};
  setFigure("hours", f.hours);
  windowHours = f.hours;
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
  setFigure("lag_total", fmt(lag.reduce((s, r) => s + r.lag, 0)));
  setFigure("lag_groups", fmt(new Set(lag.map((r) => r.group)).size));
  document.getElementById("lag").innerHTML = rowsHtml(
    lag.filter((r) => r.lag > 0).concat(lag.filter((r) => r.lag === 0)).slice(0, 40)
      .map((r) => [[r.group], [r.topic], [r.partition, true], [r.lag, true]]));
  document.getElementById("dead-letters").innerHTML = rowsHtml(
    (f.dead_letters || []).map((d) => [[d.processor], [d.reason], [d.count, true]]));
  document.getElementById("errors").textContent =
    [f.warehouse_error, f.kafka_error].filter(Boolean).join(" · ");
  chart("chart-invoices", f.invoices_per_minute || [], [["invoices", "#2962ff"]]);
  chart("chart-payments", f.payments_per_minute || [], [["succeeded", "#2e7d32"], ["failed", "#c62828"]]);
  chart("chart-refunds", f.refund_latency || [], [["p50", "#6a1b9a"], ["p99", "#ef6c00"]]);
  chart("chart-api", f.api_per_minute || [], [["requests", "#00838f"], ["5xx", "#c62828"], ["4xx", "#f9a825"]]);
  document.body.dataset.loaded = "true";
}

refresh().catch((e) => { document.getElementById("errors").textContent = String(e); });
setInterval(() => refresh().catch((e) => {
  document.getElementById("errors").textContent = String(e);
}), 5000);
