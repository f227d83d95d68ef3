"""`jaxsae browse RUN_DIR cache=HELDOUT_CACHE [out=DIR ...]`: a static feature browser of a seed ensemble.

The site opens from the file system (file://): `index.html`, the hand-written `browse.js`/`browse.css` of
`jaxsae/browse_assets/`, and data as small JavaScript files (Chromium refuses fetch() of JSON on file://, but
loads <script src>), nothing from the network. It shows
  - an overview: per-seed EV, L0 and dead fraction on the scanned held-out rows (and whatever per-seed EV/CE the
    run's `summary.json` holds), the histogram of stability p at each τ, p against log10 firing frequency;
  - a table of one seed's latents (p, mean best |cos| to the other seeds, frequency, mean and max activation,
    the tokens it fires hardest on), sortable and filterable;
  - a page per latent: its top-activating held-out contexts with every token shaded by the latent's activation,
    its activation histogram, and its best match in every other seed with that latent's own top contexts beside it.

Per-latent data lives in one file per block of latents and seed (`data/s{seed}_b{block}.js`), which the page loads
when a latent is opened; numbers are rounded to 3 significant digits. The analysis is the library's:
`stability.best_matches`/`stability`, `analysis.best_partners`, `analysis.ablated_ev` (EV, frequency, mean),
`analysis.latent_acts`, `analysis.activation_summary`, `analysis.top_contexts` over `analysis.cache_row_positions`
(row -> (context, position) from the cache's own kept-position mask).

Bad input (no SAE folders, a cache of another model / layer / width than the SAEs, an `out` folder that is not a
site this command wrote) raises before anything is written. One seed: stability is undefined; the site shows the
features without it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from jaxsae import adapter, analysis, configlib, io, sae, stability
from jaxsae.data import CacheSource
from jaxsae.harvest import CONTEXTS

ASSETS = Path(__file__).with_name("browse_assets")
MARKER = ".jaxsae-browse"  # in every site this writes: only such a folder is replaced
SEED_DIR = re.compile(r"seed_(\d+)")
USAGE = "usage: jaxsae browse RUN_DIR cache=HELDOUT_CACHE [out=DIR] [key=value ...]\n"


@dataclasses.dataclass(frozen=True)
class BrowseConfig:
    run_dir: str = ""  # run folder holding one SAE folder per seed (seed_0/, seed_1/, ...); also the first bare argument
    cache: str = ""  # held-out activation cache (with its contexts.npy) the contexts and statistics come from
    out: str = ""  # site folder (open its index.html); empty: RUN_DIR/browser
    seed: int = 0  # the seed (folder number) whose latents the table lists and whose pages show matches
    num_tokens: int = 30_000  # held-out rows scanned: the cache's first ones, from contexts it holds whole
    top_k: int = 10  # top-activating contexts per latent of the table's seed (none within `window` of a stronger one)
    match_k: int = 5  # top contexts shown for each best match in another seed
    window: int = 10  # tokens shown on either side of the max-activating one
    tau: float = 0.7  # |cos| a best match needs to count (the table's default p column, the scatter's colours)
    taus: tuple[float, ...] = (0.5, 0.7, 0.9)  # thresholds of the stability histogram and table columns
    use_encoder: bool = False  # a match also needs the encoder directions' |cos| (score = min of the two)
    hist_bins: int = 24  # bins of each latent's activation histogram
    freq_bins: int = 10  # quantile bins of log10 frequency for the mean-stability curve
    block: int = 128  # latents per data file (a page loads the files of the latents it shows)
    summary: str = ""  # JSON with per-seed EV/CE (train's or the pipeline's summary.json); empty: RUN_DIR/summary.json
    memory_mb: int = 256  # bound on one block of dense activations (rows x latents) held while scanning


# ---------------------------------------------------------------- input


def seed_folders(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """[(seed, folder)] of the SAE folders `seed_{s}/` (with cfg.json) in a run folder, by seed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    found = sorted((int(m.group(1)), p) for p in run_dir.iterdir()
                   if (m := SEED_DIR.fullmatch(p.name)) and (p / io.CFG).is_file())
    if not found:
        raise FileNotFoundError(f"no SAE folders (seed_0/, seed_1/, ... with {io.CFG}) in {run_dir}")
    return found


