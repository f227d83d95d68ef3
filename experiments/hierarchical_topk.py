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
    train_cache_tokens: int = 1_000_000  # the train cache must hold this many tokens (harvested first if fewer)
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

    train_dir = harvest.ensure_cache(cfg.corpus, "train", cfg.train_cache_tokens, cfg.layer)
    heldout_dir = harvest.ensure_cache(cfg.corpus, "heldout", cfg.eval_tokens, cfg.layer)
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
    t0, c0 = time.perf_counter(), time.process_time()
    state = train.fit(source, sae_cfg, train_cfg, loss_fn=loss_fn)
    cost = {"train_s": round(time.perf_counter() - t0, 1), "train_cpu_s": round(time.process_time() - c0, 1),
            "steps": cfg.num_steps, "tokens": cfg.num_steps * cfg.batch_size,
            "train_dead_frac": float(np.mean(np.asarray(state.tokens_since_fired[0]) >= cfg.dead_after_tokens))}
    cost_file.write_text(json.dumps(cost))
    return jax.tree.map(lambda a: np.asarray(a[0]), jax.device_get(state.params)), cost


def _evaluator(cfg: HTopKExperimentConfig, heldout, tokens_NxT, normalizer):
    """`evaluate(params, sae_cfg) -> {"ev", "l0", "dead_frac", [CE metrics]}` on held-out data."""
    from jaxsae import evaluate

    model = evaluate.load_model() if tokens_NxT is not None else None
    skip_first = heldout.manifest["skip_first"] if tokens_NxT is not None else 0
    baseline = {}  # clean and zero-ablated LM losses: computed by the first call, reused by the rest

    def run_eval(params, sae_cfg):
        r = evaluate.evaluate_sae(params, sae_cfg, normalizer, heldout, tokens_NxT, layer=cfg.layer,
                                  skip_first=skip_first, num_tokens=cfg.eval_tokens, model=model,
                                  baseline=baseline or None)
        if tokens_NxT is not None and not baseline:
            baseline.update(clean_loss=r["clean_loss"], zero_loss=r["zero_loss"])
        return r

    return run_eval


def run(cfg: HTopKExperimentConfig) -> dict:
    """Train every SAE, evaluate at every sparsity, and return the summary."""
    source, heldout, tokens_NxT = _sources(cfg)
    evaluate = _evaluator(cfg, heldout, tokens_NxT, source.normalizer)
    base = sae.SAEConfig(d_in=source.d_in, d_sae=cfg.d_sae, k=cfg.k_max, aux_k=cfg.aux_k)
    h_cfg = htopk.HTopKConfig(tile=cfg.tile)

    results, costs = {}, {}
    params, costs["htopk"] = _train(f"htopk_k{cfg.k_max}", base, htopk.make_loss_fn(base, h_cfg), source, cfg)
    results["htopk"] = {j: evaluate(params, dataclasses.replace(base, k=j)) for j in cfg.ks}
    results["topk"], results["topk_truncated"] = {}, {}
    for k in sorted(cfg.ks, reverse=True):
        sae_cfg = dataclasses.replace(base, k=k)
        params, costs[f"topk_k{k}"] = _train(f"topk_k{k}", sae_cfg, None, source, cfg)
        results["topk"][k] = evaluate(params, sae_cfg)
        if k == cfg.k_max:  # top_k is sorted, so truncating its code to j = re-encoding with k=j
            results["topk_truncated"] = {j: (results["topk"][k] if j == k else
                                             evaluate(params, dataclasses.replace(base, k=j)))
                                         for j in cfg.ks}
    return {"config": dataclasses.asdict(cfg), "d_in": source.d_in, "train_tokens_available": source.num_tokens,
            "eval_tokens": results["htopk"][cfg.k_max]["eval_tokens"], "ce_tokens": None if tokens_NxT is None else int(tokens_NxT.size),
            "results": {m: {str(j): r for j, r in rs.items()} for m, rs in results.items()}, "train_cost": costs}


LABELS = {"htopk": "HierarchicalTopK (one SAE, truncated to j)", "topk": "TopK, trained separately at each k",
          "topk_truncated": "TopK k_max, truncated to j"}


