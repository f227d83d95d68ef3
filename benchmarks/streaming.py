"""Streaming S seeds from the model vs harvest-to-cache then train, vs sparsify's trainer: tokens/s end to end.

Run: `python -m benchmarks.streaming [key=value ...]` from the repository root (`help` lists the fields). Every
side starts from the same token ids (the first contexts of `token_contexts(corpus, "train", ctx_len)`, or
`tokens=FILE.npy`) and trains S TopK SAEs (no AuxK) on the residual after block `layer`, one batch of `batch`
activation rows per step shared by all S seeds:
- `jaxsae_stream`: `jaxsae.stream.ModelSource` (the LM forward runs inside the loop, no cache) feeding
  `jaxsae.train.make_train_step`'s step, the loop `jaxsae.train.fit` runs, minus its checkpoints and logs.
- `jaxsae_cache`: `jaxsae.harvest.harvest` writes the rows every run reads to a float16 cache once (timed), then
  the same step trains from `jaxsae.data.CacheSource`. Its `step_s` charges each step its rows' share of the
  harvest (`train_step_s + batch * (harvest_s - harvest_compile_s) / harvest_rows`): an S-seed job is one harvest
  plus one training. harvest jits its forward afresh, so `harvest_s` holds one compilation; `harvest_compile_s`
  (first minus second call of the same fresh jit, measured after it) takes it out, as the warm-up does for the
  other sides.
- `sparsify`: EleutherAI sparsify's own `Trainer` (`init_seeds` = S seeds, `loss_fn="fvu"`, Adam, no AuxK)
  streaming from the same model in torch (transformers reads SmolLM2's GGUF; the `tiny` model's weights are
  copied over), `batch // ctx_len` contexts per step, its checkpoint writes disabled. Both LMs stop after block
  `layer` (sparsify's own CLI runs every block). sparsify cannot skip the first positions of a context, so it
  trains on every position but `<|endoftext|>`; its `rows_per_step` counts them.

Method: each (impl, S) compiles and runs `warmup` steps first (`compile_and_first_s`), then `rounds` rounds each
time `steps` steps of every (impl, S) in turn, so outside load hits them alike; `step_s` is the best round's
mean step, `median_step_s` the median round's. `tokens_per_s` = rows/s each seed trains on (= the rate rows
flow through the pipeline); `seed_tokens_per_s` = S times that. The token slice holds just the rows all steps
need, so no side sees a row twice. Prints JSON lines:
- `{"check": ...}` (with sparsify): the torch and JAX residuals on the same tokens.
- `{"impl", "seeds", "step_s", "median_step_s", "tokens_per_s", "seed_tokens_per_s", "per_seed_cost_s",
  "compile_and_first_s", "load_avg_1m_before", "load_avg_1m_after", ...}` per (impl, S); the load averages
  bracket the whole run (setup and harvest included).
- `{"bench": "compare", "seeds", "streaming_vs_cache", "streaming_vs_sparsify"}`: ratios of tokens/s.
- `{"bench": "flattening", "impl", "per_seed_cost_s": {S: step_s / S}, "flattens_at"}`: the first S after which
  one more ensemble size lowers the per-seed cost by less than `flat_tol` (null: not within the sizes timed).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import tqdm

from jaxsae import adapter, configlib, data, harvest, sae, stream, train

IMPLS = ("jaxsae_stream", "jaxsae_cache", "sparsify")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    model: str = "smollm2-135m"  # a registered model (smollm2-135m, tiny); sparsify needs one of these two
    layer: int = 14  # SAEs train on the residual stream after this block
    corpus: str = "general"  # token contexts: the first ones of this corpus's train split
    tokens: str = ""  # .npy of int token ids [N, T] to use instead of the corpus (its first contexts)
    ctx_len: int = 256  # tokens per context (corpus only; a tokens file sets its own)
    ctx_batch: int = 16  # contexts per LM forward (streaming and harvest); sparsify gets batch // ctx_len
    seeds: tuple[int, ...] = (1, 2, 4, 8)  # ensemble sizes S
    d_sae: int = 2304  # latents M
    k: int = 32  # active latents per token (TopK)
    batch: int = 4096  # activation rows per step, one batch shared by every seed
    warmup: int = 1  # untimed steps per (impl, S): compilation, first forward
    steps: int = 4  # timed steps per (impl, S) per round
    rounds: int = 2  # rounds; each times every (impl, S) once, in turns
    normalizer_tokens: int = 8192  # rows the streaming source fits its Normalizer on (one-off, timed apart)
    impls: tuple[str, ...] = IMPLS  # sides to run: jaxsae_stream, jaxsae_cache, sparsify
    flat_tol: float = 0.1  # the per-seed cost has flattened once the next S lowers it by less than this fraction


def load_avg_1m() -> float:
    """The 1-minute load average (the machine is shared: figures mean little when it is high)."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def _check(cfg: BenchConfig) -> None:
    bad = sorted(set(cfg.impls) - set(IMPLS))
    if bad or not cfg.impls:
        raise ValueError(f"impls must be a non-empty subset of {list(IMPLS)}, got {list(cfg.impls)}")
    if not cfg.seeds or min(cfg.seeds) < 1:
        raise ValueError(f"seeds must be ensemble sizes >= 1, got {list(cfg.seeds)}")
    for name in ("batch", "steps", "rounds", "ctx_batch", "normalizer_tokens"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {cfg.warmup}")
    if "sparsify" in cfg.impls and cfg.model not in ("smollm2-135m", "tiny"):
        raise ValueError(f"the sparsify side runs smollm2-135m or tiny in torch, not model={cfg.model!r}; "
                         f"drop it with impls=jaxsae_stream,jaxsae_cache")


def token_slice(cfg: BenchConfig, model: adapter.ModelAdapter) -> np.ndarray:
    """The first contexts whose kept rows cover every step of every round (warm-up included), int32 [N, T]."""
    if cfg.tokens:
        tokens_NxT = np.load(cfg.tokens, mmap_mode="r")
        if tokens_NxT.ndim != 2 or not np.issubdtype(tokens_NxT.dtype, np.integer):
            raise ValueError(f"tokens={cfg.tokens} must hold int ids [N, T], "
                             f"got {tokens_NxT.dtype}{list(tokens_NxT.shape)}")
    else:
        tokens_NxT = harvest.corpus_tokens(model, harvest.HarvestConfig(corpus=cfg.corpus, ctx_len=cfg.ctx_len))
    T = tokens_NxT.shape[1]
    if "sparsify" in cfg.impls and cfg.batch < T:
        raise ValueError(f"batch={cfg.batch} is less than one context of {T} tokens (sparsify steps whole contexts)")
    need = (cfg.warmup + cfg.rounds * cfg.steps) * cfg.batch
    kept = np.cumsum(adapter.kept_positions(np.asarray(tokens_NxT), model.skip_first, model.exclude_tokens).sum(1))
    n = int(np.searchsorted(kept, need)) + 1  # first n with kept[n - 1] >= need
    n = max(n, (cfg.warmup + cfg.rounds * cfg.steps) * (cfg.batch // T))  # sparsify's contexts
    if n > len(tokens_NxT):
        raise ValueError(f"{len(tokens_NxT)} contexts of {T} tokens give {int(kept[-1])} rows; "
                         f"warmup + rounds * steps = {cfg.warmup + cfg.rounds * cfg.steps} steps of batch={cfg.batch} "
                         f"need {need}")
    return np.asarray(tokens_NxT[:n], np.int32)


class JaxRun:
    """S seeds trained by `train.make_train_step`'s step on batches of `source`, as `train.fit` feeds them."""

    def __init__(self, source, sae_cfg: sae.SAEConfig, seeds: int, batch: int):
        tcfg = train.TrainConfig(batch_size=batch, n_seeds=seeds, num_steps=10**6)
        self.step = train.make_train_step(sae_cfg, tcfg)
        self.state = train.init_state(jax.random.key(0), sae_cfg, tcfg)
        self.batches, self.normalize = source.batches(batch, seed=0), source.normalizer
        self.batch = self.rows = batch

    def run(self, n: int) -> float:
        """Seconds for n steps, data included (the next batch is read while the previous step may still run)."""
        self.rows = n * self.batch
        t0 = time.perf_counter()
        for _ in range(n):
            x = np.asarray(self.normalize(next(self.batches)), np.float32)
            self.state, m = self.step(self.state, x)
        jax.block_until_ready(m)
        return time.perf_counter() - t0


def torch_model(name: str, layer: int):
    """The LM as a transformers LlamaModel that stops after block `layer` (final norm removed)."""
    import torch
    import transformers

    if name == "smollm2-135m":  # transformers reads the GGUF itself, as benchmarks/harvest.py does
        from lime_jax import gguf

        path = gguf.find_smollm2_gguf()
        lm = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                               dtype=torch.float32).model
    else:  # no GGUF of the random tiny model: copy its weights into the same architecture
        from lime_jax import config

        lm = hf_llama(config.tiny(), adapter.load(name).params)
    lm.layers = lm.layers[: layer + 1]
    lm.config.num_hidden_layers = layer + 1  # sparsify finds the block list by this length
    lm.norm = torch.nn.Identity()
    return lm.eval()


def hf_llama(cfg, params):
    """A transformers LlamaModel holding lime_jax Llama params (HF's (out, in) layout, heads flattened)."""
    import torch
    import transformers

    D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    hf = transformers.LlamaConfig(
        vocab_size=cfg.vocab, hidden_size=D, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
        num_attention_heads=N, num_key_value_heads=K, head_dim=H, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_len, tie_word_embeddings=cfg.tie_embeddings)
    p = jax.tree.map(np.asarray, params)
    L = p["layers"]
    if not isinstance(L, dict):  # per-block weights (model.unstack_layers, as the adapter holds them): restack
        L = {name: np.stack([block[name] for block in L]) for name in L[0]}
    sd = {"embed_tokens.weight": p["embed"], "norm.weight": p["final_norm"]}
    for i in range(cfg.n_layers):
        sd.update({f"layers.{i}.{name}.weight": w for name, w in {
            "input_layernorm": L["attn_norm"][i], "post_attention_layernorm": L["mlp_norm"][i],
            "self_attn.q_proj": L["wq"][i].reshape(D, N * H).T, "self_attn.k_proj": L["wk"][i].reshape(D, K * H).T,
            "self_attn.v_proj": L["wv"][i].reshape(D, K * H).T, "self_attn.o_proj": L["wo"][i].reshape(N * H, D).T,
            "mlp.gate_proj": L["w_gate"][i].T, "mlp.up_proj": L["w_up"][i].T, "mlp.down_proj": L["w_down"][i].T,
        }.items()})
    lm = transformers.LlamaModel(hf)
    lm.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in sd.items()}, strict=True)
    return lm