def sae_source(cfg_json: dict) -> dict:
    """{"model", "layer"} as far as an SAE's cfg.json records them: SAELens's `model_name` and `hook_name`
    (top level or under `metadata`), or `model` / `layer` in the jaxsae section (save_saelens(extra=...))."""
    found = {}  # later places win: SAELens 6's metadata block over the older top-level keys
    places = ((cfg_json.get("jaxsae") or {}, True), (cfg_json, False), (cfg_json.get("metadata") or {}, False))
    for where, ours in places:
        name = where.get("model_name") or (where.get("model") if ours else None)
        if isinstance(name, str) and name:
            found["model"] = name
        hook = where.get("hook_name")
        if isinstance(hook, str) and (m := re.search(r"(?:blocks|layers|layer|h)\.(\d+)", hook)):
            found["layer"] = int(m.group(1))
        if ours and isinstance(where.get("layer"), int):
            found["layer"] = where["layer"]
    return found


def _same_model(a: str, b: str) -> bool:
    """Loose name equality across naming schemes ("HuggingFaceTB/SmolLM2-135M" ~ "smollm2-135m")."""
    a, b = (re.sub(r"[^a-z0-9]", "", s.lower().rsplit("/", 1)[-1]) for s in (a, b))
    return bool(a) and bool(b) and (a in b or b in a)


def check_cache(manifest: dict, cache: str | os.PathLike, sae_cfg: sae.SAEConfig, sources: dict[int, dict]) -> None:
    """The cache must hold what the SAEs read: same width, and the same model and layer where the SAEs say."""
    if int(manifest["d_in"]) != sae_cfg.d_in:
        raise ValueError(f"cache {cache} holds d_in={manifest['d_in']} activations, the SAEs read d_in={sae_cfg.d_in}")
    for s, src in sources.items():
        if "layer" in src and "layer" in manifest and int(manifest["layer"]) != src["layer"]:
            raise ValueError(f"cache {cache} is from layer {manifest['layer']}, the SAE of seed {s} reads layer "
                             f"{src['layer']}")
        if "model" in src and "model" in manifest and not _same_model(str(manifest["model"]), src["model"]):
            raise ValueError(f"cache {cache} is from model {manifest['model']!r}, the SAE of seed {s} reads model "
                             f"{src['model']!r}")


