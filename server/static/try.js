// Try it: upload an image; the server codes it with the edge encoder and answers with boxes.
"use strict";
const $ = id => document.getElementById(id);
let bundles = [];
function levelsOf() {
  const b = bundles.find(x => `${x.name}/${x.version}` === $("try-bundle").value);
  const c = b && b.codecs.find(x => x.name === $("try-codec").value);
  return c ? c.levels : [];
}
function fillCodecs() {
  const b = bundles.find(x => `${x.name}/${x.version}` === $("try-bundle").value);
  $("try-codec").innerHTML = (b ? b.codecs : []).map(c => `<option>${esc(c.name)}</option>`).join("");
  fillLevels();
}
function fillLevels() {
  $("try-level").innerHTML = levelsOf().map(l =>
    `<option value="${l.level}">${l.level}${l.mean_bpp ? ` (~${num(l.mean_bpp, 2)} bpp)` : ""}</option>`).join("");
}
$("try-bundle").onchange = fillCodecs;
$("try-codec").onchange = fillLevels;
headerState().then(info => {
  bundles = info ? info.bundles : [];
  $("try-bundle").innerHTML = bundles.map(b => `<option>${esc(b.name)}/${esc(b.version)}</option>`).join("");
  fillCodecs();
});
function figure(title, r, w, h, url) {
  const fig = document.createElement("figure");
  fig.innerHTML = `<figcaption><b>${esc(title)}</b>: ${esc(r.codec)}/${esc(r.level)} · ` +
    `<span class="bytes">${r.bytes}</span> B · <span class="bpp">${num(r.bpp, 3)}</span> bpp · ` +
    `${r.boxes.length} box(es) · encode ${num(r.encode_ms)} ms, server ${num(r.server_ms)} ms` +
    (r.target_bpp ? ` · target ${r.target_bpp} bpp` : "") +
    (r.warning ? `<br><span class="err">${esc(r.warning)}</span>` : "") + "</figcaption>";
  const svg = document.createElementNS(SVG, "svg");
  fig.appendChild(svg);
  drawBoxes(svg, w, h, r.boxes, {image: url});
  return fig;
}
let lastUrl = null;
$("try-form").onsubmit = async ev => {
  ev.preventDefault();
  const file = $("try-file").files[0];
  if (!file) return;
  $("try-error").textContent = "";
  $("try-out").innerHTML = '<span class="muted">coding…</span>';
  const q = new URLSearchParams({bundle: $("try-bundle").value, codec: $("try-codec").value});
  if ($("try-bpp").value) q.set("target_bpp", $("try-bpp").value); else q.set("level", $("try-level").value);
  try {
    const r = await getJSON(`/api/try?${q}`, {method: "POST", body: file,
                                              headers: {"content-type": "application/octet-stream"}});
    if (lastUrl) URL.revokeObjectURL(lastUrl);
    lastUrl = URL.createObjectURL(file);
    $("try-out").innerHTML = "";
    $("try-out").appendChild(figure("coded", r.result, r.width, r.height, lastUrl));
    $("try-out").appendChild(figure("uncompressed reference", r.reference, r.width, r.height, lastUrl));
    $("try-out").dataset.done = "1";
  } catch (e) {
    $("try-out").innerHTML = "";
    $("try-error").textContent = String(e.message || e);
  }
};