class SparsifyRun:
    """sparsify's Trainer with S init seeds on one hookpoint, fed `contexts` contexts per step of `tokens_NxT`."""

    def __init__(self, lm, tokens_NxT: np.ndarray, cfg: BenchConfig, seeds: int, exclude_tokens, save_dir: str):
        from datasets import Dataset
        from sparsify import SaeConfig, Trainer, TrainConfig

        self.contexts = cfg.batch // tokens_NxT.shape[1]
        self.dataset = Dataset.from_dict({"input_ids": tokens_NxT.astype(np.int64)}).with_format("torch")
        tcfg = TrainConfig(SaeConfig(num_latents=cfg.d_sae, k=cfg.k), batch_size=self.contexts, loss_fn="fvu",
                           optimizer="adam", auxk_alpha=0.0, exclude_tokens=list(exclude_tokens), layers=[cfg.layer],
                           init_seeds=list(range(seeds)), log_to_wandb=False, save_dir=save_dir, save_every=10**9)
        with contextlib.redirect_stdout(sys.stderr):  # it prints its settings; stdout is for the JSON lines
            self.trainer = Trainer(tcfg, self.dataset, lm)
        self.trainer.save = lambda: None  # a checkpoint is no part of a step (jaxsae's are not timed either)
        self.rows_N = np.isin(tokens_NxT, list(exclude_tokens), invert=True).sum(1)
        self.rows = 0  # rows trained on by the last `run`

    def run(self, n: int) -> float:
        """Seconds for the trainer's next n steps (one `fit` over the next n batches of contexts)."""
        done = self.trainer.global_step
        self.trainer.dataset = self.dataset.select(range((done + n) * self.contexts))
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            self.trainer.fit()
        seconds = time.perf_counter() - t0
        self.rows = int(self.rows_N[done * self.contexts : (done + n) * self.contexts].sum())
        return seconds


