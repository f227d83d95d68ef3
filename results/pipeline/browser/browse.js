// Feature browser of a seed ensemble of SAEs, written by `jaxsae browse`. Plain JavaScript, no libraries:
// the page opens from file://, where Chromium forbids fetch() of local JSON, so every data file is a script
// that calls BROWSE.setOverview / setVocab / addBlock. Views: "#" (overview + latent table), "#latent=I".
"use strict";

const BROWSE = (() => {
  const SVG = "http://www.w3.org/2000/svg";
  const st = {
    ov: null, vocab: {}, blocks: {}, waiting: {},
    sort: { key: "latent", dir: 1 }, limit: 300, filters: null, tau: null,
  };

  // ------------------------------------------------------------ data files

  function setOverview(o) { st.ov = o; }
  function setVocab(v) { st.vocab = v; }

  function addBlock(seed, block, part) {
    const key = seed + ":" + block;
    st.blocks[key] = part;
    (st.waiting[key] || []).forEach((w) => w.resolve(part));
    delete st.waiting[key];
  }

  // The block of per-latent data holding `latent` of seed index `seed`, loaded once by a <script> tag.
  function loadLatent(seed, latent) {
    const block = Math.floor(latent / st.ov.block);
    const key = seed + ":" + block;
    if (st.blocks[key]) return Promise.resolve(st.blocks[key][latent]);
    return new Promise((resolve, reject) => {
      const first = !st.waiting[key];
      (st.waiting[key] = st.waiting[key] || []).push({ resolve, reject });
      if (first) {
        const s = document.createElement("script");
        s.src = `data/s${seed}_b${block}.js`;
        s.onerror = () => {
          (st.waiting[key] || []).forEach((w) => w.reject(new Error("cannot load " + s.src)));
          delete st.waiting[key];
        };
        document.head.appendChild(s);
      }
    }).then((part) => part[latent]);
  }

  // ------------------------------------------------------------ small helpers

  function h(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else if (v !== null && v !== undefined && v !== false) e.setAttribute(k, v);
    }
    for (const c of children.flat()) if (c !== null && c !== undefined) e.append(c);
    return e;
  }

  function s(tag, attrs, ...children) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    for (const c of children.flat()) if (c !== null && c !== undefined) e.append(c);
    return e;
  }

  function fmt(x, digits = 3) {
    if (x === null || x === undefined || Number.isNaN(x)) return "–";
    if (x === 0) return "0";
    const a = Math.abs(x);
    if (a >= 1e4 || a < 1e-3) return x.toExponential(1);
    return Number(x.toPrecision(digits)).toString();
  }

  function pct(f) { return f === 0 ? "0" : fmt(100 * f, 2) + "%"; }

  function seedName(i) { return "seed " + st.ov.seeds[i]; }

  function nOthers() { return st.ov.seeds.length - 1; }

  function pText(p) {
    if (p === null || p === undefined) return "–";
    return `${Math.round(p * nOthers())}/${nOthers()}`;
  }

  // The text of a token as shown: whitespace made visible, ids when the model gave no token text.
  function tokText(id) {
    if (!st.ov.token_text) return `[${id}]`;
    const t = st.vocab[id];
    if (t === undefined) return `[${id}]`;
    return t.replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/\r/g, "␍") || "∅";
  }

  // red (p = 0, unstable) -> yellow -> blue (p = 1, found in every other seed)
  function pColor(p) {
    const stops = [[215, 48, 39], [254, 224, 144], [69, 117, 180]];
    const x = Math.max(0, Math.min(1, p)) * 2, i = Math.min(1, Math.floor(x)), f = x - i;
    const c = stops[i].map((v, k) => Math.round(v + f * (stops[i + 1][k] - v)));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  }

  function ticks(lo, hi, n) {
    const span = hi - lo || 1, step0 = span / n, mag = Math.pow(10, Math.floor(Math.log10(step0)));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((v) => v >= step0);
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) out.push(Number(v.toPrecision(6)));
    return out;
  }

  // An SVG chart frame: returns {svg, x(v), y(v), plot group}, with axes, ticks and labels drawn.
  function frame(w, hgt, xr, yr, xlabel, ylabel, opts = {}) {
    const m = { l: 46, r: 10, t: 10, b: 36 };
    const svg = s("svg", { width: w, height: hgt, viewBox: `0 0 ${w} ${hgt}`, class: "chart" });
    const x = (v) => m.l + (v - xr[0]) / (xr[1] - xr[0] || 1) * (w - m.l - m.r);
    const y = (v) => hgt - m.b - (v - yr[0]) / (yr[1] - yr[0] || 1) * (hgt - m.t - m.b);
    const g = s("g", {});
    for (const v of opts.xticks || ticks(xr[0], xr[1], 5)) {
      svg.append(s("line", { x1: x(v), x2: x(v), y1: hgt - m.b, y2: hgt - m.b + 4, class: "axis" }));
      svg.append(s("text", { x: x(v), y: hgt - m.b + 15, class: "tick", "text-anchor": "middle" },
        opts.xfmt ? opts.xfmt(v) : fmt(v)));
    }
    for (const v of opts.yticks || ticks(yr[0], yr[1], 4)) {
      svg.append(s("line", { x1: m.l, x2: w - m.r, y1: y(v), y2: y(v), class: "grid" }));
      svg.append(s("text", { x: m.l - 5, y: y(v) + 4, class: "tick", "text-anchor": "end" },
        opts.yfmt ? opts.yfmt(v) : fmt(v)));
    }
    svg.append(s("line", { x1: m.l, x2: w - m.r, y1: hgt - m.b, y2: hgt - m.b, class: "axis" }));
    svg.append(s("line", { x1: m.l, x2: m.l, y1: m.t, y2: hgt - m.b, class: "axis" }));
    svg.append(s("text", { x: (m.l + w - m.r) / 2, y: hgt - 4, class: "label", "text-anchor": "middle" }, xlabel));
    svg.append(s("text", { x: 12, y: (m.t + hgt - m.b) / 2, class: "label", "text-anchor": "middle",
      transform: `rotate(-90 12 ${(m.t + hgt - m.b) / 2})` }, ylabel));
    svg.append(g);
    return { svg, x, y, g };
  }

  function legend(items) {
    return h("div", { class: "legend" }, items.map(([color, label]) =>
      h("span", {}, h("i", { style: `background:${color}` }), label)));
  }

  // ------------------------------------------------------------ overview

  function header() {
    const o = st.ov, m = o.manifest, a = o.sae;
    document.title = `${o.title} · feature browser`;
    document.getElementById("title").textContent = o.title;
    const bits = [
      `${o.seeds.length} seed${o.seeds.length > 1 ? "s" : ""} × ${a.d_sae} latents`,
      `${a.activation}${a.activation.includes("topk") ? " k=" + a.k : ""}, d_in ${a.d_in}`,
      `${m.model || "?"} layer ${m.layer ?? "?"} ${m.hook || ""}`,
      `held-out ${m.corpus || ""}${m.split ? "/" + m.split : ""}: ${o.rows.toLocaleString()} rows from ${o.contexts} contexts`,
    ];
    document.getElementById("subtitle").textContent = bits.join(" · ");
  }

  function metricsCard() {
    const o = st.ov, mt = o.metrics, stab = o.stability;
    const cols = [...mt.columns];
    if (stab) cols.push(`mean p (τ=${stab.tau})`);
    const rows = o.seeds.map((sd, i) => {
      const vals = [...mt.rows[i]];
      if (stab) {
        const p = o.per_seed[i].p[String(stab.tau)], f = o.per_seed[i].freq;
        let n = 0, tot = 0;
        p.forEach((v, j) => { if (f[j] > 0) { n++; tot += v; } });
        vals.push(n ? tot / n : null);
      }
      return h("tr", { class: i === o.table_seed ? "current" : "" }, h("td", {}, String(sd)),
        vals.map((v, j) => h("td", { class: "num" }, cols[j] === "dead" ? pct(v) : fmt(v, 3))));
    });
    return h("div", { class: "card" }, h("h3", {}, "Per seed"),
      h("table", { class: "metrics" }, h("thead", {}, h("tr", {}, h("th", {}, "seed"), cols.map((c) => h("th", {}, c)))),
        h("tbody", {}, rows)),
      h("p", { class: "caption" },
        `held-out EV, L0 and dead (never fires) on the ${o.rows.toLocaleString()} scanned rows` +
        (mt.summary ? `; the other columns from ${mt.summary}` : "; no summary.json with EV/CE found in the run")));
  }

  function stabilityHistCard() {
    const o = st.ov, stab = o.stability, S1 = nOthers();
    const colors = ["#9ecae1", "#4292c6", "#08519c", "#6a51a3", "#238b45"];
    const maxc = Math.max(1, ...stab.taus.map((t) => Math.max(...stab.hist[String(t)])));
    const c = frame(360, 210, [-0.5, S1 + 0.5], [0, maxc * 1.05], "p = fraction of the other seeds with a match",
      "alive latents", { xticks: [...Array(S1 + 1).keys()], xfmt: (v) => `${v}/${S1}` });
    const bw = 0.8 / stab.taus.length;
    stab.taus.forEach((t, k) => {
      stab.hist[String(t)].forEach((n, j) => {
        const x0 = c.x(j - 0.4 + k * bw), x1 = c.x(j - 0.4 + (k + 1) * bw);
        c.g.append(s("rect", { x: x0, y: c.y(n), width: Math.max(1, x1 - x0 - 1), height: c.y(0) - c.y(n),
          fill: colors[k % colors.length] }, s("title", {}, `τ=${t}: ${n} latents with p=${j}/${S1}`)));
      });
    });
    return h("div", { class: "card" }, h("h3", {}, "Stability histogram"), c.svg,
      legend(stab.taus.map((t, k) => [colors[k % colors.length], `τ=${t} (mean p ${fmt(stab.mean_p[String(t)])})`])),
      h("p", { class: "caption" },
        `p of a latent = fraction of the other ${S1} seeds holding a latent with decoder |cos| ≥ τ` +
        (stab.use_encoder ? " (and encoder |cos| ≥ τ)" : "") + `; all ${stab.alive.toLocaleString()} latents of all ` +
        "seeds that fire on the scanned rows."));
  }

  function scatterCard() {
    const o = st.ov, stab = o.stability, tau = String(st.tau);
    let lo = 0, n = 0;
    const pts = [];
    o.per_seed.forEach((ps) => ps.freq.forEach((f, j) => {
      if (f > 0) { pts.push([Math.log10(f), ps.cos[j], ps.p[tau][j]]); lo = Math.min(lo, Math.log10(f)); n++; }
    }));
    lo = Math.floor(lo);
    const c = frame(400, 250, [lo, 0], [0, 1], "log10 firing frequency", "mean best |cos| to other seeds",
      { xticks: ticks(lo, 0, 5).filter((v) => Number.isInteger(v)) });
    for (const [x, y, p] of pts) {
      c.g.append(s("circle", { cx: c.x(x), cy: c.y(y), r: 1.8, fill: pColor(p), "fill-opacity": 0.65 }));
    }
    c.g.append(s("line", { x1: c.x(lo), x2: c.x(0), y1: c.y(st.tau), y2: c.y(st.tau), class: "tau" }));
    return h("div", { class: "card" }, h("h3", {}, "Stability vs firing frequency"), c.svg,
      legend([[pColor(0), "p = 0"], [pColor(0.5), "p = ½"], [pColor(1), `p = 1 (τ=${st.tau}, dashed)`]]),
      h("p", { class: "caption" }, `${n.toLocaleString()} alive latents of all seeds; y: mean over the other seeds of ` +
        "the best |cos| found there; colour: p at τ."));
  }

  function byFreqCard() {
    const stab = st.ov.stability, bf = stab.by_freq;
    if (!bf.edges) return null;
    const colors = ["#9ecae1", "#4292c6", "#08519c", "#6a51a3", "#238b45"];
    const mids = bf.edges.slice(0, -1).map((e, i) => (e + bf.edges[i + 1]) / 2);
    const c = frame(340, 250, [bf.edges[0], bf.edges[bf.edges.length - 1]], [0, 1], "log10 firing frequency (bin centre)",
      "mean p");
    stab.taus.forEach((t, k) => {
      const ys = bf.mean_p[String(t)];
      const d = mids.map((m, i) => ys[i] === null ? "" : `${c.x(m)},${c.y(ys[i])}`).filter(Boolean);
      c.g.append(s("polyline", { points: d.join(" "), fill: "none", stroke: colors[k % colors.length], "stroke-width": 2 }));
      mids.forEach((m, i) => { if (ys[i] !== null) c.g.append(s("circle", { cx: c.x(m), cy: c.y(ys[i]), r: 3,
        fill: colors[k % colors.length] }, s("title", {}, `τ=${t}: mean p ${fmt(ys[i])} over ${bf.count[i]} latents`))); });
    });
    return h("div", { class: "card" }, h("h3", {}, "Mean stability per frequency bin"), c.svg,
      legend(stab.taus.map((t, k) => [colors[k % colors.length], `τ=${t}`])),
      h("p", { class: "caption" }, `${bf.count.length} quantile bins of the alive latents' log10 frequency.`));
  }

  // ------------------------------------------------------------ latent table

  function tableRows() {
    const o = st.ov, t = o.table_seed, ps = o.per_seed[t];
    return ps.freq.map((f, i) => ({
      latent: i, freq: f, mean: ps.mean[i], max: o.table.max[i], cos: ps.cos ? ps.cos[i] : null,
      p: o.stability ? ps.p[String(st.tau)][i] : null, top: o.table.top[i],
    }));
  }

  function readFilters() {
    const v = (id) => { const e = document.getElementById(id); return e ? e.value.trim() : ""; };
    const num = (id) => (v(id) === "" ? null : Number(v(id)));
    return { pmin: num("f-pmin"), pmax: num("f-pmax"), lfmin: num("f-lfmin"), lfmax: num("f-lfmax"),
      meanmin: num("f-meanmin"), text: v("f-text").toLowerCase(), dead: Boolean(document.getElementById("f-dead")?.checked) };
  }

  function keep(r, f) {
    if (f.dead && r.freq === 0) return false;
    if (r.p !== null && f.pmin !== null && r.p < f.pmin - 1e-9) return false;
    if (r.p !== null && f.pmax !== null && r.p > f.pmax + 1e-9) return false;
    const lf = r.freq > 0 ? Math.log10(r.freq) : -Infinity;
    if (f.lfmin !== null && lf < f.lfmin) return false;
    if (f.lfmax !== null && lf > f.lfmax) return false;
    if (f.meanmin !== null && r.mean < f.meanmin) return false;
    if (f.text && !r.top.some((id) => tokText(id).toLowerCase().includes(f.text))) return false;
    return true;
  }

  function renderRows() {
    const f = readFilters(), key = st.sort.key, dir = st.sort.dir;
    const rows = tableRows().filter((r) => keep(r, f));
    rows.sort((a, b) => ((a[key] ?? -1) - (b[key] ?? -1)) * dir || a.latent - b.latent);
    const tbody = document.querySelector("#latent-table tbody");
    tbody.replaceChildren(...rows.slice(0, st.limit).map((r) => {
      const href = `#latent=${r.latent}`;
      return h("tr", { "data-latent": r.latent, onclick: (e) => { if (e.target.tagName !== "A") location.hash = href; } },
        h("td", { class: "num" }, h("a", { href }, String(r.latent))),
        st.ov.stability ? h("td", { class: "num" }, h("span", { class: "pdot", style: `background:${pColor(r.p)}` }), pText(r.p)) : null,
        st.ov.stability ? h("td", { class: "num" }, fmt(r.cos)) : null,
        h("td", { class: "num" }, pct(r.freq)), h("td", { class: "num" }, fmt(r.mean)), h("td", { class: "num" }, fmt(r.max)),
        h("td", { class: "toks" }, r.top.map((id) => h("span", { class: "chip" }, tokText(id)))));
    }));
    document.getElementById("count").textContent =
      `${Math.min(rows.length, st.limit)} shown of ${rows.length} matching (${tableRows().length} latents)`;
    document.getElementById("more").hidden = rows.length <= st.limit;
    document.querySelectorAll("#latent-table th[data-key]").forEach((th) => {
      th.classList.toggle("sorted", th.dataset.key === key);
      th.dataset.dir = th.dataset.key === key ? (dir > 0 ? "▲" : "▼") : "";
    });
  }

  function tableSection() {
    const o = st.ov, stab = o.stability;
    const cols = [["latent", "latent", "latent index"]];
    if (stab) {
      cols.push(["p", "p", "stability: fraction of the other seeds holding a match with |cos| ≥ τ"]);
      cols.push(["cos", "best |cos|", "mean over the other seeds of the best decoder |cos| there"]);
    }
    cols.push(["freq", "frequency", "fraction of the scanned held-out rows on which it fires"],
      ["mean", "mean act", "mean activation when firing"], ["max", "max act", "largest activation on the scanned rows"],
      [null, "fires hardest on", "the max-activating token of its top 3 contexts"]);
    const heads = cols.map(([key, label, tip]) => key
      ? h("th", { "data-key": key, title: tip, onclick: () => {
          st.sort = { key, dir: st.sort.key === key ? -st.sort.dir : (key === "latent" ? 1 : -1) }; renderRows(); } }, label)
      : h("th", { title: tip }, label));
    const inp = (id, ph, w) => h("input", { id, type: "number", step: "any", placeholder: ph, style: `width:${w}em`,
      oninput: renderRows, onchange: renderRows });
    const tauSel = stab ? h("select", { id: "f-tau", onchange: (e) => { st.tau = Number(e.target.value); renderHome(); } },
      stab.taus.map((t) => h("option", { value: t, selected: t === st.tau ? "selected" : null }, `τ = ${t}`))) : null;
    const controls = h("div", { class: "controls" },
      stab ? h("label", {}, "p at ", tauSel) : null,
      stab ? h("label", {}, "p from ", inp("f-pmin", "0", 4), " to ", inp("f-pmax", "1", 4)) : null,
      h("label", {}, "log10 freq from ", inp("f-lfmin", "-5", 4), " to ", inp("f-lfmax", "0", 4)),
      h("label", {}, "mean act ≥ ", inp("f-meanmin", "0", 4)),
      h("label", {}, "token ", h("input", { id: "f-text", type: "search", placeholder: "e.g. the", oninput: renderRows, onchange: renderRows })),
      h("label", {}, h("input", { id: "f-dead", type: "checkbox", onchange: renderRows }), " hide never-firing"),
      h("span", { id: "count" }));
    return h("section", { id: "latents" },
      h("h2", {}, `Latents of ${seedName(o.table_seed)}`,
        h("span", { class: "hint" }, " — click a row for its contexts and its matches in the other seeds; click a header to sort")),
      controls,
      h("table", { id: "latent-table", class: "latents" }, h("thead", {}, h("tr", {}, heads)), h("tbody", {})),
      h("button", { id: "more", onclick: () => { st.limit += 500; renderRows(); } }, "show 500 more"));
  }

  function renderHome() {
    const o = st.ov, app = document.getElementById("app");
    const saved = document.getElementById("f-text") ? readFilters() : st.filters;
    const notes = o.notes.map((n) => h("p", { class: "note" }, n));
    const cards = [metricsCard()];
    if (o.stability) cards.push(stabilityHistCard(), scatterCard(), byFreqCard());
    app.replaceChildren(h("section", { id: "overview" }, notes, h("div", { class: "cards" }, cards)), tableSection());
    if (saved) {
      const set = (id, v) => { const e = document.getElementById(id); if (e && v !== null && v !== undefined) e.value = v; };
      set("f-pmin", saved.pmin); set("f-pmax", saved.pmax); set("f-lfmin", saved.lfmin); set("f-lfmax", saved.lfmax);
      set("f-meanmin", saved.meanmin); set("f-text", saved.text); document.getElementById("f-dead").checked = saved.dead;
    }
    renderRows();
    if (st.scrollY) window.scrollTo(0, st.scrollY);
  }

  // ------------------------------------------------------------ latent page

  function contextEl(ex, max, vmax) {
    const start = ex.p - ex.m;
    const toks = ex.t.map((id, i) => {
      const v = ex.v[i];
      const cls = "tok" + (i === ex.m ? " max" : "") + (v === null ? " off" : "");
      const a = v === null || !(vmax > 0) ? 0 : Math.max(0, Math.min(1, v / vmax));
      const tip = `${JSON.stringify(st.vocab[id] ?? String(id))} (id ${id}) · position ${start + i} · ` +
        (v === null ? "no cache row (skipped position or excluded token)" : `act ${fmt(v)}`);
      return h("span", { class: cls, title: tip, style: a > 0 ? `background:rgba(255,110,20,${(0.08 + 0.82 * a).toFixed(3)})` : null },
        tokText(id));
    });
    return h("div", { class: "context", "data-context": ex.c, "data-position": ex.p, "data-act": ex.a },
      h("span", { class: "meta" }, h("span", { class: "act", title: "activation at the max (boxed) token" }, fmt(ex.a)),
        h("span", { class: "where", title: "held-out context index : position of the max token" }, `${ex.c}:${ex.p}`)),
      h("span", { class: "text" }, toks));
  }

  function histogram(rec, w, hgt) {
    const counts = rec.h, B = counts.length, mx = Math.max(1, ...counts);
    const ly = (n) => Math.log10(1 + n);
    const c = frame(w, hgt, [0, rec.x || 1], [0, ly(mx)], "activation", "count (log)",
      { yticks: ticks(0, Math.log10(mx), 3).filter(Number.isInteger).map((e) => ly(Math.pow(10, e))),
        yfmt: (v) => fmt(Math.round(Math.pow(10, v) - 1)) });
    counts.forEach((n, b) => {
      if (!n) return;
      const x0 = c.x(b / B * rec.x), x1 = c.x((b + 1) / B * rec.x);
      c.g.append(s("rect", { x: x0, y: c.y(ly(n)), width: Math.max(1, x1 - x0 - 0.5), height: c.y(0) - c.y(ly(n)),
        fill: "#f07020" }, s("title", {}, `${fmt(b / B * rec.x)}–${fmt((b + 1) / B * rec.x)}: ${n} rows`)));
    });
    return c.svg;
  }

  function statsLine(si, i) {
    const o = st.ov, ps = o.per_seed[si], stab = o.stability;
    const bits = [`fires on ${pct(ps.freq[i])} of rows`, `mean act ${fmt(ps.mean[i])}`];
    if (stab) {
      bits.push(`mean best |cos| ${fmt(ps.cos[i])}`);
      bits.push(stab.taus.map((t) => `p(τ=${t}) ${pText(ps.p[String(t)][i])}`).join(", "));
    }
    return bits.join(" · ");
  }

  function renderLatent(i) {
    const o = st.ov, t = o.table_seed, M = o.sae.d_sae, app = document.getElementById("app");
    const nav = h("div", { class: "nav" }, h("a", { href: "#" }, "← all latents"),
      i > 0 ? h("a", { href: `#latent=${i - 1}` }, `‹ ${i - 1}`) : null,
      i < M - 1 ? h("a", { href: `#latent=${i + 1}` }, `${i + 1} ›`) : null,
      h("form", { onsubmit: (e) => { e.preventDefault(); const v = e.target.elements.go.value; if (v !== "") location.hash = `#latent=${v}`; } },
        "go to ", h("input", { name: "go", type: "number", min: 0, max: M - 1, style: "width:6em" })));
    const page = h("section", { id: "latent-page", "data-latent": i },
      nav, h("h2", {}, `Latent ${i}`, h("span", { class: "hint" }, ` of ${seedName(t)}`)),
      h("p", { class: "stats" }, statsLine(t, i)), h("div", { id: "latent-body" }, h("p", {}, "loading…")));
    app.replaceChildren(page);
    window.scrollTo(0, 0);
    const parts = o.stability ? o.seeds.map((_, s2) => s2).filter((s2) => s2 !== t) : [];
    const pidx = (s2) => o.table.partners.idx[s2][i];
    Promise.all([loadLatent(t, i), ...parts.map((s2) => loadLatent(s2, pidx(s2)))]).then(([rec, ...precs]) => {
      const body = document.getElementById("latent-body");
      if (!body || Number(page.dataset.latent) !== i) return;
      const top = h("div", { class: "card wide" }, h("h3", {}, `Top ${rec.e.length} activating contexts (held-out)`),
        rec.e.length ? rec.e.map((ex) => contextEl(ex, rec.x, rec.x))
          : h("p", { class: "caption" }, "never fires on the scanned rows"),
        h("p", { class: "caption" }, "Each token is shaded by this latent's activation (hover for the value); the boxed token " +
          "is the max; grey strikethrough: positions the cache holds no row for (first positions, <|endoftext|>)."));
      const side = h("div", { class: "card" }, h("h3", {}, "Activation histogram"), histogram(rec, 330, 170),
        h("p", { class: "caption" }, `positive activations on the scanned rows (max ${fmt(rec.x)})`));
      const rows = [top, side];
      let matches = null;
      if (parts.length) {
        const cols = [matchColumn(t, i, rec, null)].concat(parts.map((s2, k) => matchColumn(s2, pidx(s2), precs[k],
          o.table.partners.cos[s2][i])));
        matches = h("section", { id: "matches" },
          h("h3", {}, "Best match in every other seed",
            h("span", { class: "hint" }, " — the latent of each seed whose decoder direction is closest (|cos|), with its own top contexts")),
          h("div", { class: "match-grid" }, cols));
      }
      body.replaceChildren(h("div", { class: "row" }, rows), matches);
    }).catch((err) => {
      const body = document.getElementById("latent-body");
      if (body) body.replaceChildren(h("p", { class: "note" }, String(err)));
      console.warn(err);
    });
  }

  function matchColumn(si, j, rec, cos) {
    const o = st.ov, stab = o.stability, ps = o.per_seed[si];
    const good = cos === null || cos >= st.tau;
    const head = cos === null
      ? h("div", { class: "match-head self" }, h("b", {}, `${seedName(si)} · latent ${j}`), h("div", {}, "this latent"))
      : h("div", { class: "match-head " + (good ? "good" : "bad") },
          h("b", {}, `${seedName(si)} · latent ${j}`),
          h("div", {}, `|cos| ${fmt(cos)} `, h("span", { class: "verdict" }, good ? `≥ τ=${st.tau}` : `< τ=${st.tau}`)));
    const facts = h("div", { class: "facts" }, `fires ${pct(ps.freq[j])} · mean ${fmt(ps.mean[j])}` +
      (stab ? ` · p ${pText(ps.p[String(st.tau)][j])}` : ""));
    const n = o.match_k;
    return h("div", { class: "match", "data-seed": o.seeds[si], "data-latent": j }, head, facts,
      histogram(rec, 260, 110),
      rec.e.slice(0, n).map((ex) => contextEl(ex, rec.x, rec.x)),
      rec.e.length ? null : h("p", { class: "caption" }, "never fires on the scanned rows"));
  }

  // ------------------------------------------------------------ routing

  function route() {
    const m = /^#latent=(\d+)$/.exec(location.hash);
    if (m && Number(m[1]) < st.ov.sae.d_sae) {
      if (document.getElementById("latent-table")) { st.scrollY = window.scrollY; st.filters = readFilters(); }
      renderLatent(Number(m[1]));
    } else {
      renderHome();
    }
  }

  function start() {
    if (!st.ov) {
      document.getElementById("app").replaceChildren(h("p", { class: "note" }, "data/overview.js did not load"));
      return;
    }
    st.tau = st.ov.stability ? st.ov.stability.tau : null;
    header();
    window.addEventListener("hashchange", route);
    route();
  }

  return { setOverview, setVocab, addBlock, start, loadLatent, state: st };
})();

window.addEventListener("DOMContentLoaded", BROWSE.start);
