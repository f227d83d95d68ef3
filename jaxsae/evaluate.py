"""`jaxsae eval`: EV, L0, dead fraction, and the LM-loss cost of splicing an SAE into its language model.

The model is any `jaxsae.adapter.ModelAdapter`; by default the one a cache's manifest names.
Under several processes (`coordinator=... num_processes=N process_id=I`, see `jaxsae.distributed`) each process
reads its rows of every EV batch and splices its share of the contexts; the sums are combined and process 0 writes.

Reconstruction metrics run over an activation cache; the CE metrics replace the residual after block
`layer` by the SAE's reconstruction only at the positions a cache keeps (>= skip_first and not an excluded
token such as <|endoftext|>), and average the next-token loss predicted at those same positions for the
clean, spliced and zero-ablated runs:
  ce_delta = spliced − clean;   loss_recovered = (zero − spliced) / (zero − clean).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxsae import adapter, configlib, distributed, harvest, io, metrics, sae
from jaxsae.adapter import ModelAdapter, kept_positions
from jaxsae.data import CacheSource, Normalizer

RECON_FN = Callable[[jax.Array], jax.Array]


def _identity(h_BxTxD):
    return h_BxTxD


def _zeros(h_BxTxD):
    return jnp.zeros_like(h_BxTxD)


def ce_metrics(model: ModelAdapter, tokens_NxT, layer: int, recon_fn: RECON_FN, batch_size: int = 8,
               baseline: dict | None = None, skip_first: int | None = None,
               exclude_tokens: Sequence[int] | None = None) -> dict:
    """Clean, spliced and zero-ablated LM loss (nats/token over the kept positions), ce_delta, loss_recovered.

    `baseline`, the result of an earlier call on the same tokens and layer, supplies clean and zero losses
    so that evaluating several SAEs runs the model once per SAE instead of three times. Kept positions are
    the model's own (`model.skip_first`, `model.exclude_tokens`) unless given.
    """
    skip_first = model.skip_first if skip_first is None else skip_first
    exclude_tokens = model.exclude_tokens if exclude_tokens is None else exclude_tokens
    if not 0 <= layer < model.n_layers:
        raise ValueError(f"layer={layer} is not a block of {model.name} (0..{model.n_layers - 1})")
    tokens_NxT = np.asarray(tokens_NxT)
    N, T = tokens_NxT.shape if tokens_NxT.ndim == 2 else (0, 0)
    if N == 0 or not 0 <= skip_first < T - 1:
        raise ValueError(f"ce_metrics needs tokens [N >= 1, T > skip_first + 1 = {skip_first + 1}], "
                         f"got shape {tokens_NxT.shape}")
    # clean runs through the same splice path, so an identity recon_fn gives ce_delta == 0 exactly.
    fns = {"spliced": recon_fn} if baseline is not None else {"clean": _identity, "zero": _zeros, "spliced": recon_fn}
    sums, count = dict.fromkeys(fns, 0.0), 0
    P, me = jax.process_count(), jax.process_index()
    lo, hi = me * N // P, (me + 1) * N // P  # this process's contexts
    for b0 in tqdm(range(lo, hi, batch_size), desc=f"CE splice L{layer}", unit="batch", mininterval=5,
                   disable=me != 0):
        batch_BxT = tokens_NxT[b0 : min(b0 + batch_size, hi)]
        real = len(batch_BxT)
        if real < batch_size:  # pad with copies (then drop them): one compiled shape for every batch
            batch_BxT = np.concatenate([batch_BxT, np.repeat(batch_BxT[:1], batch_size - real, 0)])
        keep_BxT = kept_positions(batch_BxT, skip_first, exclude_tokens)
        keep_BxTx1 = jnp.asarray(keep_BxT)[..., None]
        loss_mask_BxT1 = keep_BxT[:real, :-1]  # position t predicts token t + 1
        count += int(loss_mask_BxT1.sum())
        for name, fn in fns.items():
            spliced = lambda h, fn=fn: jnp.where(keep_BxTx1, fn(h), h)  # noqa: E731
            logits_BxTxV = model.splice(model.params, batch_BxT, layer, spliced)
            nll_BxT1 = np.asarray(adapter.token_nll(logits_BxTxV, batch_BxT))
            sums[name] += float(np.sum(nll_BxT1[:real].astype(np.float64) * loss_mask_BxT1))
    if P > 1:  # every process's sums, added in float64
        total = distributed.gather(np.array([*sums.values(), count], np.float64)).sum(0)
        sums, count = dict(zip(sums, total[:-1].tolist())), int(total[-1])
    if count == 0:
        raise ValueError(f"no position of tokens {tokens_NxT.shape} is >= skip_first={skip_first} and not excluded")
    losses = {f"{name}_loss": total / count for name, total in sums.items()}
    if baseline is not None:
        losses.update(clean_loss=baseline["clean_loss"], zero_loss=baseline["zero_loss"])
    clean, spliced, zero = losses["clean_loss"], losses["spliced_loss"], losses["zero_loss"]
    return {"clean_loss": clean, "spliced_loss": spliced, "zero_loss": zero, "ce_delta": spliced - clean,
            "loss_recovered": (zero - spliced) / (zero - clean)}


@functools.partial(jax.jit, static_argnames=("sae_cfg",))
def _recon(params, normalizer, h_BxTxD, sae_cfg):
    B, T, D = h_BxTxD.shape
    x_NxD = h_BxTxD.reshape(B * T, D)
    x_hat_NxD = normalizer.invert(sae.apply(params, normalizer(x_NxD), sae_cfg))
    return x_hat_NxD.reshape(B, T, D).astype(h_BxTxD.dtype)


def sae_recon_fn(params: dict, sae_cfg: sae.SAEConfig, normalizer: Normalizer | None) -> RECON_FN:
    """h_BxTxD -> normalizer.invert(SAE(normalizer(h))), in the model's scale (jitted)."""
    if normalizer is None:
        normalizer = Normalizer(np.zeros(sae_cfg.d_in, np.float32), 1.0)
    params = jax.tree.map(jnp.asarray, params)
    return lambda h_BxTxD: _recon(params, normalizer, h_BxTxD, sae_cfg)


