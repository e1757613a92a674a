// Live page: open streams over SSE (with sparklines), bundles and recent frames polled every 2 s.
"use strict";
const codecLevel = s => s.codec ? `${esc(s.codec)}/${esc(s.level)}` : "";
const streamRow = s => row([
  td(esc(s.client)), td(esc(s.bundle)), td(esc(s.task)), td(codecLevel(s)), td(num(s.kbps), "n"),
  td(num(s.fps), "n"), td(num(s.latency_p50_ms), "n"), td(num(s.latency_p95_ms), "n"), td(s.frames, "n"),
  td(s.errors, "n"), td(sparkline(s.series.kbit, {cls: "kbit"})),
  td(sparkline(s.series.level, {color: "#d62728", step: true, w: 90, cls: "level"})), td(clock(s.opened))]);
const closedRow = s => row([
  td(esc(s.client)), td(esc(s.bundle)), td(esc(s.task)), td(codecLevel(s)), td(s.frames, "n"),
  td(s.bytes, "n"), td(s.errors, "n"), td(clock(s.closed))]);
const levels = c => c.levels.map(l => esc(l.level) + (l.mean_bpp ? ` (${num(l.mean_bpp, 3)} bpp)` : ""));
const bundleRow = b => row([
  td(esc(`${b.name}/${b.version}`)), td(esc(b.tasks.join(", "))), td(esc(b.class_names.join(", "))),
  td(b.codecs.map(c => `${esc(c.name)}: ${levels(c).join(" ")}`).join("<br>")),
  td(`<code>${esc(b.table_hash.slice(0, 16))}</code>`)]);
const status = f => f.error
  ? `<span class="err" title="${esc(f.error.message)}">${esc(f.error.status)}</span>`
  : '<span class="ok">OK</span>';
// What else the task found besides boxes (masks, landmark sets), after the detections.
const extras = f => [f.masks ? `${f.masks} mask(s)` : "", f.landmarks ? `${f.landmarks} landmark set(s)` : ""]
  .filter(Boolean).map(esc);
// The edge's novelty for the frame, and a badge when its rate control fell back for it.
const novelty = f => (f.novelty != null ? `<br><span class="muted novelty">novelty ${num(f.novelty, 3)}</span>` : "")
  + (f.fallback ? ` <span class="err fallback" title="${esc(f.fallback)}">fallback</span>` : "");
// A frame whose picture the server still keeps links it (a new tab shows the JPEG).
const picture = f => f.preview_url
  ? ` · <a class="preview-link" href="${esc(f.preview_url)}" target="_blank">picture</a>` : "";
const frameRow = f => row([
  td(clock(f.time)), td(esc(f.client)), td(esc(f.frame_id)),
  td(`${esc(f.bundle)}<br><span class="muted">${esc(f.task)}</span>`),
  td(f.codec ? `${esc(f.codec)}/${esc(f.level)}${f.truncated ? " (cut)" : ""}${novelty(f)}` : ""),
  td(f.bytes, "n"), td(num(f.bpp, 3), "n"), td(f.boxes ?? "", "n"),
  td([...(f.detections || []).map(d => `${esc(d[0])} ${num(d[1], 2)}`), ...extras(f)].join(", ")),
  td(num(f.timings?.decode_ms), "n"), td(num(f.timings?.queue_ms), "n"),
  td(num(f.timings?.task_ms), "n"), td(num(f.timings?.total_ms), "n"), td(status(f) + picture(f))]);

liveStreams(data => {
  fill("streams", data.open.map(streamRow), 13);
  fill("closed", data.closed.map(closedRow), 8);
});
async function refresh() {
  const info = await headerState();
  if (!info) return;
  fill("bundles", info.bundles.map(bundleRow), 5);
  try { fill("frames", (await getJSON("/api/frames?limit=50")).map(frameRow)); } catch (e) { /* next time */ }
}
refresh();
setInterval(refresh, 2000);