def residual_check(lm, model: adapter.ModelAdapter, tokens_BxT: np.ndarray, layer: int) -> dict:
    """Largest difference between the torch and JAX residuals after block `layer` on the same contexts."""
    import torch

    with torch.inference_mode():
        h = lm(input_ids=torch.from_numpy(tokens_BxT.astype(np.int64))).last_hidden_state.numpy()
    ref = np.asarray(model.residuals(model.params, tokens_BxT, (layer,))[layer])
    diff = np.abs(h - ref)
    return {"check": "torch_vs_jax_residual", "layer": layer, "max_abs_diff": float(diff.max()),
            "max_abs_value": float(np.abs(ref).max()), "median_abs_diff": float(np.median(diff))}


def forward_compile_s(model: adapter.ModelAdapter, tokens_BxT: np.ndarray, layer: int) -> float:
    """Seconds a fresh jit of harvest's forward spends compiling: its first call minus its second."""
    f = jax.jit(lambda params, t_BxT: model.residuals(params, t_BxT, (layer,)))
    t0 = time.perf_counter()
    jax.block_until_ready(f(model.params, tokens_BxT))
    t1 = time.perf_counter()
    jax.block_until_ready(f(model.params, tokens_BxT))
    return max((t1 - t0) - (time.perf_counter() - t1), 0.0)


