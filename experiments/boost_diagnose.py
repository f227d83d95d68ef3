"""After `experiments.boost`: why a residual fires on general text, and an ablation that mixes general text in.

`python -m experiments.boost_diagnose [key=value ...]` reads the finished run (`summary.json`, the exported
residuals and the stitched SAE, whose first latents are the frozen base), then
  1. for each residual, on held-out general and domain activations: its L0, the fraction of tokens on
     which it fires, and its mean encoder pre-activation (the residual never saw general text, so nothing
     in training keeps its encoder quiet there); and per corpus, the share of the held-out variance held by
     massive-norm tokens (> 10x the median centred squared norm);
  2. ablation (not in the paper): a residual trained on its domain plus a fraction `mix_general` of general
     tokens (same target, the base's error; same steps), against the paper's residual on the same tokens.
Adds "diagnosis", "outliers" and "mixed_ablation" to `summary.json` and rewrites `report.md`.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from experiments import boost as exp
from jaxsae import boost, configlib, data, evaluate, harvest, io, sae


@dataclasses.dataclass(frozen=True)
class DiagnoseConfig:
    results_dir: str = "results/boost"  # the finished run's summary.json and report.md
    tokens: int = 8192  # held-out activations per corpus
    mix_general: float = 0.1  # ablation: fraction of general tokens in the residual's training data (0 skips it)


def _frozen_base(out: Path, base_d_sae: int, base_hash: str) -> tuple[dict, sae.SAEConfig]:
    """The base, cut from the stitched SAE (its first latents), checked against the residuals' provenance."""
    params, cfg, _ = io.load_saelens(out / "stitched_all")
    base = {n: (params[n] if n == "b_dec" else params[n][:, :base_d_sae] if n == "W_enc" else params[n][:base_d_sae])
            for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
    if boost.params_hash(base) != base_hash:
        raise ValueError(f"{out / 'stitched_all'}: its first {base_d_sae} latents are not the base the residuals record")
    return base, dataclasses.replace(cfg, d_sae=base_d_sae)


def _heldout(name: str, cfg, normalizer, n: int):
    src = data.CacheSource(harvest.cache_dir(name, "heldout", cfg.layer, cfg.root, cfg.model))
    return src, jnp.asarray(normalizer(next(src.batches(min(n, src.num_tokens), seed=0))))


def run(dcfg: DiagnoseConfig) -> dict:
    summary = json.loads((Path(dcfg.results_dir) / "summary.json").read_text())
    fields = {f.name: f.type for f in dataclasses.fields(exp.BoostExperimentConfig)}
    cfg = exp.BoostExperimentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in summary["config"].items()
                                       if k in fields})
    out = Path(cfg.out_dir)
    residuals, normalizer = {}, None
    for name in cfg.domains:
        residuals[name], normalizer = boost.load_residual(out / f"residual_{name}" / "residual")
    base, base_cfg = _frozen_base(out, cfg.base_d_sae, residuals[cfg.domains[0]].info.base_hash)
    heldout = {c: _heldout(c, cfg, normalizer, dcfg.tokens) for c in ("general",) + cfg.domains}

    diagnosis = {}
    for name, r in residuals.items():
        diagnosis[name] = {}
        for c in ("general", name):
            x_NxD = heldout[c][1]
            fires_NxM = sae.encode(r.params, x_NxD, r.cfg) != 0
            diagnosis[name][c] = {
                "residual_l0": float(jnp.mean(jnp.sum(fires_NxM, -1))),
                "tokens_with_a_residual_latent": float(jnp.mean(jnp.any(fires_NxM, -1))),
                "mean_pre_activation": float(jnp.mean(sae.pre_activations(r.params, x_NxD, r.cfg))),
                "threshold": float(np.mean(r.params["threshold"])),
            }
    summary["diagnosis"] = diagnosis
    outliers = {}
    for c, (_, x_NxD) in heldout.items():
        # Massive-norm tokens (e.g. just after a document boundary inside a packed context) can dominate a sum-based EV.
        n2_N = np.asarray(jnp.sum((x_NxD - x_NxD.mean(0)) ** 2, -1))
        big_N = n2_N > 10 * np.median(n2_N)
        outliers[c] = {"tokens": int(big_N.sum()), "of": int(len(n2_N)), "variance_share": float(n2_N[big_N].sum() / n2_N.sum())}
    summary["outliers"] = outliers

    if dcfg.mix_general > 0:
        res_cfg = boost.residual_config(base_cfg, cfg.res_d_sae, cfg.res_k, cfg.aux_k)
        loss_fn = boost.residual_loss_fn(base, base_cfg, res_cfg)
        general = data.CacheSource(harvest.cache_dir("general", "train", cfg.layer, cfg.root, cfg.model))
        ablation = {"mix_general": dcfg.mix_general, "eval_tokens": {c: int(h[1].shape[0]) for c, h in heldout.items()}}
        for name, r in residuals.items():
            domain = data.CacheSource(harvest.cache_dir(name, "train", cfg.layer, cfg.root, cfg.model))
            n_dom = summary["tokens"][name]["train"]  # as many domain tokens as the paper's residual had
            n_gen = int(round(n_dom * dcfg.mix_general / (1 - dcfg.mix_general)))
            mixed = data.ArraySource(np.concatenate([next(domain.batches(n_dom, seed=cfg.seed + 3)),
                                                     next(general.batches(n_gen, seed=cfg.seed + 3))]), normalizer)
            domain.normalizer = normalizer
            params = exp._fit(mixed, res_cfg, cfg, cfg.res_steps, out / f"mixed_{name}", loss_fn)
            jr = exp._to_jumprelu(params, res_cfg, domain, cfg)
            mixed_res = boost.Residual(*jr, r.info)
            row = {"domain_tokens": n_dom, "general_tokens": n_gen}
            for label, parts in (("base", []), ("boosted", [r]), ("boosted_mixed", [mixed_res])):
                p, c = (base, base_cfg) if not parts else boost.stitch(base, base_cfg, parts)
                for corpus in ("general", name):
                    ev = evaluate.evaluate_sae(p, c, normalizer, heldout[corpus][0], num_tokens=dcfg.tokens,
                                               batch_size=min(4096, dcfg.tokens))["ev"]
                    row[f"{label}_{'general' if corpus == 'general' else 'domain'}_ev"] = ev
            print(json.dumps({"domain": name, **row}), flush=True)
            ablation[name] = row
        summary["mixed_ablation"] = ablation
    return summary


def main(argv: list[str] | None = None) -> int:
    dcfg = configlib.parse(DiagnoseConfig(), argv)
    if dcfg is None:
        return 0
    summary = run(dcfg)
    results = Path(dcfg.results_dir)
    (results / "summary.json").write_text(json.dumps(summary, indent=1))
    (results / "report.md").write_text(exp.report(summary))
    print(json.dumps({k: summary[k] for k in ("diagnosis", "outliers", "mixed_ablation") if k in summary}))
    return 0


if __name__ == "__main__":
    sys.exit(configlib.run(main, prog="python -m experiments.boost_diagnose"))