def plot(summary: dict, path: Path) -> None:
    """EV vs L0 and CE delta vs L0 of the three families."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = summary["results"]
    has_ce = all("ce_delta" in r for rs in res.values() for r in rs.values())
    fig, axes = plt.subplots(1, 2 if has_ce else 1, figsize=(10 if has_ce else 5.5, 4), squeeze=False)
    for metric, ax in zip(("ev", "ce_delta"), axes[0]):
        for (model, rs), marker in zip(res.items(), "os^"):
            js = sorted(rs, key=int)
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
    has_ce = all("ce_delta" in r for rs in res.values() for r in rs.values())
    js = sorted(res["htopk"], key=int)
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
            r = res[m][j]
            cells.append(f"{r['ev']:.4f}" + (f" / {r['ce_delta']:.4f}" if has_ce else "") + f" (L0 {r['l0']:.1f})")
        lines.append(f"| {j} | " + " | ".join(cells) + " |")
    lines += ["", "Dead fraction (latents that never fire on the held-out tokens):", "",
              "| j | " + " | ".join(LABELS[m] for m in res) + " |", "|---|" + "---|" * len(res)]
    for j in js:
        lines.append(f"| {j} | " + " | ".join(f"{res[m][j]['dead_frac']:.3f}" for m in res) + " |")

    wins = [j for j in js if res["htopk"][j]["ev"] >= res["topk"][j]["ev"]]
    gaps = ", ".join(f"j={j}: {res['htopk'][j]['ev'] - res['topk'][j]['ev']:+.4f}" for j in js)
    verdict = ("holds" if len(wins) == len(js) else "does not hold" if not wins else "holds only in part")
    lines += ["", "## Does one HierarchicalTopK SAE match separately trained TopK SAEs?", "",
              f"EV of HTopK minus EV of the TopK SAE trained at that k: {gaps}. "
              f"The paper's claim (HTopK matches or beats the separate TopK SAEs at every sparsity) "
              f"**{verdict} here**: HTopK is at least as good at j ∈ {wins or 'none'} of {js}."]
    if has_ce:
        ce_gaps = ", ".join(f"j={j}: {res['htopk'][j]['ce_delta'] - res['topk'][j]['ce_delta']:+.4f}" for j in js)
        lines.append(f"CE delta of HTopK minus CE delta of TopK (negative = HTopK better): {ce_gaps}.")
    trunc = ", ".join(f"j={j}: {res['htopk'][j]['ev'] - res['topk_truncated'][j]['ev']:+.4f}" for j in js)
    lines += [f"Against the k_max TopK SAE simply truncated to j, HTopK's EV gain is {trunc}.", "",
              "## Training cost (this shared machine, compilation and data loading included)", "",
              "| model | steps | tokens | wall s | CPU s (all threads) | dead at end of training |",
              "|---|---|---|---|---|---|"]
    for name, c in costs.items():
        lines.append(f"| {name} | {c['steps']} | {c['tokens']:,} | {c['train_s']} | {c['train_cpu_s']} "
                     f"| {c['train_dead_frac']:.3f} |")
    topk_cpu = sum(c["train_cpu_s"] for n, c in costs.items() if n.startswith("topk"))
    lines += ["", f"One HTopK SAE: {costs['htopk']['train_cpu_s']} CPU s; the {len(js)} separate TopK SAEs together: "
              f"{topk_cpu:.1f} CPU s. Per-step cost at the benchmark size is in `benchmarks/README.md` (htopk_step)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(configlib.help_text(HTopKExperimentConfig()))
        return 0
    cfg = configlib.override(HTopKExperimentConfig(), argv)
    if cfg.synthetic and cfg.results_dir == HTopKExperimentConfig.results_dir:
        raise ValueError(f"synthetic=true would overwrite the real results in {cfg.results_dir}; pass results_dir=...")
    summary = run(cfg)
    out = Path(cfg.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot(summary, out / "ev_vs_l0.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "report.md").write_text(report(summary))
    print(json.dumps({"results_dir": str(out), **{m: {j: round(r["ev"], 4) for j, r in rs.items()}
                                                  for m, rs in summary["results"].items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
