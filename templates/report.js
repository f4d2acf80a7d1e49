/* xmllm report: the one function every interactive view calls from its Bokeh CustomJS.
 *
 * A view's values live in one flat Float32Array (store.data.v): its leading axes (answer
 * token, layer, head, ...) first, its drawn cells last, in C order. The controls pick one
 * index per leading axis; update() copies that slice into the plotted source, rescales the
 * colour mapper and, where the view has an answer-token strip, colours each answer token by
 * its value at the selected patch (LVLM-Interpret's patch -> answer view).
 */
(function () {
  "use strict";

  let shared = null;
  // The colour palettes, once per page (reports/report/palettes.py), keyed overlay/opaque, then plain/signed.
  function palettes(overlay) {
    if (shared === null) shared = JSON.parse(document.getElementById("xmllm-palettes").textContent);
    return overlay ? shared.overlay : shared.opaque;
  }

  function current(control, fallback) {
    if (control == null) return fallback;
    const v = control.value;
    return typeof v === "string" ? parseInt(v, 10) : Math.round(v);
  }

  function ravel(sizes, index) {
    let k = 0;
    for (let i = 0; i < sizes.length; i++) k = k * sizes[i] + index[i];
    return k;
  }

  function limits(values) {
    let lo = Infinity, hi = -Infinity;
    for (const v of values) {
      if (Number.isFinite(v)) { if (v < lo) lo = v; if (v > hi) hi = v; }
    }
    return lo === Infinity ? [0, 0] : [lo, hi];
  }

  // A slice with both signs gets a diverging scale symmetric around zero (reports/report/slabs.py
  // colour_range and is_signed apply the same rule to the first slice shown).
  function scale(values) {
    const [lo, hi] = limits(values), signed = lo < 0 && hi > 0;
    if (signed) { const m = Math.max(-lo, hi); return {signed: true, lo: -m, hi: m}; }
    return {signed: false, lo: lo, hi: hi > lo ? hi : lo + 1};
  }

  function colour(palette, v, lo, hi, missing) {
    if (!Number.isFinite(v)) return missing;
    const t = Math.min(1, Math.max(0, (v - lo) / (hi - lo)));
    return palette[Math.round(t * (palette.length - 1))];
  }

  // black or white, whichever reads better on a "#rrggbb" background
  function ink(background) {
    const n = parseInt(background.slice(1, 7), 16);
    const lum = 0.2126 * (n >> 16 & 255) + 0.7152 * (n >> 8 & 255) + 0.0722 * (n & 255);
    return lum < 128 ? "#ffffff" : "#000000";
  }

  function fmt(v) {
    return Number.isFinite(v) ? Number(v.toPrecision(4)).toString() : "n/a";
  }

  function strip(a, index, flat) {
    const s = a.spec, n = s.cells, cells = a.src.selected.indices;
    const count = s.strip_count, values = new Float64Array(count).fill(NaN);
    if (cells.length) {
      const at = index.slice();
      for (let j = 0; j < count; j++) {
        at[s.token_axis] = j;
        values[j] = flat[ravel(s.sizes, at) * n + cells[0]];
      }
    }
    const [low, high] = limits(values);
    const sc = scale(values), palette = palettes(false)[sc.signed ? "signed" : "plain"];
    // one value (or all equal) shows as the top of the scale: the patch's only, hence largest, value
    const colours = Array.from(values, (v) => low === high && Number.isFinite(v) ? palette[palette.length - 1]
      : colour(palette, v, sc.lo, sc.hi, s.missing));
    a.strip.data = Object.assign({}, a.strip.data,
      {value: Array.from(values), colour: colours, text_colour: colours.map(ink)});
    if (a.strip_title) {
      const [lo, hi] = limits(values);
      a.strip_title.text = cells.length
        ? "patch row " + a.src.data.row[cells[0]] + ", col " + a.src.data.col[cells[0]] +
          ": each answer token's value there (" + fmt(lo) + " to " + fmt(hi) + ")"
        : s.strip_hint;
    }
  }

  function update(a) {
    const s = a.spec;
    const index = s.sizes.map((_, i) => current(a.lead[i], s.defaults[i]));
    const flat = a.store.data.v, n = s.cells, k = ravel(s.sizes, index);
    // copied entry by entry: Bokeh's ndarray subclasses do not honour subarray()/slice() lengths
    const values = new Array(n);
    for (let i = 0; i < n; i++) values[i] = flat[k * n + i];
    if (s.xy) {  // a scatter: the slice is (points, 2), x and y interleaved
      const xs = values.filter((_, i) => i % 2 === 0), ys = values.filter((_, i) => i % 2 === 1);
      a.src.data = Object.assign({}, a.src.data, {x: xs, y: ys});
      return;
    }
    const sc = scale(values);
    a.mapper.palette = palettes(s.overlay)[sc.signed ? "signed" : "plain"];
    a.mapper.low = sc.lo;
    a.mapper.high = sc.hi;
    a.src.data = Object.assign({}, a.src.data, {value: values});
    if (a.strip) strip(a, index, flat);
  }

  window.xmllm = {update: update, ravel: ravel, scale: scale};
})();
