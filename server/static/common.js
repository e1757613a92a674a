// Shared helpers of the dashboard pages (no libraries: plain DOM and SVG).
"use strict";
const ESC = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"};
const esc = s => String(s ?? "").replace(/[&<>"']/g, c => ESC[c]);
const num = (v, d = 1) => v == null ? "" : Number(v).toFixed(d);
const clock = s => new Date(s * 1000).toLocaleTimeString();
const td = (v, cls = "") => `<td${cls ? ` class="${cls}"` : ""}>${v}</td>`;
const row = cells => `<tr>${cells.join("")}</tr>`;
const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                "#7f7f7f", "#bcbd22", "#393b79"];

function fill(id, rows, cols = 14) {
  document.querySelector(`#${id} tbody`).innerHTML =
    rows.join("") || `<tr><td class="muted" colspan="${cols}">none</td></tr>`;
}

// A sparkline of `values` as an SVG string (`step`: a staircase, for levels).
function sparkline(values, {w = 140, h = 28, color = "#1f77b4", step = false, cls = ""} = {}) {
  if (!values || !values.length) return `<svg class="spark ${cls}" width="${w}" height="${h}"></svg>`;
  const lo = Math.min(...values), hi = Math.max(...values), span = hi - lo || 1;
  const n = values.length, dx = n > 1 ? w / (n - 1) : 0;
  const y = v => (h - 3 - (v - lo) / span * (h - 6)).toFixed(1);
  let d = `M0 ${y(values[0])}`;
  values.forEach((v, i) => {
    if (!i) return;
    d += step ? ` H${(i * dx).toFixed(1)} V${y(v)}` : ` L${(i * dx).toFixed(1)} ${y(v)}`;
  });
  if (n === 1) d += ` H${w}`;
  return `<svg class="spark ${cls}" width="${w}" height="${h}" viewBox="0 0 ${w} ${h}">` +
    `<title>${num(lo, 1)} … ${num(hi, 1)}</title><path d="${d}" fill="none" stroke="${color}" ` +
    `stroke-width="1.5"/></svg>`;
}

// Boxes ({x1, y1, x2, y2, class_name, score}) as SVG over a W×H frame, drawn into `svg`.
function drawBoxes(svg, width, height, boxes, {image = null, label = ""} = {}) {
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const fs = Math.max(12, Math.round(Math.max(width, height) / 45));
  const parts = [image
    ? `<image href="${esc(image)}" x="0" y="0" width="${width}" height="${height}"/>`
    : `<rect x="0" y="0" width="${width}" height="${height}" fill="#dfe3e8"/>` +
      `<text x="${width / 2}" y="${height / 2}" text-anchor="middle" font-size="${fs}" fill="#8a939d">` +
      `${esc(label || `${width}×${height}, no pixels sent`)}</text>`];
  (boxes || []).forEach(b => {
    const c = COLORS[(b.class_id ?? 0) % COLORS.length];
    const w = Math.max(1, b.x2 - b.x1), h = Math.max(1, b.y2 - b.y1);
    const lw = fs * 0.62 * (String(b.class_name).length + 5), lh = fs * 1.3;  // the label stays inside
    const lx = Math.max(0, Math.min(b.x1, width - lw)), ly = b.y1 >= lh ? b.y1 - lh : b.y1;
    parts.push(`<g class="box"><rect x="${b.x1}" y="${b.y1}" width="${w}" height="${h}" fill="none" ` +
      `stroke="${c}" stroke-width="${Math.max(2, fs / 6)}"/>` +
      `<rect x="${lx}" y="${ly}" width="${lw}" height="${lh}" fill="${c}"/>` +
      `<text x="${lx + fs * 0.2}" y="${ly + fs}" font-size="${fs}" fill="#fff">` +
      `${esc(b.class_name)} ${num(b.score, 2)}</text></g>`);
  });
  svg.innerHTML = parts.join("");
}

// With tokens on, the session cookie ends after a while: a 401 sends the page back to the login form.
function toLogin() {
  location.assign("/login?next=" + encodeURIComponent(location.pathname + location.search));
}

async function getJSON(url, opts) {
  const r = await fetch(url, opts);
  if (r.status === 401) toLogin();
  const body = await r.json().catch(() => ({error: {message: `HTTP ${r.status}`}}));
  if (!r.ok) throw new Error(body.error ? `${body.error.status || r.status}: ${body.error.message}` : r.status);
  return body;
}

async function headerState() {
  const state = document.getElementById("state");
  try {
    const info = await getJSON("/api/info");
    state.innerHTML = info.ready ? '<b class="ok">ready</b>' : '<b class="err">loading</b>';
    document.getElementById("meta").textContent = `${info.device} · up ${Math.round(info.uptime_s)} s`;
    return info;
  } catch (e) {
    state.innerHTML = '<b class="err">unreachable</b>';
    return null;
  }
}

// Server-sent events of /api/live (open and recently closed streams, every second).
function liveStreams(onData) {
  const es = new EventSource("/api/live");
  es.onmessage = ev => onData(JSON.parse(ev.data));
  es.onerror = () => {
    document.getElementById("state").innerHTML = '<b class="err">reconnecting</b>';
    if (es.readyState === EventSource.CLOSED) headerState();  // refused (a 401 among them): ask why
  };
  es.onopen = () => headerState();
  return es;
}