@functools.partial(jax.jit, static_argnames=("sae_cfg",))
def _recon_step(params, normalizer, x_BxD, stats, fires_M, sae_cfg):
    """One batch of EV / L0 / firing statistics, in the normalised space (EV is the same in either)."""
    x_BxD = normalizer(x_BxD)
    code = sae.encode(params, x_BxD, sae_cfg)
    x_hat_BxD = sae.decode(params, code, sae_cfg)
    if isinstance(code, sae.Code):
        fires_M = fires_M.at[code.idx_BxK.reshape(-1)].add((code.vals_BxK > 0).reshape(-1))
    else:
        fires_M = fires_M + jnp.sum(code != 0, axis=0)
    return metrics.ev_stats_update(stats, x_BxD, x_hat_BxD), fires_M, metrics.l0(code)


def _merge_processes(stats: metrics.EVStats, l0: float, fires_M: np.ndarray):
    """Every process's EV sums (merged like `metrics.ev_stats_update`, in float64), mean L0 and firing counts."""
    local = np.concatenate([[stats.n, stats.m2, stats.err, l0], np.asarray(stats.mean_D)]).astype(np.float64)
    gathered = distributed.gather(local)
    n, mean_D, m2, err = 0.0, np.zeros(len(local) - 4), 0.0, 0.0
    for n_b, m2_b, err_b, _, *mean_b in gathered:
        delta_D = np.asarray(mean_b) - mean_D
        total = n + n_b
        m2 += m2_b + float(delta_D @ delta_D) * n * n_b / total
        mean_D, n, err = mean_D + delta_D * (n_b / total), total, err + err_b
    # Each process holds the same number of rows: the mean L0 is the mean of theirs.
    return metrics.EVStats(n, mean_D, m2, err), float(np.mean(gathered[:, 3])), distributed.gather(fires_M).sum(0)


