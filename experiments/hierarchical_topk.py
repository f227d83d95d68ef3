"""Paper C: one HierarchicalTopK SAE (K = k_max) against TopK SAEs trained separately at each k.

`python -m experiments.hierarchical_topk [key=value ...]` trains, on the same tokens in the same order and
at the same width, one HierarchicalTopK SAE and one TopK SAE per k in `ks`. It evaluates the HTopK SAE and
the k_max TopK SAE truncated to each j in `ks` (their first j latents per token), and each TopK SAE at its
own k. Metrics: EV, L0, dead fraction, CE delta from splicing into SmolLM2-135M, and wall-clock training
time. Writes `summary.json`, `report.md` and `ev_vs_l0.png` to `results_dir`.

`synthetic=true` runs the same pipeline on synthetic sparse data (no model, no CE delta) as a quick check.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jaxsae import configlib, data, htopk, io, sae, train


@dataclasses.dataclass(frozen=True)
class HTopKExperimentConfig:
    corpus: str = "general"  # corpus of the activation caches {corpus}_{train,heldout} and of the CE contexts
    layer: int = 14  # SmolLM2 residual stream after this block
    model: str = "smollm2-135m"  # model harvested and spliced: smollm2-135m, or tiny (random weights: smoke tests)
    train_cache_tokens: int = 1_000_000  # the train cache must hold this many tokens (harvested first if fewer)
    train_cache: str = ""  # train on this cache folder instead (e.g. a frozen view of a cache still being extended)
    d_sae: int = 4608  # latents of every SAE
    k_max: int = 64  # K of the HierarchicalTopK SAE
    ks: tuple[int, ...] = (8, 16, 32, 64)  # sparsities: one TopK SAE trained at each; HTopK and TopK-k_max truncated to each
    batch_size: int = 2048  # tokens per training step
    num_steps: int = 400  # training steps of every SAE (the same batches in the same order for all)
    lr: float = 4e-4  # peak Adam learning rate
    warmup_steps: int = 50  # linear learning-rate warm-up steps
    dead_after_tokens: int = 256_000  # a latent silent for this many tokens is dead (AuxK trains it)
    aux_k: int = 128  # AuxK: dead latents that model the residual (each step gathers [B, aux_k, D]; 0 disables)
    tile: int = 256  # lean HTopK loss: batch rows processed together
    eval_tokens: int = 65_536  # held-out activations for EV, L0 and dead fraction
    ce_contexts: int = 16  # held-out contexts spliced into SmolLM2 for the CE delta (0 skips it)
    seed: int = 0  # init and data-order seed, shared by every SAE
    synthetic: bool = False  # quick check on synthetic sparse data: no model, no CE delta
    synthetic_d_in: int = 64  # synthetic data: width
    synthetic_tokens: int = 65_536  # synthetic data: training tokens
    out_dir: str = "runs/hierarchical_topk"  # training runs (checkpoints, SAELens folders, timings)
    results_dir: str = "results/hierarchical_topk"  # summary.json, report.md, ev_vs_l0.png
    only: str = ""  # train+evaluate only this run (htopk_k64, topk_k8, ...) and stop; a full run reuses its results
    cached_only: bool = False  # report only the runs and evaluations already on disk; list the missing ones

    def __post_init__(self):
        if self.k_max not in self.ks or any(not 1 <= k <= self.k_max for k in self.ks):
            raise ValueError(f"ks={self.ks} must lie in 1..k_max={self.k_max} and contain k_max")
        if self.k_max > self.d_sae:
            raise ValueError(f"k_max={self.k_max} exceeds d_sae={self.d_sae}")


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


def _train(name: str, sae_cfg: sae.SAEConfig, loss_fn, source, cfg: HTopKExperimentConfig) -> tuple[dict, dict]:
    """Train one SAE (or load it if this run already finished); returns (params, training-cost record)."""
    out = Path(cfg.out_dir) / name
    cost_file = out / "train_cost.json"
    if cost_file.is_file() and (out / "seed_0" / io.CFG).is_file():
        params, _, _ = io.load_saelens(out / "seed_0")
        return params, json.loads(cost_file.read_text())
    train_cfg = train.TrainConfig(lr=cfg.lr, warmup_steps=cfg.warmup_steps, batch_size=cfg.batch_size,
                                  num_steps=cfg.num_steps, n_seeds=1, seed=cfg.seed,
                                  dead_after_tokens=cfg.dead_after_tokens, checkpoint_every=100,
                                  log_every=max(1, cfg.num_steps // 20), out_dir=str(out))
    # A run resumed from a checkpoint is only timed from there on; record where that was.
    resumed = max((int(p.name) for p in (out / "checkpoints").glob("[0-9]*")), default=0)
    t0, c0 = time.perf_counter(), time.process_time()
    state = train.fit(source, sae_cfg, train_cfg, loss_fn=loss_fn)
    cost = {"train_s": round(time.perf_counter() - t0, 1), "train_cpu_s": round(time.process_time() - c0, 1),
            "steps": cfg.num_steps, "tokens": cfg.num_steps * cfg.batch_size, "resumed_from_step": resumed,
            "train_dead_frac": float(np.mean(np.asarray(state.tokens_since_fired[0]) >= cfg.dead_after_tokens))}
    cost_file.write_text(json.dumps(cost))
    return jax.tree.map(lambda a: np.asarray(a[0]), jax.device_get(state.params)), cost


def _evaluator(cfg: HTopKExperimentConfig, heldout, tokens_NxT, normalizer):
    """`evaluate(name, params, sae_cfg) -> {"ev", "l0", "dead_frac", [CE metrics]}` on held-out data.

    EV/L0/dead and CE results (and the clean/zero-ablated LM losses) are cached separately under out_dir,
    keyed by their settings, so reruns and parallel `only=` workers reuse them; with `cached_only` a
    missing CE result is left out instead of running the model.
    """
    from jaxsae import evaluate, harvest

    model = []  # the model (SmolLM2 unless cfg.model says otherwise), loaded on first use
    skip_first = heldout.manifest["skip_first"] if tokens_NxT is not None else 0
    baseline_file = Path(cfg.out_dir) / f"ce_baseline_c{cfg.ce_contexts}.json"

    def cached(path: Path, compute):
        if not path.is_file():
            path.write_text(json.dumps(compute()))
        return json.loads(path.read_text())

    def ce(params, sae_cfg):
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

    def run_eval(name, params, sae_cfg):
        out = Path(cfg.out_dir) / name
        r = cached(out / f"ev_k{sae_cfg.k}_t{cfg.eval_tokens}.json", lambda: evaluate.evaluate_sae(
            params, sae_cfg, normalizer, heldout, num_tokens=cfg.eval_tokens))
        ce_file = out / f"ce_k{sae_cfg.k}_c{cfg.ce_contexts}.json"
        if tokens_NxT is not None and (ce_file.is_file() or not cfg.cached_only):
            r.update(cached(ce_file, lambda: ce(params, sae_cfg)))
        return r

    return run_eval


def run(cfg: HTopKExperimentConfig) -> dict | None:
    """Train every SAE, evaluate at every sparsity, and return the summary (None for an `only=` worker)."""
    source, heldout, tokens_NxT = _sources(cfg)
    evaluate = _evaluator(cfg, heldout, tokens_NxT, source.normalizer)
    base = sae.SAEConfig(d_in=source.d_in, d_sae=cfg.d_sae, k=cfg.k_max, aux_k=cfg.aux_k)
    h_cfg = htopk.HTopKConfig(tile=cfg.tile)
    names = [f"htopk_k{cfg.k_max}"] + [f"topk_k{k}" for k in sorted(cfg.ks, reverse=True)]
    if cfg.only and cfg.only not in names:
        raise ValueError(f"only={cfg.only!r} is not one of {names}")

    results, costs, missing = {"htopk": {}, "topk": {}, "topk_truncated": {}}, {}, []
    for name in names:
        if cfg.only and name != cfg.only:
            continue
        if cfg.cached_only and not (Path(cfg.out_dir) / name / "train_cost.json").is_file():
            missing.append(name)
            continue
        k = int(name.rsplit("_k", 1)[1])
        sae_cfg = dataclasses.replace(base, k=k)
        loss_fn = htopk.make_loss_fn(base, h_cfg) if name.startswith("htopk") else None
        params, costs[name] = _train(name, sae_cfg, loss_fn, source, cfg)
        if name.startswith("htopk"):
            results["htopk"] = {j: evaluate(name, params, dataclasses.replace(base, k=j)) for j in cfg.ks}
            continue
        results["topk"][k] = evaluate(name, params, sae_cfg)
        if k == cfg.k_max:  # top_k is sorted, so truncating its code to j = re-encoding with k=j
            results["topk_truncated"] = {j: evaluate(name, params, dataclasses.replace(base, k=j)) for j in cfg.ks}
    if cfg.only:
        return None
    missing += [f"CE of {family} j={j}" for family, rs in results.items() for j, r in rs.items()
                if tokens_NxT is not None and "ce_delta" not in r]
    return {"config": dataclasses.asdict(cfg), "d_in": source.d_in, "train_tokens": source.num_tokens,
            "eval_tokens": next(r["eval_tokens"] for rs in results.values() for r in rs.values()), "missing": missing,
            "ce_tokens": None if tokens_NxT is None else int(tokens_NxT[:, heldout.manifest["skip_first"] + 1:].size),
            "results": {m: {str(j): r for j, r in rs.items()} for m, rs in results.items()}, "train_cost": costs}


LABELS = {"htopk": "HierarchicalTopK (one SAE, truncated to j)", "topk": "TopK, trained separately at each k",
          "topk_truncated": "TopK k_max, truncated to j"}


def plot(summary: dict, path: Path) -> None:
    """EV vs L0 and CE delta vs L0 of the three families."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = summary["results"]
    has_ce = any("ce_delta" in r for rs in res.values() for r in rs.values())
    fig, axes = plt.subplots(1, 2 if has_ce else 1, figsize=(10 if has_ce else 5.5, 4), squeeze=False)
    for metric, ax in zip(("ev", "ce_delta"), axes[0]):
        for (model, rs), marker in zip(res.items(), "os^"):
            js = sorted((j for j in rs if metric in rs[j]), key=int)
            ax.plot([rs[j]["l0"] for j in js], [rs[j][metric] for j in js], marker=marker, label=LABELS[model])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel({"ev": "explained variance (held out)", "ce_delta": "CE delta (nats/token)"}[metric])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"SAEs of width {summary['config']['d_sae']} on "
                 + ("synthetic data" if summary["config"]["synthetic"] else f"SmolLM2-135M L{summary['config']['layer']}"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(summary: dict) -> str:
    """report.md: the comparison table, the verdict on the paper's claim, and training cost."""
    cfg, res, costs = summary["config"], summary["results"], summary["train_cost"]
    has_ce = any("ce_delta" in r for rs in res.values() for r in rs.values())
    js = sorted({j for rs in res.values() for j in rs}, key=int)
    both = [j for j in js if j in res["htopk"] and j in res["topk"]]
    source = ("synthetic sparse data (quick check; no model)" if cfg["synthetic"] else
              f"SmolLM2-135M, residual stream after block {cfg['layer']}, corpus `{cfg['corpus']}`")
    lines = [
        "# HierarchicalTopK vs separately trained TopK SAEs",
        "",
        f"Data: {source}, "
        f"d_in={summary['d_in']}, d_sae={cfg['d_sae']}. Every SAE: {cfg['num_steps']} steps × {cfg['batch_size']} tokens "
        f"= {cfg['num_steps'] * cfg['batch_size']:,} training tokens (same batches, same order, seed {cfg['seed']}), "
        f"Adam lr {cfg['lr']}, AuxK (aux_k={cfg['aux_k']}) on latents silent for {cfg['dead_after_tokens']:,} tokens. "
        f"EV, L0 and dead fraction on {summary['eval_tokens']:,} held-out tokens"
        + (f"; CE delta on {summary['ce_tokens']:,} held-out context tokens." if has_ce else "."),
        "",
        "![EV vs L0](ev_vs_l0.png)",
        "",
        "| j (L0 budget) | " + " | ".join(f"{LABELS[m]}: EV" + (" / CE Δ" if has_ce else "") for m in res) + " |",
        "|---|" + "---|" * len(res),
    ]
    for j in js:
        cells = []
        for m in res:
            r = res[m].get(j)
            ce_cell = (f" / {r['ce_delta']:.4f}" if "ce_delta" in r else " / —") if has_ce and r else ""
            cells.append("—" if r is None else f"{r['ev']:.4f}{ce_cell} (L0 {r['l0']:.1f})")
        lines.append(f"| {j} | " + " | ".join(cells) + " |")
    lines += ["", "Dead fraction (latents that never fire on the held-out tokens):", "",
              "| j | " + " | ".join(LABELS[m] for m in res) + " |", "|---|" + "---|" * len(res)]
    for j in js:
        lines.append(f"| {j} | " + " | ".join(f"{res[m][j]['dead_frac']:.3f}" if j in res[m] else "—" for m in res) + " |")
    if summary["missing"]:
        lines += ["", f"**Missing (not finished in the time available): {', '.join(summary['missing'])}.**"]

    wins = [j for j in both if res["htopk"][j]["ev"] >= res["topk"][j]["ev"]]
    gaps = ", ".join(f"j={j}: {res['htopk'][j]['ev'] - res['topk'][j]['ev']:+.4f}" for j in both)
    verdict = ("cannot be judged (no sparsity has both models)" if not both else "holds" if len(wins) == len(both)
               else "does not hold" if not wins else "holds only in part")
    lines += ["", "## Does one HierarchicalTopK SAE match separately trained TopK SAEs?", "",
              f"EV of HTopK minus EV of the TopK SAE trained at that k: {gaps}. "
              f"The paper's claim (HTopK matches or beats the separate TopK SAEs at every sparsity) "
              f"**{verdict} here**: HTopK is at least as good at j ∈ {wins or 'none'} of {both}."]
    ce_both = [j for j in both if "ce_delta" in res["htopk"][j] and "ce_delta" in res["topk"][j]]
    if ce_both:
        ce_gaps = ", ".join(f"j={j}: {res['htopk'][j]['ce_delta'] - res['topk'][j]['ce_delta']:+.4f}" for j in ce_both)
        lines.append(f"CE delta of HTopK minus CE delta of TopK (negative = HTopK better): {ce_gaps}.")
    trunc = ", ".join(f"j={j}: {res['htopk'][j]['ev'] - res['topk_truncated'][j]['ev']:+.4f}"
                      for j in js if j in res["htopk"] and j in res["topk_truncated"]) or "not available"
    lines += [f"Against the k_max TopK SAE simply truncated to j, HTopK's EV gain is {trunc}.", "",
              "## Training cost (this shared machine, compilation and data loading included)", "",
              "| model | steps | tokens | wall s | CPU s (all threads) | dead at end of training |",
              "|---|---|---|---|---|---|"]
    for name, c in costs.items():
        resumed = f" (steps {c['resumed_from_step'] + 1}–{c['steps']} only: resumed)" if c.get("resumed_from_step") else ""
        lines.append(f"| {name} | {c['steps']} | {c['tokens']:,} | {c['train_s']}{resumed} | {c['train_cpu_s']}{resumed} "
                     f"| {c['train_dead_frac']:.3f} |")
    topk_cpu = sum(c["train_cpu_s"] for n, c in costs.items() if n.startswith("topk"))
    h_cpu = costs.get("htopk_k" + str(cfg["k_max"]), {}).get("train_cpu_s")
    n_topk = sum(n.startswith("topk") for n in costs)
    lines += ["", f"One HTopK SAE: {h_cpu} CPU s; the {n_topk} separate TopK SAEs together: "
              f"{topk_cpu:.1f} CPU s. Per-step cost at the benchmark size is in `benchmarks/README.md` (htopk_step)."]
    epochs = cfg["num_steps"] * cfg["batch_size"] / summary["train_tokens"]
    lines += ["", "## Caveats", "",
              f"- Short training: {cfg['num_steps']} steps on {summary['train_tokens']:,} distinct tokens "
              f"({epochs:.1f} passes). The paper trains on ~1B tokens at d_sae=65,536; this is a small-budget check "
              "of the same comparison, and which way it comes out may change with longer training.",
              f"- Training activations: `{cfg['train_cache'] or 'the shared ' + cfg['corpus'] + '_train cache'}` "
              f"({summary['train_tokens']:,} tokens).",
              "- One seed per model: differences of a few thousandths of EV are within seed noise (not measured here).",
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
                                                  for m, rs in summary["results"].items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(configlib.run(main, prog="python -m experiments.hierarchical_topk"))