def flattening(costs: dict[int, float], tol: float) -> int | None:
    """The first S whose next (larger) S lowers the per-seed cost by less than `tol` of it."""
    sizes = sorted(costs)
    for a, b in zip(sizes, sizes[1:]):
        if costs[b] > (1 - tol) * costs[a]:
            return a
    return None


def main(argv: list[str] | None = None) -> int:
    cfg = configlib.parse(BenchConfig(), argv)
    if cfg is None:
        return 0
    _check(cfg)
    load_before = load_avg_1m()
    model = adapter.load(cfg.model)
    tokens_NxT = token_slice(cfg, model)
    seeds = sorted(set(cfg.seeds))
    sae_cfg = sae.SAEConfig(d_in=model.d_model, d_sae=cfg.d_sae, k=cfg.k, activation="topk", aux_k=0)
    runs, extra = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        if "jaxsae_stream" in cfg.impls:
            t0 = time.perf_counter()
            source = stream.ModelSource(model, tokens_NxT, cfg.layer, cfg.ctx_batch,
                                        normalizer_tokens=cfg.normalizer_tokens)
            extra["jaxsae_stream"] = {"normalizer_s": round(time.perf_counter() - t0, 3),
                                      "normalizer_tokens": cfg.normalizer_tokens}
            runs.update({("jaxsae_stream", s): JaxRun(source, sae_cfg, s, cfg.batch) for s in seeds})
        if "jaxsae_cache" in cfg.impls:
            need = (cfg.warmup + cfg.rounds * cfg.steps) * cfg.batch
            hcfg = harvest.HarvestConfig(corpus=cfg.corpus, num_tokens=need, layers=(cfg.layer,),
                                         ctx_len=tokens_NxT.shape[1], batch_size=cfg.ctx_batch, model=model.name)
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # harvest prints its own summary line
                manifest = harvest.harvest(model, tokens_NxT, hcfg, {cfg.layer: Path(tmp) / "cache"})[cfg.layer]
            harvest_s = time.perf_counter() - t0
            chunk_BxT = np.resize(tokens_NxT, (cfg.ctx_batch, tokens_NxT.shape[1]))  # harvest's compiled shape
            compile_s = forward_compile_s(model, chunk_BxT, cfg.layer)
            extra["jaxsae_cache"] = {"harvest_s": round(harvest_s, 3), "harvest_compile_s": round(compile_s, 3),
                                     "harvest_rows": manifest["num_tokens"],
                                     "harvest_tokens_per_s": round(manifest["num_tokens"] / harvest_s, 1)}
            # A buffer of one batch reads the disk every step: the amortised cost of a long run's 2^17-row refills.
            cache = data.CacheSource(Path(tmp) / "cache", buffer_tokens=cfg.batch)
            runs.update({("jaxsae_cache", s): JaxRun(cache, sae_cfg, s, cfg.batch) for s in seeds})
        if "sparsify" in cfg.impls:
            lm = torch_model(cfg.model, cfg.layer)
            print(json.dumps(residual_check(lm, model, tokens_NxT[:1], cfg.layer)), flush=True)
            runs.update({("sparsify", s): SparsifyRun(lm, tokens_NxT, cfg, s, model.exclude_tokens, tmp)
                         for s in seeds})

        first = {}
        for key, r in tqdm.tqdm(runs.items(), desc="warm-up", file=sys.stderr):
            first[key] = r.run(cfg.warmup) if cfg.warmup else 0.0
        times = {key: [] for key in runs}  # (seconds, rows) per step of each round
        for _ in tqdm.trange(cfg.rounds, desc="rounds", file=sys.stderr):
            for key, r in runs.items():
                times[key].append((r.run(cfg.steps) / cfg.steps, r.rows / cfg.steps))
    load_after = load_avg_1m()

    rows = {}
    for (impl, s), ts in times.items():
        (step_s, rows_per_step), median = min(ts), float(np.median([t for t, _ in ts]))
        row = {"impl": impl, "seeds": s, "layer": cfg.layer, "d_in": model.d_model, "d_sae": cfg.d_sae, "k": cfg.k,
               "batch": cfg.batch, "steps": cfg.steps, "rounds": cfg.rounds, "model": cfg.model}
        if impl == "sparsify":  # it trains on the rows its mask keeps (best round's), not exactly `batch`
            row.update(rows_per_step=rows_per_step, contexts_per_step=runs[impl, s].contexts, optimizer="adam")
        if impl == "jaxsae_cache":
            e = extra[impl]
            row["train_step_s"], row["median_train_step_s"] = round(step_s, 4), round(median, 4)
            share = cfg.batch * max(e["harvest_s"] - e["harvest_compile_s"], 0.0) / e["harvest_rows"]
            step_s, median = step_s + share, median + share
        row.update(extra.get(impl, {}), step_s=round(step_s, 4), median_step_s=round(median, 4),
                   tokens_per_s=round(rows_per_step / step_s, 1),
                   seed_tokens_per_s=round(s * rows_per_step / step_s, 1),
                   per_seed_cost_s=round(step_s / s, 4), compile_and_first_s=round(first[impl, s], 3),
                   load_avg_1m_before=load_before, load_avg_1m_after=load_after)
        rows[impl, s] = row
        print(json.dumps(row), flush=True)
    for s in seeds:
        tps = {impl: rows[impl, s]["tokens_per_s"] for impl in cfg.impls}
        ratios = {f"streaming_vs_{other.removeprefix('jaxsae_')}": round(tps["jaxsae_stream"] / tps[other], 3)
                  for other in ("jaxsae_cache", "sparsify") if "jaxsae_stream" in tps and other in tps}
        if ratios:
            print(json.dumps({"bench": "compare", "seeds": s, **ratios}), flush=True)
    for impl in cfg.impls:
        costs = {s: rows[impl, s]["step_s"] / s for s in seeds}
        print(json.dumps({"bench": "flattening", "impl": impl, "flat_tol": cfg.flat_tol,
                          "per_seed_cost_s": {str(s): round(c, 4) for s, c in costs.items()},
                          "flattens_at": flattening(costs, cfg.flat_tol)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(configlib.run(main, prog="python -m benchmarks.streaming"))