def evaluate_sae(params: dict, sae_cfg: sae.SAEConfig, normalizer: Normalizer | None, acts: CacheSource,
                 tokens_NxT=None, *, num_tokens: int | None = None, batch_size: int = 4096, ce_batch_size: int = 8,
                 model: ModelAdapter | None = None, baseline: dict | None = None) -> dict:
    """{"ev", "l0", "dead_frac"} over the first epoch of `acts` (num_tokens rows at most, whole batches), and
    with `tokens_NxT` also the CE metrics of `ce_metrics`, spliced at the cache's layer with its kept positions
    (model: default the one the cache's manifest names; another model's cache is an error)."""
    if acts.d_in != sae_cfg.d_in:
        raise ValueError(f"activations have d_in={acts.d_in}, the SAE expects {sae_cfg.d_in}")
    if normalizer is None:
        normalizer = Normalizer(np.zeros(sae_cfg.d_in, np.float32), 1.0)
    n = acts.num_tokens if num_tokens is None else min(num_tokens, acts.num_tokens)
    if n < 1 or batch_size < 1:
        raise ValueError(f"evaluate_sae needs num_tokens >= 1 and batch_size >= 1, got {num_tokens}, {batch_size}")
    batch_size = min(batch_size, n)
    P, me = jax.process_count(), jax.process_index()
    if batch_size % P:
        raise ValueError(f"batch_size={batch_size} rows of an EV batch do not split over num_processes={P}")
    rows = (me * batch_size // P, (me + 1) * batch_size // P)  # this process's rows of every batch
    stats, fires_M = metrics.ev_stats_init(sae_cfg.d_in), jnp.zeros((sae_cfg.d_sae,), jnp.int32)
    l0s = []
    # The first epoch is one permutation: no row counted twice.
    stream = acts.batches(batch_size, seed=0, **({"rows": rows} if P > 1 else {}))
    for _ in tqdm(range(n // batch_size), desc="EV/L0", unit="batch", mininterval=5, disable=me != 0):
        stats, fires_M, l0 = _recon_step(params, normalizer, jnp.asarray(next(stream)), stats, fires_M, sae_cfg)
        l0s.append(float(l0))
    if P > 1:
        stats, l0, fires_M = _merge_processes(stats, float(np.mean(l0s)), np.asarray(fires_M))
    else:
        l0 = float(np.mean(l0s))
    out = {"ev": float(1.0 - metrics.ev_stats_fvu(stats)), "l0": l0,
           "dead_frac": float(metrics.dead_fraction(fires_M)), "eval_tokens": int(stats.n)}
    if tokens_NxT is not None:
        m = acts.manifest
        model = model if model is not None else harvest.load_model(m["model"])
        if model.name != m["model"]:
            raise ValueError(f"cache {acts.path} holds activations of model {m['model']!r}, not {model.name!r}")
        out.update(ce_metrics(model, tokens_NxT, m["layer"], sae_recon_fn(params, sae_cfg, normalizer), ce_batch_size,
                              baseline, m["skip_first"], m["exclude_tokens"]))
    return out


def find_saes(path: str | Path) -> list[Path]:
    """An SAE folder itself, or every SAE folder (holding cfg.json + weights) below a run folder, sorted."""
    path = Path(path)
    if (path / io.CFG).is_file():
        return [path]
    found = sorted(p.parent for p in path.rglob(io.CFG)
                   if (p.parent / io.WEIGHTS).is_file() or (p.parent / io.SPARSIFY_WEIGHTS).is_file())
    if not found:
        raise FileNotFoundError(f"no SAE folder ({io.CFG} + {io.WEIGHTS} or {io.SPARSIFY_WEIGHTS}) at or below {path}")
    return found


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    sae: str = ""  # an SAE folder (jaxsae, SAELens or sparsify) or a run folder holding several
    layer: int = 14  # residual stream the SAEs read (after block l)
    model: str = "smollm2-135m"  # the model the caches were harvested from (a registered name or "module:factory")
    corpora: tuple[str, ...] = ("general", "code")  # held-out caches {corpus}_heldout to evaluate on
    num_tokens: int = 20_000  # held-out activation rows for EV / L0 / dead, per corpus
    ce_contexts: int = 16  # held-out contexts (the cache's own first ones) for the CE splice; 0 skips CE
    batch_size: int = 4096  # activation rows per EV batch
    ce_batch_size: int = 8  # contexts per spliced forward
    root: str = "cache/acts"  # activation caches live under {root}/{model}/L{layer}/
    out: str = ""  # also write the results to this JSON file


def evaluate_run(cfg: EvalConfig) -> list[dict]:
    """One result row per (SAE folder, corpus)."""
    saes = find_saes(cfg.sae)
    model = harvest.load_model(cfg.model) if cfg.ce_contexts else None
    rows = []
    for corpus in cfg.corpora:
        path = harvest.cache_dir(corpus, "heldout", cfg.layer, cfg.root, cfg.model)
        acts = CacheSource(path)
        tokens = harvest.cache_contexts(path)[: cfg.ce_contexts] if cfg.ce_contexts else None
        baseline = None
        for folder in saes:
            params, sae_cfg, normalizer = io.load_any(folder)  # jaxsae, SAELens or sparsify
            r = evaluate_sae(params, sae_cfg, normalizer, acts, tokens, num_tokens=cfg.num_tokens,
                             batch_size=cfg.batch_size, ce_batch_size=cfg.ce_batch_size, model=model,
                             baseline=baseline)
            baseline = r if tokens is not None else None
            rows.append({"sae": str(folder), "corpus": corpus, **r})
            if distributed.is_main():
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """`jaxsae eval sae=PATH [key=value ...]`: fields of EvalConfig and DistConfig (several processes share the work)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = [EvalConfig(), distributed.DistConfig()]
    if any(a in ("-h", "--help", "help") for a in argv):
        print("usage: jaxsae eval sae=PATH [key=value ...]\n" + "\n\n".join(configlib.help_text(c) for c in defaults))
        return 0
    eval_argv, dist_argv = configlib.split_argv(argv, defaults)
    cfg = configlib.override(EvalConfig(), eval_argv)
    if not cfg.sae:
        raise ValueError("jaxsae eval needs sae=PATH (an SAE folder or a run folder)")
    distributed.initialize(configlib.override(distributed.DistConfig(), dist_argv))
    rows = evaluate_run(cfg)
    if cfg.out and distributed.is_main():
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(configlib.run(main, prog="python -m jaxsae.evaluate"))
