// Frame view: the newest frame of a stream (open, else recently closed), over SSE: the picture the
// server rebuilt when the stream asked for one (else a neutral canvas), masks, boxes, landmarks.
"use strict";
const pick = document.getElementById("stream");
const svg = document.getElementById("frame");
let chosen = null, drawn = null, objectURL = null, latest = null;
pick.onchange = () => { chosen = pick.value; if (latest) render(latest); };  // now, not at the next event

// Draw frame `f` of stream `s` once (an event repeats it every second); the preview is fetched first.
async function show(s, f) {
  const sig = `${s.id}:${f.key ?? f.frame_id}:${f.time}`;  // its preview was stored before it was sent
  if (sig === drawn) return;
  drawn = sig;
  let url = null;
  if (f.preview_url) {
    url = await previewURL(f.preview_url).catch(() => null);
    if (drawn !== sig) { if (url) URL.revokeObjectURL(url); return; }  // a newer frame came meanwhile
  }
  const label = f.preview_url && !url ? `${f.width}×${f.height}, preview no longer kept` : "";
  drawFrame(svg, f.width, f.height, f, {image: url, label});
  if (objectURL) URL.revokeObjectURL(objectURL);
  objectURL = url;
  svg.dataset.key = f.key ?? "";
  svg.dataset.preview = url ? f.preview_url : "";
  const info = document.getElementById("frame-info");
  info.innerHTML = `<b>frame ${esc(f.frame_id)}</b> at ${clock(f.time)}<br>${f.width}×${f.height} px · ` +
    `${esc(f.task || s.task)} · ${esc(f.codec)}/${esc(f.level)} · ${f.bytes} B · ${num(f.bpp, 3)} bpp<br>` +
    `${esc(resultWords(f))}` +
    (f.preview_url ? ` · <a class="preview-link" href="${esc(f.preview_url)}" target="_blank">picture</a>` : "") +
    ((f.boxes || []).length ? `<br><table class="boxes"><thead><tr><th>class</th><th class="n">score</th>` +
      "<th>xyxy</th></tr></thead><tbody>" + f.boxes.map(b => row([td(esc(b.class_name)), td(num(b.score, 2), "n"),
        td([b.x1, b.y1, b.x2, b.y2].map(v => num(v, 0)).join(" "))])).join("") + "</tbody></table>" : "");
}

function render(data) {
  latest = data;
  const all = [...data.open, ...data.closed].filter(s => s.last);
  const opts = all.map(s => [String(s.id),
    `${s.client || "?"} · ${s.bundle} · ${s.task} · #${s.id}${s.closed ? " (closed)" : ""}`]);
  const html = opts.map(([v, l]) => `<option value="${esc(v)}">${esc(l)}</option>`).join("");
  if (pick.dataset.html !== html) { pick.innerHTML = html; pick.dataset.html = html; }
  if (!opts.some(([v]) => v === chosen)) chosen = opts.length ? opts[0][0] : null;
  pick.value = chosen ?? "";
  const s = all.find(x => String(x.id) === chosen);
  if (!s) { document.getElementById("frame-info").textContent = "no stream with a frame yet"; return; }
  show(s, s.last);
}

headerState();
liveStreams(render);
