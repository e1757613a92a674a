// Rate–accuracy: the bench JSON's curves, AP50 against bpp on a log axis, one polyline per method.
"use strict";
headerState();
(async () => {
  const svg = document.getElementById("rate");
  let data;
  try { data = await getJSON("/api/bench"); } catch (e) {
    svg.outerHTML = `<p class="err">${esc(e.message || e)}</p>`;
    return;
  }
  document.getElementById("rate-source").textContent =
    `(${data.source}${data.bundle ? `, ${data.bundle}` : ""}${data.images ? `, ${data.images} images` : ""})`;
  document.getElementById("rate-metric").textContent = data.metric ? `AP50: ${data.metric}` : "";
  const W = 900, H = 460, L = 60, R = 20, T = 20, B = 50;
  const pts = data.curves.flatMap(c => c.points);
  const lx = Math.floor(Math.log10(Math.min(...pts.map(p => p.bpp))));
  const hx = Math.ceil(Math.log10(Math.max(...pts.map(p => p.bpp))));
  const X = b => L + (Math.log10(b) - lx) / (hx - lx || 1) * (W - L - R);
  const Y = a => T + (1 - a) * (H - T - B);
  const g = [];
  for (let e = lx; e <= hx; e++) {
    g.push(`<line x1="${X(10 ** e)}" x2="${X(10 ** e)}" y1="${T}" y2="${H - B}" stroke="#ddd"/>` +
      `<text x="${X(10 ** e)}" y="${H - B + 18}" text-anchor="middle" font-size="12">${10 ** e}</text>`);
    for (let k = 2; k < 10 && e < hx; k++)
      g.push(`<line x1="${X(k * 10 ** e)}" x2="${X(k * 10 ** e)}" y1="${H - B}" y2="${H - B + 4}" stroke="#999"/>`);
  }
  for (let a = 0; a <= 1.0001; a += 0.2)
    g.push(`<line x1="${L}" x2="${W - R}" y1="${Y(a)}" y2="${Y(a)}" stroke="#eee"/>` +
      `<text x="${L - 6}" y="${Y(a) + 4}" text-anchor="end" font-size="12">${a.toFixed(1)}</text>`);
  g.push(`<text x="${(L + W - R) / 2}" y="${H - 10}" text-anchor="middle" font-size="13">bits per pixel (log)</text>`,
    `<text x="16" y="${(T + H - B) / 2}" text-anchor="middle" font-size="13" transform="rotate(-90 16 ${(T + H - B) / 2})">AP50</text>`,
    `<rect x="${L}" y="${T}" width="${W - L - R}" height="${H - T - B}" fill="none" stroke="#999"/>`);
  const legend = [];
  data.curves.forEach((c, i) => {
    const col = COLORS[i % COLORS.length];
    const d = c.points.map((p, j) => `${j ? "L" : "M"}${X(p.bpp).toFixed(1)} ${Y(p.ap50).toFixed(1)}`).join(" ");
    g.push(`<path class="curve" data-method="${esc(c.method)}" d="${d}" fill="none" stroke="${col}" stroke-width="2"/>`);
    c.points.forEach(p => g.push(`<circle cx="${X(p.bpp).toFixed(1)}" cy="${Y(p.ap50).toFixed(1)}" r="3" fill="${col}">` +
      `<title>${esc(c.method)} ${esc(p.label)}: ${num(p.bpp, 3)} bpp, AP50 ${num(p.ap50, 3)}</title></circle>`));
    legend.push(`<div><i data-color="${col}"></i>${esc(c.method)} <span class="muted">${esc(c.kind)}</span></div>`);
  });
  svg.innerHTML = g.join("");
  const box = document.getElementById("rate-legend");
  box.innerHTML = legend.join("");
  // Colours through the DOM, not a style attribute: the Content-Security-Policy allows no inline styles.
  box.querySelectorAll("i[data-color]").forEach(i => { i.style.background = i.dataset.color; });
})();
