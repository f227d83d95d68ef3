"""Paper C: one HierarchicalTopK SAE (K = k_max) against TopK SAEs trained separately at each k, and Matryoshka.

`python -m experiments.hierarchical_topk [key=value ...]` trains, on the same tokens in the same order and
at the same width, each as an `n_seeds` ensemble (vmapped, one init key per seed): one HierarchicalTopK SAE,
one TopK SAE per k in `ks`, and with `matryoshka=true` one Matryoshka BatchTopK SAE (`jaxsae.matryoshka`:
nested latent prefixes, k = k_max). It evaluates, per seed, the HTopK SAE and the k_max TopK SAE truncated to each j in `ks` (their
first j latents per token), each TopK SAE at its own k, and the Matryoshka SAE (frozen into JumpReLU form)
cut to each prefix width, with the HTopK SAE also at j = the L0 of each Matryoshka prefix (equal L0).
Metrics: EV, L0, dead fraction, CE delta from splicing into SmolLM2-135M (not at the equal-L0 points, and for
the truncated TopK only with `ce_truncated`), and
wall-clock training time; each with its mean and spread over the seeds. Writes `summary.json`, `report.md`
and `ev_vs_l0.png` to `results_dir`.

`synthetic=true` runs the same pipeline on synthetic sparse data (no model, no CE delta) as a quick check.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxsae import configlib, data, htopk, io, matryoshka, sae, train


@dataclasses.dataclass(frozen=True)
class HTopKExperimentConfig:
    corpus: str = "general"  # corpus of the activation caches {corpus}_{train,heldout} and of the CE contexts
    layer: int = 14  # SmolLM2 residual stream after this block
    model: str = "smollm2-135m"  # model harvested and spliced: smollm2-135m, or tiny (random weights: smoke tests)
    train_cache_tokens: int = 1_000_000  # the train cache must hold this many tokens (harvested first if fewer)
    train_cache: str = ""  # train on this cache folder instead (e.g. a frozen view of a cache still being extended)
    d_sae: int = 4608  # latents of every SAE
    k_max: int = 64  # K of the HierarchicalTopK SAE, and k of the Matryoshka BatchTopK SAE
    ks: tuple[int, ...] = (8, 16, 32, 64)  # sparsities: one TopK SAE trained at each; HTopK and TopK-k_max truncated to each
    n_seeds: int = 1  # ensemble size of every SAE (vmapped; same batches, one init key per seed)
    matryoshka: bool = False  # also train the Matryoshka BatchTopK SAE
    mat_widths: tuple[int, ...] = ()  # its cumulative prefix widths; empty = d_sae/8, d_sae/4, d_sae/2, d_sae
    batch_size: int = 2048  # tokens per training step
    num_steps: int = 400  # training steps of every SAE (the same batches in the same order for all)
    lr: float = 4e-4  # peak Adam learning rate
    warmup_steps: int = 50  # linear learning-rate warm-up steps
    dead_after_tokens: int = 256_000  # a latent silent for this many tokens is dead (AuxK trains it)
    aux_k: int = 128  # AuxK: dead latents that model the residual (each step gathers [B, aux_k, D]; 0 disables)
    tile: int = 256  # lean HTopK and Matryoshka losses: batch rows processed together
    convert_tokens: int = 16_384  # training tokens that set the Matryoshka SAE's JumpReLU threshold
    eval_tokens: int = 65_536  # held-out activations for EV, L0 and dead fraction
    ce_contexts: int = 16  # held-out contexts spliced into SmolLM2 for the CE delta (0 skips it)
    ce_truncated: bool = True  # also the CE delta of the truncated k_max TopK SAE (a side result)
    seed: int = 0  # init and data-order seed, shared by every SAE
    synthetic: bool = False  # quick check on synthetic sparse data: no model, no CE delta
    synthetic_d_in: int = 64  # synthetic data: width
    synthetic_tokens: int = 65_536  # synthetic data: training tokens
    out_dir: str = "runs/hierarchical_topk"  # training runs (checkpoints, SAELens folders, timings)
    results_dir: str = "results/hierarchical_topk"  # summary.json, report.md, ev_vs_l0.png
    only: str = ""  # train+evaluate only this run (htopk_k64, topk_k8, matryoshka_k64, ...) and stop
    cached_only: bool = False  # report only the runs and evaluations already on disk; list the missing ones

    def __post_init__(self):
        if self.k_max not in self.ks or any(not 1 <= k <= self.k_max for k in self.ks):
            raise ValueError(f"ks={self.ks} must lie in 1..k_max={self.k_max} and contain k_max")
        if self.k_max > self.d_sae:
            raise ValueError(f"k_max={self.k_max} exceeds d_sae={self.d_sae}")
        if self.n_seeds < 1:
            raise ValueError(f"n_seeds must be >= 1, got {self.n_seeds}")
        if self.matryoshka:
            matryoshka.prefix_widths(self.d_sae, matryoshka.MatryoshkaConfig(self.widths))  # raises on bad widths

    @property
    def widths(self) -> tuple[int, ...]:
        """The Matryoshka prefix widths (the default halvings keep only distinct positive ones)."""
        return self.mat_widths or tuple(sorted({max(1, self.d_sae // d) for d in (8, 4, 2, 1)}))


def _sources(cfg: HTopKExperimentConfig):
    """(train source, held-out source, held-out token contexts or None) as ArraySource/CacheSource."""
    if cfg.synthetic:
        make = lambda n, sample: data.synthetic_source(cfg.synthetic_d_in, n, 4 * cfg.synthetic_d_in, 8, cfg.seed, sample)  # noqa: E731
        return make(cfg.synthetic_tokens, 0), make(cfg.eval_tokens, 1), None
    from jaxsae import harvest

    train_dir = cfg.train_cache or harvest.ensure_cache(cfg.corpus, "train", cfg.train_cache_tokens, cfg.layer,
                                                        model=cfg.model)
    heldout_dir = harvest.ensure_cache(cfg.corpus, "heldout", cfg.eval_tokens, cfg.layer, model=cfg.model)
    tokens = harvest.cache_contexts(heldout_dir)[: cfg.ce_contexts] if cfg.ce_contexts else None
    return data.CacheSource(train_dir), data.CacheSource(heldout_dir), tokens


def _train(name: str, sae_cfg: sae.SAEConfig, loss_fn, source, cfg: HTopKExperimentConfig) -> tuple[list, dict]:
    """Train one ensemble (or load it if this run already finished); returns (params per seed, cost record)."""
    out = Path(cfg.out_dir) / name
    cost_file = out / "train_cost.json"
    seeds = [out / f"seed_{s}" for s in range(cfg.n_seeds)]
    if cost_file.is_file() and all((p / io.CFG).is_file() for p in seeds):
        return [io.load_saelens(p)[0] for p in seeds], json.loads(cost_file.read_text())
    train_cfg = train.TrainConfig(lr=cfg.lr, warmup_steps=cfg.warmup_steps, batch_size=cfg.batch_size,
                                  num_steps=cfg.num_steps, n_seeds=cfg.n_seeds, seed=cfg.seed,
                                  dead_after_tokens=cfg.dead_after_tokens, checkpoint_every=50,
                                  log_every=max(1, cfg.num_steps // 20), out_dir=str(out))
    # A run resumed from a checkpoint is only timed from there on; record where that was.
    resumed = max((int(p.name) for p in (out / "checkpoints").glob("[0-9]*")), default=0)
    t0, c0 = time.perf_counter(), time.process_time()
    state = train.fit(source, sae_cfg, train_cfg, loss_fn=loss_fn)
    dead_S = np.mean(np.asarray(state.tokens_since_fired) >= cfg.dead_after_tokens, axis=1)
    cost = {"train_s": round(time.perf_counter() - t0, 1), "train_cpu_s": round(time.process_time() - c0, 1),
            "steps": cfg.num_steps, "tokens": cfg.num_steps * cfg.batch_size, "n_seeds": cfg.n_seeds,
            "resumed_from_step": resumed, "train_dead_frac": float(dead_S.mean()),
            "train_dead_frac_per_seed": dead_S.tolist()}
    cost_file.write_text(json.dumps(cost))
    params = jax.device_get(state.params)
    return [jax.tree.map(lambda a: np.asarray(a[s]), params) for s in range(cfg.n_seeds)], cost


def _evaluator(cfg: HTopKExperimentConfig, heldout, tokens_NxT, normalizer):
    """`evaluate(name, seed, params, sae_cfg, tag, ce) -> {"ev", "l0", "dead_frac", [CE metrics]}` on held-out data.

    EV/L0/dead and CE results (and the clean/zero-ablated LM losses) are cached separately under out_dir,
    keyed by run, seed, `tag` (what was evaluated: k or prefix width) and settings, so reruns and parallel
    `only=` workers reuse them; with `cached_only` a missing CE result is left out instead of running the model.
    """
    from jaxsae import evaluate, harvest

    model = []  # the model (SmolLM2 unless cfg.model says otherwise), loaded on first use
    baseline_file = Path(cfg.out_dir) / f"ce_baseline_c{cfg.ce_contexts}.json"

    def cached(path: Path, compute):
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(compute()))
        return json.loads(path.read_text())

    def ce_of(params, sae_cfg):
        if not model:
            model.append(harvest.load_model(cfg.model))
        baseline = json.loads(baseline_file.read_text()) if baseline_file.is_file() else None
        recon = evaluate.sae_recon_fn(params, sae_cfg, normalizer)
        m = heldout.manifest
        r = evaluate.ce_metrics(model[0], tokens_NxT, m["layer"], recon, baseline=baseline, skip_first=m["skip_first"],
                                exclude_tokens=m["exclude_tokens"])
        if baseline is None:
            baseline_file.write_text(json.dumps({"clean_loss": r["clean_loss"], "zero_loss": r["zero_loss"]}))
        return r

    def run_eval(name, seed, params, sae_cfg, tag, ce=True):
        out = Path(cfg.out_dir) / name / f"eval_seed_{seed}"
        r = cached(out / f"ev_{tag}_t{cfg.eval_tokens}.json", lambda: evaluate.evaluate_sae(
            params, sae_cfg, normalizer, heldout, num_tokens=cfg.eval_tokens))
        ce_file = out / f"ce_{tag}_c{cfg.ce_contexts}.json"
        if ce and tokens_NxT is not None and (ce_file.is_file() or not cfg.cached_only):
            r.update(cached(ce_file, lambda: ce_of(params, sae_cfg)))
        return r

    return run_eval


METRICS = ("ev", "l0", "dead_frac", "ce_delta")


def _pool(per_seed: list[dict]) -> dict:
    """Seed mean of every metric (same keys as one seed's result), its sd/min/max, and the per-seed results."""
    out = {"per_seed": per_seed, "eval_tokens": per_seed[0]["eval_tokens"]}
    for key in METRICS:
        vals = [r[key] for r in per_seed if key in r]
        if len(vals) == len(per_seed):
            out.update({key: float(np.mean(vals)), f"{key}_sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                        f"{key}_min": float(np.min(vals)), f"{key}_max": float(np.max(vals))})
    return out


def _freeze(params_S: list, sae_cfg: sae.SAEConfig, source, cfg: HTopKExperimentConfig) -> list:
    """Each seed's Matryoshka BatchTopK SAE as JumpReLU (one threshold, set on `convert_tokens` training tokens)."""
    bs = min(cfg.batch_size, source.num_tokens)
    n = max(bs, min(cfg.convert_tokens, source.num_tokens) // bs * bs)
    x_NxD = jnp.asarray(source.normalizer(next(source.batches(n, seed=cfg.seed + 1))) if source.normalizer
                        else next(source.batches(n, seed=cfg.seed + 1)))
    return [sae.batchtopk_to_jumprelu(jax.tree.map(jnp.asarray, p), sae_cfg, x_NxD, bs) for p in params_S]


def run(cfg: HTopKExperimentConfig) -> dict | None:
    """Train every SAE, evaluate at every sparsity, and return the summary (None for an `only=` worker)."""
    source, heldout, tokens_NxT = _sources(cfg)
    evaluate = _evaluator(cfg, heldout, tokens_NxT, source.normalizer)
    base = sae.SAEConfig(d_in=source.d_in, d_sae=cfg.d_sae, k=cfg.k_max, aux_k=cfg.aux_k)
    h_cfg = htopk.HTopKConfig(tile=cfg.tile)
    ks = sorted(cfg.ks)
    # Order of training: the runs the verdict needs most come first, so a run cut short still says something.
    names = ([f"htopk_k{cfg.k_max}"] + [f"topk_k{k}" for k in ks if k != cfg.k_max]
             + ([f"matryoshka_k{cfg.k_max}"] if cfg.matryoshka else []) + [f"topk_k{cfg.k_max}"])
    if cfg.only and cfg.only not in names:
        raise ValueError(f"only={cfg.only!r} is not one of {names}")

    results, costs, missing = {"htopk": {}, "topk": {}, "topk_truncated": {}}, {}, []
    mat, htopk_params = None, None
    pool = lambda name, params_S, c, tag, ce=True: _pool(  # noqa: E731
        [evaluate(name, s, p, c, tag, ce) for s, p in enumerate(params_S)])
    for name in names:
        if cfg.only and name != cfg.only:
            continue
        if cfg.cached_only and not (Path(cfg.out_dir) / name / "train_cost.json").is_file():
            missing.append(name)
            continue
        k = int(name.rsplit("_k", 1)[1])
        if name.startswith("matryoshka"):
            m_cfg = sae.SAEConfig(d_in=source.d_in, d_sae=cfg.d_sae, activation="batchtopk", k=k, aux_k=cfg.aux_k)
            loss_fn = matryoshka.make_loss_fn(m_cfg, matryoshka.MatryoshkaConfig(cfg.widths, tile=cfg.tile))
            params_S, costs[name] = _train(name, m_cfg, loss_fn, source, cfg)
            frozen = _freeze(params_S, m_cfg, source, cfg)
            mat = {"k": k, "widths": list(cfg.widths), "prefixes": {}}
            for w in cfg.widths:
                cut = [matryoshka.truncate_params(p, c, w) for p, c in frozen]
                mat["prefixes"][str(w)] = _pool([evaluate(name, s, p, c, f"w{w}") for s, (p, c) in enumerate(cut)])
            continue
        sae_cfg = dataclasses.replace(base, k=k)
        loss_fn = htopk.make_loss_fn(base, h_cfg) if name.startswith("htopk") else None
        params_S, costs[name] = _train(name, sae_cfg, loss_fn, source, cfg)
        if name.startswith("htopk"):
            htopk_params = params_S
            results["htopk"] = {j: pool(name, params_S, dataclasses.replace(base, k=j), f"k{j}") for j in ks}
            continue
        results["topk"][k] = pool(name, params_S, sae_cfg, f"k{k}")
        if k == cfg.k_max:  # top_k is sorted, so truncating its code to j = re-encoding with k=j
            results["topk_truncated"] = {j: pool(name, params_S, dataclasses.replace(base, k=j), f"k{j}",
                                                 ce=cfg.ce_truncated or j == cfg.k_max) for j in ks}
    if mat is not None and htopk_params is not None:
        # Equal L0: the HTopK SAE truncated to j = each Matryoshka prefix's seed-mean L0, rounded.
        mat["htopk_at_equal_l0"] = {}
        for w, r in mat["prefixes"].items():
            j = int(min(cfg.k_max, max(1, round(r["l0"]))))
            mat["htopk_at_equal_l0"][w] = {"j": j, **pool(f"htopk_k{cfg.k_max}", htopk_params,
                                                          dataclasses.replace(base, k=j), f"k{j}", ce=False)}
    if cfg.only:
        return None
    # The truncated TopK's CE is a side result: a run that skipped it is not missing anything the verdicts need.
    missing += [f"CE of {family} j={j}" for family, rs in results.items() if family != "topk_truncated"
                for j, r in rs.items() if tokens_NxT is not None and "ce_delta" not in r]
    return {"config": dataclasses.asdict(cfg), "d_in": source.d_in, "train_tokens": source.num_tokens,
            "eval_tokens": next(r["eval_tokens"] for rs in results.values() for r in rs.values()), "missing": missing,
            "ce_tokens": None if tokens_NxT is None else int(tokens_NxT[:, heldout.manifest["skip_first"] + 1:].size),
            "results": {m: {str(j): r for j, r in rs.items()} for m, rs in results.items()}, "matryoshka": mat,
            "train_cost": costs}


LABELS = {"htopk": "HierarchicalTopK (one SAE, truncated to j)", "topk": "TopK, trained separately at each k",
          "topk_truncated": "TopK k_max, truncated to j", "matryoshka": "Matryoshka BatchTopK (one SAE, cut to a prefix)"}


def _families(summary: dict) -> dict:
    """{family: {label: pooled result}}: the three TopK-style families, and Matryoshka keyed by prefix width."""
    fams = dict(summary["results"])
    if summary.get("matryoshka"):
        fams["matryoshka"] = summary["matryoshka"]["prefixes"]
    return fams


def plot(summary: dict, path: Path) -> None:
    """EV vs L0 and CE delta vs L0 of every family: seed means, with error bars from the seed min to max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = _families(summary)
    has_ce = any("ce_delta" in r for rs in fams.values() for r in rs.values())
    fig, axes = plt.subplots(1, 2 if has_ce else 1, figsize=(11 if has_ce else 6, 4.5), squeeze=False)
    for metric, ax in zip(("ev", "ce_delta"), axes[0]):
        for (model, rs), marker in zip(fams.items(), "os^D"):
            js = sorted((j for j in rs if metric in rs[j]), key=lambda j: rs[j]["l0"])
            if not js:
                continue
            mean = np.array([rs[j][metric] for j in js])
            lo, hi = (np.array([rs[j].get(f"{metric}_{e}", rs[j][metric]) for j in js]) for e in ("min", "max"))
            ax.errorbar([rs[j]["l0"] for j in js], mean, yerr=[mean - lo, hi - mean], marker=marker, capsize=3,
                        label=LABELS[model])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel({"ev": "explained variance (held out)", "ce_delta": "CE delta (nats/token)"}[metric])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    cfg = summary["config"]
    fig.suptitle(f"SAEs of width {cfg['d_sae']} on "
                 + ("synthetic data" if cfg["synthetic"] else f"SmolLM2-135M L{cfg['layer']}")
                 + f"; seed mean, bars = min..max over {cfg.get('n_seeds', 1)} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell(r: dict | None, metric: str, spec: str = ".4f") -> str:
    """'mean ± sd' of one metric (— when missing)."""
    if r is None or metric not in r:
        return "—"
    return f"{r[metric]:{spec}} ± {r.get(metric + '_sd', 0.0):{spec}}"


def _matches(a: dict, b: dict, metric: str = "ev", higher_better: bool = True) -> tuple[bool, float, float]:
    """(a matches b, mean gap a − b, the seed spread): a matches b when it is no worse than b by more than the
    larger of the two families' seed ranges (max − min over seeds)."""
    gap = a[metric] - b[metric]
    spread = max(a[f"{metric}_max"] - a[f"{metric}_min"], b[f"{metric}_max"] - b[f"{metric}_min"])
    worse = -gap if higher_better else gap
    return worse <= spread, gap, spread


def report(summary: dict) -> str:
    """report.md: the comparison tables, the verdicts against per-k TopK and Matryoshka, and training cost."""
    cfg, res, costs = summary["config"], summary["results"], summary["train_cost"]
    S = cfg.get("n_seeds", 1)
    has_ce = any("ce_delta" in r for rs in res.values() for r in rs.values())
    js = sorted({j for rs in res.values() for j in rs}, key=int)
    both = [j for j in js if j in res["htopk"] and j in res["topk"]]
    source = ("synthetic sparse data (quick check; no model)" if cfg["synthetic"] else
              f"SmolLM2-135M, residual stream after block {cfg['layer']}, corpus `{cfg['corpus']}`")
    fams = ("htopk", "topk", "topk_truncated")
    lines = [
        "# HierarchicalTopK vs separately trained TopK SAEs, and Matryoshka BatchTopK",
        "",
        f"Data: {source}, d_in={summary['d_in']}, d_sae={cfg['d_sae']}. Every SAE is a {S}-seed vmapped ensemble "
        f"(one init key per seed, the same batches in the same order): {cfg['num_steps']} steps × {cfg['batch_size']} "
        f"tokens = {cfg['num_steps'] * cfg['batch_size']:,} token-steps per seed "
        f"({cfg['num_steps'] * cfg['batch_size'] / summary['train_tokens']:.1f} passes over {summary['train_tokens']:,} "
        f"distinct tokens), Adam lr {cfg['lr']} (warm-up {cfg['warmup_steps']}, cosine to 0.1×), AuxK "
        f"(aux_k={cfg['aux_k']}) on latents silent for {cfg['dead_after_tokens']:,} tokens. "
        f"EV, L0 and dead fraction on {summary['eval_tokens']:,} held-out tokens"
        + (f"; CE delta on {summary['ce_tokens']:,} held-out context tokens." if has_ce else ".") + f" Cells: seed mean ± seed sd (n={S}).",
        "",
        "![EV vs L0](ev_vs_l0.png)",
        "",
        "| j (L0 budget) | " + " | ".join(f"{LABELS[m]}: EV" for m in fams)
        + (" | HTopK CE Δ | TopK CE Δ" if has_ce else "") + " |",
        "|---|" + "---|" * (len(fams) + (2 if has_ce else 0)),
    ]
    for j in js:
        cells = [_cell(res[m].get(j), "ev") for m in fams]
        if has_ce:
            cells += [_cell(res["htopk"].get(j), "ce_delta"), _cell(res["topk"].get(j), "ce_delta")]
        lines.append(f"| {j} | " + " | ".join(cells) + " |")
    lines += ["", "Dead fraction (latents that never fire on the held-out tokens), seed mean:", "",
              "| j | " + " | ".join(LABELS[m] for m in fams) + " |", "|---|" + "---|" * len(fams)]
    for j in js:
        lines.append(f"| {j} | " + " | ".join(f"{res[m][j]['dead_frac']:.3f}" if j in res[m] else "—" for m in fams) + " |")
    if summary["missing"]:
        lines += ["", f"**Missing (not finished in the time available): {', '.join(summary['missing'])}.**"]

    lines += ["", "## Does one HierarchicalTopK SAE match separately trained TopK SAEs?", "",
              f"HTopK *matches* TopK at j when its seed-mean EV is below TopK's by no more than the seed spread "
              f"(the larger of the two families' max − min over the {S} seeds); at or above it counts as a match too."]
    if both:
        rows = {j: _matches(res["htopk"][j], res["topk"][j]) for j in both}
        ok = [j for j in both if rows[j][0]]
        lines.append("EV gap HTopK − TopK (spread): " + ", ".join(
            f"j={j}: {g:+.4f} ({sp:.4f})" for j, (_, g, sp) in rows.items()) + ".")
        ce_both = [j for j in both if "ce_delta" in res["htopk"][j] and "ce_delta" in res["topk"][j]]
        if ce_both:
            ce_rows = {j: _matches(res["htopk"][j], res["topk"][j], "ce_delta", higher_better=False) for j in ce_both}
            lines.append("CE delta of HTopK minus CE delta of TopK (negative = HTopK better; spread): " + ", ".join(
                f"j={j}: {g:+.4f} ({sp:.4f})" for j, (_, g, sp) in ce_rows.items()) + "; within the spread or better at "
                f"j ∈ {[j for j in ce_both if ce_rows[j][0]] or 'none'}.")
        verdict = ("at every j" if len(ok) == len(both) else "at no j" if not ok else
                   f"at j ∈ {ok} but not at j ∈ {[j for j in both if j not in ok]}")
        lines.append(f"**Verdict (EV): HTopK matches per-k TopK within the seed spread {verdict}.**")
    else:
        lines.append("**Verdict: cannot be judged (no sparsity has both models).**")
    trunc = ", ".join(f"j={j}: {res['htopk'][j]['ev'] - res['topk_truncated'][j]['ev']:+.4f}"
                      for j in js if j in res["htopk"] and j in res["topk_truncated"]) or "not available"
    lines += [f"Against the k_max TopK SAE simply truncated to j, HTopK's EV gain is {trunc}."]

    mat = summary.get("matryoshka")
    if mat and mat.get("prefixes"):
        lines += ["", "## Against Matryoshka BatchTopK at equal L0", "",
                  f"One Matryoshka BatchTopK SAE (k={mat['k']}, prefix widths {mat['widths']}, summed prefix losses, "
                  "frozen into JumpReLU form with one threshold), cut to each prefix. Its L0 per prefix is whatever "
                  "share of the k active latents falls in that prefix; HTopK is evaluated at j = that L0 (seed mean, "
                  "rounded; at most K, so where Matryoshka's L0 exceeds K the comparison gives HTopK fewer latents).", "",
                  "| prefix width | Matryoshka L0 | Matryoshka EV | Matryoshka CE Δ | HTopK at j | HTopK EV | match? |",
                  "|---|---|---|---|---|---|---|"]
        eq = mat.get("htopk_at_equal_l0", {})
        verdicts = []
        for w, r in mat["prefixes"].items():
            h = eq.get(w)
            m = _matches(h, r) if h else None
            if m:
                verdicts.append((w, r, h, m))
            lines.append(f"| {w} | {_cell(r, 'l0', '.1f')} | {_cell(r, 'ev')} | {_cell(r, 'ce_delta')} | "
                         f"{(str(h['j']) + (' (= K, capped)' if r['l0'] > h['j'] + 0.5 else '')) if h else '—'} | "
                         f"{_cell(h, 'ev')} | "
                         + ("—" if not m else ("HTopK better" if m[1] > m[2] else "within spread" if m[0]
                                               else "Matryoshka better")) + " |")
        if verdicts:
            lines += ["", "**Verdict (EV at equal L0): " + "; ".join(
                f"L0 {r['l0']:.1f} (width {w}): HTopK − Matryoshka {g:+.4f} (spread {sp:.4f})"
                for w, r, h, (_, g, sp) in verdicts) + ".** The two budget different things: Matryoshka's small "
                "prefixes are small dictionaries (few latents, each general), HTopK's small j are the top-ranked "
                "latents of the full dictionary. Matryoshka's L0 is not chosen but falls out of training: here its "
                f"narrowest prefix ({mat['widths'][0]} latents) still has L0 "
                f"{min(r['l0'] for r in mat['prefixes'].values()):.1f}, so below that (j = "
                f"{', '.join(j for j in js if int(j) < min(r['l0'] for r in mat['prefixes'].values())) or 'none'}) "
                "only HTopK and the TopK SAEs have points."]

    lines += ["", "## Training cost (this shared machine, compilation and data loading included)", "",
              f"| model | steps | token-steps per seed | wall s ({S} seeds) | CPU s (all threads) | dead at end of training |",
              "|---|---|---|---|---|---|"]
    for name, c in costs.items():
        resumed = f" (steps {c['resumed_from_step'] + 1}–{c['steps']} only: resumed)" if c.get("resumed_from_step") else ""
        lines.append(f"| {name} | {c['steps']} | {c['tokens']:,} | {c['train_s']}{resumed} | {c['train_cpu_s']}{resumed} "
                     f"| {c['train_dead_frac']:.3f} |")
    epochs = cfg["num_steps"] * cfg["batch_size"] / summary["train_tokens"]
    lines += ["", "## Caveats", "",
              f"- Short training: {cfg['num_steps']} steps on {summary['train_tokens']:,} distinct tokens "
              f"({epochs:.1f} passes), {cfg['num_steps'] * cfg['batch_size']:,} token-steps per seed: "
              f"{cfg['num_steps'] * cfg['batch_size'] / 2e6:.0%} of the ≥ 2M asked for in issue 17, which is what a "
              "2-core CPU shared with other jobs allowed. The paper trains on ~1B tokens at d_sae=65,536; this is a "
              "small-budget check of the same comparison, and which way it comes out may change with longer training.",
              f"- Training activations: `{cfg['train_cache'] or 'the shared ' + cfg['corpus'] + '_train cache'}` "
              f"({summary['train_tokens']:,} tokens).",
              f"- The seed spread covers initialisation only ({S} seeds; every seed sees the same batches), not data order.",
              "- Costs are CPU seconds on a 2-core machine shared with other jobs; wall seconds mostly reflect the load."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    cfg = configlib.parse(HTopKExperimentConfig(), argv)
    if cfg is None:
        return 0
    if cfg.synthetic and cfg.results_dir == HTopKExperimentConfig.results_dir:
        raise ValueError(f"synthetic=true would overwrite the real results in {cfg.results_dir}; pass results_dir=...")
    summary = run(cfg)
    if summary is None:
        return 0
    out = Path(cfg.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot(summary, out / "ev_vs_l0.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "report.md").write_text(report(summary))
    print(json.dumps({"results_dir": str(out), **{m: {j: round(r["ev"], 4) for j, r in rs.items()}
                                                  for m, rs in _families(summary).items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(configlib.run(main, prog="python -m experiments.hierarchical_topk"))
