// Try it: upload an image and pick bundle, task, codec and level; the server codes it with the edge
// encoder and answers with what the task found, drawn over the upload or the picture it rebuilt.
"use strict";
const $ = id => document.getElementById(id);
let bundles = [];
const chosenBundle = () => bundles.find(x => `${x.name}/${x.version}` === $("try-bundle").value);
function levelsOf() {
  const b = chosenBundle();
  const c = b && b.codecs.find(x => x.name === $("try-codec").value);
  return c ? c.levels : [];
}
function fillBundle() {
  const b = chosenBundle();
  $("try-task").innerHTML = (b ? b.tasks : []).map(t => `<option>${esc(t)}</option>`).join("");
  $("try-codec").innerHTML = (b ? b.codecs : []).map(c => `<option>${esc(c.name)}</option>`).join("");
  fillLevels();
}
function fillLevels() {
  $("try-level").innerHTML = levelsOf().map(l =>
    `<option value="${l.level}">${l.level}${l.mean_bpp ? ` (~${num(l.mean_bpp, 2)} bpp)` : ""}</option>`).join("");
}
$("try-bundle").onchange = fillBundle;
$("try-codec").onchange = fillLevels;
headerState().then(info => {
  bundles = info ? info.bundles : [];
  $("try-bundle").innerHTML = bundles.map(b => `<option>${esc(b.name)}/${esc(b.version)}</option>`).join("");
  fillBundle();
});
let urls = [];  // object URLs of the upload and the previews shown, revoked on the next answer
async function figure(title, r, w, h, upload) {
  const fig = document.createElement("figure");
  const picture = r.preview_url ? await previewURL(r.preview_url).catch(() => null) : null;
  if (picture) urls.push(picture);
  fig.innerHTML = `<figcaption><b>${esc(title)}</b>: ${esc(r.codec)}/${esc(r.level)} · ` +
    `<span class="bytes">${r.bytes}</span> B · <span class="bpp">${num(r.bpp, 3)}</span> bpp · ` +
    `<span class="found">${esc(resultWords(r))}</span> · encode ${num(r.encode_ms)} ms, ` +
    `server ${num(r.server_ms)} ms` + (r.target_bpp ? ` · target ${r.target_bpp} bpp` : "") +
    ` · <span class="muted">${picture ? "over the picture the server rebuilt" : "over your upload"}</span>` +
    (r.warning ? `<br><span class="err">${esc(r.warning)}</span>` : "") + "</figcaption>";
  const svg = document.createElementNS(SVG, "svg");
  svg.dataset.preview = picture ? r.preview_url : "";
  fig.appendChild(svg);
  drawFrame(svg, w, h, r, {image: picture || upload});
  return fig;
}
$("try-form").onsubmit = async ev => {
  ev.preventDefault();
  const file = $("try-file").files[0];
  if (!file) return;
  $("try-error").textContent = "";
  delete $("try-out").dataset.done;
  $("try-out").innerHTML = '<span class="muted">coding…</span>';
  const q = new URLSearchParams({bundle: $("try-bundle").value, task: $("try-task").value,
                                 codec: $("try-codec").value});
  if ($("try-bpp").value) q.set("target_bpp", $("try-bpp").value); else q.set("level", $("try-level").value);
  if ($("try-preview").checked) q.set("want_preview", "true");
  try {
    const r = await getJSON(`/api/try?${q}`, {method: "POST", body: file,
                                              headers: {"content-type": "application/octet-stream"}});
    urls.forEach(u => URL.revokeObjectURL(u));
    urls = [URL.createObjectURL(file)];
    const figs = [await figure("coded", r.result, r.width, r.height, urls[0]),
                  await figure("uncompressed reference", r.reference, r.width, r.height, urls[0])];
    $("try-out").innerHTML = "";
    figs.forEach(f => $("try-out").appendChild(f));
    $("try-out").dataset.done = "1";
  } catch (e) {
    $("try-out").innerHTML = "";
    $("try-error").textContent = String(e.message || e);
  }
};
