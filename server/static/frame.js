// Frame view: the newest frame of a stream (open, else recently closed) with its boxes, over SSE.
"use strict";
const pick = document.getElementById("stream");
let chosen = null;
pick.onchange = () => { chosen = pick.value; };
headerState();
liveStreams(data => {
  const all = [...data.open, ...data.closed].filter(s => s.last);
  const opts = all.map(s => [String(s.id), `${s.client || "?"} · ${s.bundle} · #${s.id}${s.closed ? " (closed)" : ""}`]);
  const html = opts.map(([v, l]) => `<option value="${esc(v)}">${esc(l)}</option>`).join("");
  if (pick.dataset.html !== html) { pick.innerHTML = html; pick.dataset.html = html; }
  if (!opts.some(([v]) => v === chosen)) chosen = opts.length ? opts[0][0] : null;
  pick.value = chosen ?? "";
  const s = all.find(x => String(x.id) === chosen);
  const info = document.getElementById("frame-info");
  if (!s) { info.textContent = "no stream with a frame yet"; return; }
  const f = s.last;
  drawBoxes(document.getElementById("frame"), f.width, f.height, f.boxes);
  info.innerHTML = `<b>frame ${esc(f.frame_id)}</b> at ${clock(f.time)}<br>${f.width}×${f.height} px · ` +
    `${esc(f.codec)}/${esc(f.level)} · ${f.bytes} B · ${num(f.bpp, 3)} bpp<br>` +
    `<table class="boxes"><thead><tr><th>class</th><th class="n">score</th><th>xyxy</th></tr></thead><tbody>` +
    f.boxes.map(b => row([td(esc(b.class_name)), td(num(b.score, 2), "n"),
      td([b.x1, b.y1, b.x2, b.y2].map(v => num(v, 0)).join(" "))])).join("") + "</tbody></table>";
});
