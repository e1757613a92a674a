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

// COCO-17 keypoints (nose, eyes, ears, shoulders, elbows, wrists, hips, knees, ankles): the limbs.
const COCO17_SKELETON = [[15, 13], [13, 11], [16, 14], [14, 12], [11, 12], [5, 11], [6, 12], [5, 6],
  [5, 7], [6, 8], [7, 9], [8, 10], [1, 2], [0, 1], [0, 2], [1, 3], [2, 4], [3, 5], [4, 6]];
const KEYPOINT_MIN = 0.2;  // a keypoint below this confidence is not drawn (nor its limbs)
const MASK_RGBA = [30, 144, 255, 110];  // translucent blue

// A run-length mask ({width, height, counts}: row-major runs starting with zeros, as palettelink/rle.py
// writes them) as a PNG data URL, its ones translucent; null when the runs do not cover it exactly.
function maskURL(m, rgba = MASK_RGBA) {
  const w = m.width | 0, h = m.height | 0, n = w * h;
  if (w <= 0 || h <= 0 || n > (1 << 26)) return null;
  let total = 0;
  for (const r of m.counts) total += r;
  if (total !== n) return null;
  const c = document.createElement("canvas");
  c.width = w; c.height = h;
  const ctx = c.getContext("2d"), img = ctx.createImageData(w, h);
  const px = new Uint32Array(img.data.buffer), rgba8 = new Uint8ClampedArray(rgba);
  const value = new Uint32Array(rgba8.buffer)[0];  // one pixel, in the platform's byte order
  let p = 0, on = false;
  for (const r of m.counts) {
    if (on) px.fill(value, p, p + r);
    p += r; on = !on;
  }
  ctx.putImageData(img, 0, 0);
  return c.toDataURL("image/png");
}

// Landmark sets ({scheme, points: [[x, y, v]]}) as SVG: COCO-17 with its skeleton, others as dots.
function landmarksSVG(sets, fs) {
  const r = Math.max(1.5, fs / 8), lw = Math.max(1.5, fs / 6);
  return (sets || []).map((s, i) => {
    const pts = s.points || [];
    if (s.scheme === "coco17") {
      const ok = j => pts[j] && pts[j][2] >= KEYPOINT_MIN;
      const limbs = COCO17_SKELETON.filter(([a, b]) => ok(a) && ok(b)).map(([a, b]) =>
        `<line x1="${pts[a][0]}" y1="${pts[a][1]}" x2="${pts[b][0]}" y2="${pts[b][1]}"/>`).join("");
      const dots = pts.map((p, j) => ok(j)
        ? `<circle cx="${p[0]}" cy="${p[1]}" r="${r * 1.6}" fill="${j % 2 ? "#ff7f0e" : "#2ca02c"}"/>` : "").join("");
      return `<g class="pose" data-set="${i}"><g stroke="#fff" stroke-width="${lw}" stroke-linecap="round">` +
        `${limbs}</g>${dots}</g>`;
    }
    return `<g class="landmarks" data-set="${i}" data-scheme="${esc(s.scheme)}" fill="#00e5ff">` +
      pts.map(p => `<circle cx="${p[0]}" cy="${p[1]}" r="${r}"/>`).join("") + "</g>";
  }).join("");
}

// One frame's results over its W×H picture, drawn into `svg`: the picture (`image`: a URL) or a
// neutral canvas with `label`, then masks (translucent), boxes ({x1, y1, x2, y2, class_name,
// score}) and landmarks/keypoints on top.
function drawFrame(svg, width, height, out, {image = null, label = ""} = {}) {
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const fs = Math.max(12, Math.round(Math.max(width, height) / 45));
  const parts = [image
    ? `<image class="preview" href="${esc(image)}" x="0" y="0" width="${width}" height="${height}" ` +
      `preserveAspectRatio="none"/>`
    : `<rect x="0" y="0" width="${width}" height="${height}" fill="#dfe3e8"/>` +
      `<text x="${width / 2}" y="${height / 2}" text-anchor="middle" font-size="${fs}" fill="#8a939d">` +
      `${esc(label || `${width}×${height}, no pixels sent`)}</text>`];
  (out.masks || []).forEach(m => {
    const url = maskURL(m);
    if (url) parts.push(`<image class="mask" href="${url}" x="0" y="0" width="${width}" height="${height}" ` +
      `preserveAspectRatio="none"/>`);
  });
  (out.boxes || []).forEach(b => {
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
  parts.push(landmarksSVG(out.landmarks, fs));
  svg.innerHTML = parts.join("");
}

// Boxes alone (the older call).
function drawBoxes(svg, width, height, boxes, opts = {}) {
  drawFrame(svg, width, height, {boxes}, opts);
}

// A stored preview (`/api/frames/{key}/preview.jpg`) fetched once into an object URL, so that the
// picture drawn is the one fetched even if the server's store evicts it a moment later; null when
// it is gone (404). Revoke the URL when the picture is replaced.
async function previewURL(url) {
  const r = await fetch(url, {cache: "no-store"});
  if (r.status === 401) toLogin();
  if (!r.ok) return null;
  return URL.createObjectURL(await r.blob());
}

// What a frame's task returned, in words: "3 box(es), 1 mask, 2 landmark set(s)".
function resultWords(out) {
  const n = (v, one, many) => `${v} ${v === 1 ? one : many}`;
  const parts = [n((out.boxes || []).length, "box", "boxes")];
  if ((out.masks || []).length) parts.push(n(out.masks.length, "mask", "masks"));
  const sets = out.landmarks || [];
  if (sets.length) {
    const pose = sets.filter(s => s.scheme === "coco17").length;
    if (pose) parts.push(n(pose, "pose", "poses"));
    if (sets.length > pose) parts.push(n(sets.length - pose, "landmark set", "landmark sets"));
  }
  return parts.join(", ");
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