def _check_config(cfg: BrowseConfig) -> None:
    if not cfg.run_dir:
        raise ValueError("jaxsae browse needs a run folder: jaxsae browse RUN_DIR cache=HELDOUT_CACHE")
    if not cfg.cache:
        raise ValueError(f"jaxsae browse needs cache=HELDOUT_CACHE (an activation cache of the SAEs' model and layer), "
                         f"got cache={cfg.cache!r}")
    for name in ("num_tokens", "top_k", "match_k", "hist_bins", "freq_bins", "block", "memory_mb"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.window < 0:
        raise ValueError(f"window must be >= 0, got {cfg.window}")
    if not cfg.taus or not all(0 < t <= 1 for t in (cfg.tau, *cfg.taus)):
        raise ValueError(f"tau and taus must lie in (0, 1], got tau={cfg.tau}, taus={cfg.taus}")


def _out_dir(cfg: BrowseConfig) -> Path:
    out = Path(cfg.out) if cfg.out else Path(cfg.run_dir) / "browser"
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise ValueError(f"out={out} exists and is not a site jaxsae browse wrote; choose another out=")
    return out


def summary_metrics(summary: dict, n_seeds: int) -> tuple[list[str], list[list[float | None]]]:
    """(column labels, per-seed rows) of the per-seed numbers a run summary holds: `jaxsae train`'s lists
    {"ev": [S], ...} or the pipeline's {"per_seed": [{"corpus", "seed", "ev", "ce_delta", ...}]}."""
    keys = {"ev": "EV", "l0": "L0", "dead_frac": "dead", "ce_delta": "CE Δ", "loss_recovered": "loss rec."}
    columns, rows = [], [[] for _ in range(n_seeds)]
    per_seed = summary.get("per_seed")
    if isinstance(per_seed, list):
        corpora = list(dict.fromkeys(r.get("corpus", "") for r in per_seed if isinstance(r, dict)))
        for corpus in corpora:
            mine = {r.get("seed"): r for r in per_seed if isinstance(r, dict) and r.get("corpus", "") == corpus}
            for key, label in keys.items():
                if any(isinstance(r.get(key), (int, float)) for r in mine.values()):
                    columns.append(f"{corpus} {label}".strip())
                    for s in range(n_seeds):
                        v = mine.get(s, {}).get(key)
                        rows[s].append(float(v) if isinstance(v, (int, float)) else None)
        return columns, rows
    for key, label in keys.items():
        v = summary.get(key)
        if isinstance(v, list) and len(v) == n_seeds and all(isinstance(a, (int, float)) for a in v):
            columns.append(f"summary {label}")
            for s in range(n_seeds):
                rows[s].append(float(v[s]))
    return columns, rows


# ---------------------------------------------------------------- rounding and packing


def _r(x: float, digits: int = 3) -> float | int:
    """x to `digits` significant digits (0 stays an int, to keep the files small)."""
    x = float(x)
    if x == 0 or not math.isfinite(x):
        return 0
    return float(f"{x:.{digits}g}")


def _rl(xs, digits: int = 3) -> list:
    return [_r(x, digits) for x in np.asarray(xs).tolist()]


def _example(ex: dict) -> dict:
    """One `analysis.top_contexts` example, packed: context, position, index of the max token, its activation,
    token ids and per-token activations (null where the cache holds no row)."""
    return {"c": ex["context"], "p": ex["position"], "m": ex["max_pos"], "a": _r(ex["act"]), "t": ex["tokens"],
            "v": [None if a is None else _r(a) for a in ex["acts"]]}


def _write_js(path: Path, call: str, *args) -> int:
    """Write `call(args...);` with JSON arguments; returns the bytes written."""
    text = f"{call}({','.join(json.dumps(a, separators=(',', ':'), allow_nan=False) for a in args)});\n"
    path.write_text(text, encoding="utf-8")
    return len(text.encode())


# ---------------------------------------------------------------- build


def _token_strings(model_name: str, ids: list[int]) -> dict[int, str] | None:
    """{id: text} through the cache's model adapter, or None when it has no token_strings (ids are shown)."""
    try:
        model = adapter.load(model_name)
    except (ValueError, ImportError, OSError) as e:
        print(f"[browse] token text unavailable ({e}); showing token ids", flush=True)
        return None
    if model.token_strings is None:
        print(f"[browse] model {model_name!r} has no token_strings; showing token ids", flush=True)
        return None
    return dict(zip(ids, model.token_strings(ids)))


def _scan_latents(params: dict, sae_cfg: sae.SAEConfig, x_NxD: np.ndarray, latents: np.ndarray, k: int,
                  cfg: BrowseConfig, tokens_CxT, ctx_R, pos_R) -> dict[int, dict]:
    """{latent: {"h": histogram, "x": max activation, "e": top contexts}} for the chosen latents of one seed."""
    per_block = max(1, (cfg.memory_mb << 20) // (len(x_NxD) * 16))  # float32 acts + float64 copies in the summary
    out = {}
    for i in range(0, len(latents), per_block):
        lat_E = latents[i:i + per_block]
        acts_NxE = analysis.latent_acts(params, sae_cfg, x_NxD, lat_E)
        summ = analysis.activation_summary(acts_NxE, cfg.hist_bins)
        tops = analysis.top_contexts(acts_NxE, tokens_CxT, ctx_R, pos_R, k=4 * k, window=cfg.window, latents=lat_E)
        for e, top in enumerate(tops):
            kk, examples = 4 * k, distinct_examples(top["examples"], k, cfg.window)
            while len(examples) < k and len(top["examples"]) == kk < len(x_NxD):  # long runs: look further down
                kk *= 4
                top = analysis.top_contexts(acts_NxE[:, e:e + 1], tokens_CxT, ctx_R, pos_R, k=kk, window=cfg.window,
                                            latents=lat_E[e:e + 1])[0]
                examples = distinct_examples(top["examples"], k, cfg.window)
            out[int(lat_E[e])] = {"h": summ.hist_ExB[e].tolist(), "x": _r(summ.max_E[e]),
                                  "e": [_example(ex) for ex in examples]}
    return out


def distinct_examples(examples: list[dict], k: int, window: int) -> list[dict]:
    """The first k of `top_contexts` examples (strongest first) whose max token lies outside the window of every
    stronger one kept: a neighbour of a shown example is already shaded inside it, so it would only repeat it."""
    kept = []
    for ex in examples:
        if all(ex["context"] != o["context"] or abs(ex["position"] - o["position"]) > window for o in kept):
            kept.append(ex)
            if len(kept) == k:
                break
    return kept


def build(cfg: BrowseConfig) -> Path:
    """Write the site; returns its folder. Every check runs before anything is written."""
    _check_config(cfg)
    folders = seed_folders(cfg.run_dir)
    seeds = [s for s, _ in folders]
    if cfg.seed not in seeds:
        raise ValueError(f"seed={cfg.seed} is not among the run's seeds {seeds}")
    loaded = [io.load_saelens(f) for _, f in folders]
    sae_cfg = loaded[0][1]
    for (s, f), (_, c, _) in zip(folders, loaded):
        if (c.d_in, c.d_sae, c.activation) != (sae_cfg.d_in, sae_cfg.d_sae, sae_cfg.activation):
            raise ValueError(f"{f} is a {c.activation} SAE {c.d_in}->{c.d_sae}, seed {seeds[0]}'s a "
                             f"{sae_cfg.activation} SAE {sae_cfg.d_in}->{sae_cfg.d_sae}: one run, one shape")
    sources = {s: sae_source(json.loads((f / io.CFG).read_text())) for s, f in folders}
    source = CacheSource(cfg.cache)
    manifest = source.manifest
    if not (Path(cfg.cache) / CONTEXTS).is_file():
        raise FileNotFoundError(f"cache {cfg.cache} has no {CONTEXTS}: the contexts need the tokens it was harvested from")
    check_cache(manifest, cfg.cache, sae_cfg, sources)
    out = _out_dir(cfg)
    summary_path = Path(cfg.summary) if cfg.summary else Path(cfg.run_dir) / "summary.json"
    if cfg.summary and not summary_path.is_file():
        raise FileNotFoundError(f"summary={cfg.summary} does not exist")
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None

    S, M, t = len(seeds), sae_cfg.d_sae, seeds.index(cfg.seed)
    notes = []
    if S == 1:
        notes.append(f"stability is undefined with one seed ({cfg.run_dir} holds only seed_{seeds[0]}/): "
                     "the site shows the features without stability or matches")
        print(f"[browse] {notes[-1]}", flush=True)

    tokens_CxT, ctx_R, pos_R = analysis.cache_row_positions(cfg.cache)
    N = min(cfg.num_tokens, len(ctx_R))
    if N < 1:
        raise ValueError(f"cache {cfg.cache} holds no whole context ({source.num_tokens} rows)")
    x_raw = analysis.cache_rows(source, N)
    params_S = {n: np.stack([p[n] for p, _, _ in loaded]) for n in loaded[0][0]}
    x_S = [x_raw if norm is None else np.asarray(norm(x_raw), np.float32) for _, _, norm in loaded]
    sq = float(np.mean(np.sum(x_S[t] ** 2, -1))) / sae_cfg.d_in
    if not 1 / 3 < sq < 3:
        notes.append(f"the held-out rows have mean squared norm {sq:.2f}·D after the SAEs' normaliser (about 1 for "
                     "the training data): is the cache of the SAEs' model and layer?")
        print(f"[browse] warning: {notes[-1]}", flush=True)

    # EV, firing frequency and mean activation of every latent of every seed (one pass per seed).
    ev_S, freq_SxM, mean_SxM = np.zeros(S), np.zeros((S, M)), np.zeros((S, M))
    for s in range(S):
        one = jax.tree.map(lambda a: a[s:s + 1], params_S)
        st = analysis.ablated_ev(one, sae_cfg, x_S[s], np.ones((1, 1, M), bool))
        ev_S[s], freq_SxM[s], mean_SxM[s] = st.ev_SxG[0, 0], st.freq_SxM[0], st.mean_act_SxM[0]

    stab, partners = None, None
    p_by_tau = {}
    if S >= 2:
        dec_SxMxD = params_S["W_dec"]
        enc_SxMxD = np.swapaxes(params_S["W_enc"], 1, 2) if cfg.use_encoder else None
        cos_SxSxM = stability.best_matches(dec_SxMxD, enc_SxMxD, search_dtype="float32")
        taus = sorted({*cfg.taus, cfg.tau})
        p_by_tau = {tau: stability.stability(cos_SxSxM, tau) for tau in taus}
        meancos_SxM = (cos_SxSxM.sum(1) - 1.0) / (S - 1)  # the diagonal (a seed against itself) is 1
        idx_SxM, pcos_SxM = analysis.best_partners(dec_SxMxD, t, enc_SxMxD)
        alive_SxM = freq_SxM > 0
        hist = {str(tau): np.bincount(np.rint(p[alive_SxM] * (S - 1)).astype(int), minlength=S).tolist()
                for tau, p in p_by_tau.items()}
        by_freq = {}
        if alive_SxM.any():
            for tau, p in p_by_tau.items():
                edges, mean_p, count = analysis.stability_by_frequency(p, freq_SxM, cfg.freq_bins)
                by_freq[str(tau)] = [None if np.isnan(v) else _r(v) for v in mean_p]
            by_freq = {"edges": _rl(edges), "count": count.tolist(), "mean_p": by_freq}
        stab = {"taus": taus, "tau": cfg.tau, "use_encoder": cfg.use_encoder, "hist": hist, "by_freq": by_freq,
                "mean_p": {str(tau): _r(p[alive_SxM].mean()) if alive_SxM.any() else None for tau, p in p_by_tau.items()},
                "alive": int(alive_SxM.sum())}
        partners = {"idx": idx_SxM.tolist(), "cos": [_rl(c) for c in pcos_SxM]}

    # Per-latent files: every latent of the table's seed; in the others, the best matches of those latents.
    shown = {t: np.arange(M)}
    if partners is not None:
        for s in range(S):
            if s != t:
                shown[s] = np.unique(idx_SxM[s])
    records = {}
    for s, latents in shown.items():
        print(f"[browse] seed {seeds[s]}: contexts of {len(latents)} latents over {N} rows", flush=True)
        one = jax.tree.map(lambda a: a[s], params_S)
        records[s] = _scan_latents(one, sae_cfg, x_S[s], latents, cfg.top_k if s == t else cfg.match_k, cfg,
                                   tokens_CxT, ctx_R, pos_R)

    ids = sorted({i for rec in records.values() for r in rec.values() for ex in r["e"] for i in ex["t"]})
    vocab = _token_strings(str(manifest.get("model", "")), ids) if ids else {}
    top_ids = [list(dict.fromkeys(ex["t"][ex["m"]] for ex in records[t][i]["e"][:3])) for i in range(M)]

    columns, rows = summary_metrics(summary, S) if summary else ([], [[] for _ in range(S)])
    l0_S = freq_SxM.sum(1)
    overview = {
        "title": f"{Path(cfg.run_dir).resolve().name} · seed {cfg.seed}",
        "run_dir": str(cfg.run_dir), "cache": str(cfg.cache), "rows": N, "contexts": int(ctx_R[N - 1]) + 1,
        "manifest": {k: manifest.get(k) for k in ("model", "layer", "hook", "corpus", "split", "ctx_len",
                                                   "skip_first", "exclude_tokens")},
        "sae": {"d_in": sae_cfg.d_in, "d_sae": M, "activation": sae_cfg.activation, "k": sae_cfg.k},
        "seeds": seeds, "table_seed": t, "block": cfg.block, "top_k": cfg.top_k, "match_k": cfg.match_k,
        "window": cfg.window, "notes": notes, "token_text": vocab is not None,
        "metrics": {"columns": ["held-out EV", "L0", "dead"] + columns,
                    "rows": [[_r(ev_S[s], 4), _r(l0_S[s]), _r(np.mean(freq_SxM[s] == 0))] + [
                        None if v is None else _r(v, 4) for v in rows[s]] for s in range(S)],
                    "summary": str(summary_path) if summary else None},
        "stability": stab,
        "per_seed": [{"freq": _rl(freq_SxM[s]), "mean": _rl(mean_SxM[s]),
                      "cos": _rl(meancos_SxM[s]) if stab else None,
                      "p": {str(tau): _rl(p[s]) for tau, p in p_by_tau.items()}} for s in range(S)],
        "table": {"max": [records[t][i]["x"] for i in range(M)], "top": top_ids, "partners": partners},
        "files": {},
    }

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    size = 0
    for s, rec in records.items():
        blocks = sorted({i // cfg.block for i in rec})
        overview["files"][str(s)] = blocks
        for b in blocks:
            part = {str(i): r for i, r in rec.items() if i // cfg.block == b}
            size += _write_js(tmp / "data" / f"s{s}_b{b}.js", "BROWSE.addBlock", s, b, part)
    size += _write_js(tmp / "data" / "vocab.js", "BROWSE.setVocab",
                      {str(i): v for i, v in vocab.items()} if vocab else {})
    size += _write_js(tmp / "data" / "overview.js", "BROWSE.setOverview", overview)
    for f in ("browse.js", "browse.css"):
        shutil.copyfile(ASSETS / f, tmp / f)
    html = (ASSETS / "index.html").read_text(encoding="utf-8")
    (tmp / "index.html").write_text(html.replace("{{TITLE}}", _html_escape(overview["title"])), encoding="utf-8")
    (tmp / MARKER).write_text("a feature browser written by jaxsae browse; the next run replaces this folder\n")
    if out.exists():  # a site this command wrote (checked above)
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    print(json.dumps({"browse": str(out / "index.html"), "seeds": seeds, "latents": M, "rows": N,
                      "data_mb": round(size / 2**20, 2)}), flush=True)
    return out


def _html_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def main(argv: Sequence[str] | None = None) -> int:
    """`jaxsae browse RUN_DIR cache=... [key=value ...]`: the first bare argument is the run folder."""
    argv = list(sys.argv[1:] if argv is None else argv)
    bare = [a for a in argv if "=" not in a and a not in ("-h", "--help", "help")]
    if len(bare) > 1:
        raise ValueError(f"expected one RUN_DIR, got {bare}")
    rest = [a for a in argv if a not in bare] + [f"run_dir={a}" for a in bare]
    cfg = configlib.parse(BrowseConfig(), rest, USAGE)
    if cfg is None:
        return 0
    build(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(configlib.run(main, prog="python -m jaxsae.browse"))
