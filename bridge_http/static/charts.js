// The console's charts: one SVG polyline per series over the last hour. Hand-written on purpose:
// three small line charts need about sixty lines, and no library means nothing to vendor, no
// inline styles for the Content-Security-Policy to forbid, and nothing to keep up to date.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const WIDTH = 300;
const HEIGHT = 100;

function svgNode(tag, attributes, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

// points: [{ts (seconds), value (number or null)}]; a null value breaks the line.
function drawChart(svg, points, options) {
  const span = (options && options.span) || 3600;
  const now = Date.now() / 1000;
  const values = points.map((p) => p.value).filter((v) => typeof v === "number");
  const low = Math.min(options && options.min !== undefined ? options.min : 0, ...values);
  let high = Math.max(low + ((options && options.floor) || 1), ...values);
  if (options && options.max !== undefined) high = Math.max(high, options.max);
  high = high + (high - low) * 0.1;
  const x = (ts) => WIDTH - ((now - ts) / span) * WIDTH;
  const y = (v) => HEIGHT - ((v - low) / (high - low)) * HEIGHT;

  svg.replaceChildren();
  for (const fraction of [0.25, 0.5, 0.75]) {
    svg.appendChild(svgNode("line", { x1: 0, x2: WIDTH, y1: HEIGHT * fraction, y2: HEIGHT * fraction,
                                      class: "grid" }));
  }
  let run = [];
  const lines = [];
  for (const p of points) {
    if (typeof p.value !== "number" || now - p.ts > span) {
      if (run.length) lines.push(run);
      run = [];
      continue;
    }
    run.push(x(p.ts).toFixed(1) + "," + y(p.value).toFixed(1));
  }
  if (run.length) lines.push(run);
  for (const line of lines) {
    if (line.length === 1) line.push(line[0]);
    svg.appendChild(svgNode("polyline", { points: line.join(" "), class: "series" }));
  }
  svg.appendChild(svgNode("text", { x: 2, y: 10, class: "scale" }, formatNumber(high)));
  svg.appendChild(svgNode("text", { x: 2, y: HEIGHT - 2, class: "scale" }, formatNumber(low)));
  svg.dataset.points = String(values.length);
}

function formatNumber(value) {
  if (!isFinite(value)) return "";
  return Math.abs(value) >= 100 ? value.toFixed(0) : value.toFixed(1);
}

window.Charts = { drawChart, formatNumber };
