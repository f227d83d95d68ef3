"""Paper D (LIMe) at CPU scale: from scratch with seeds, and retrofitted onto the pretrained SmolLM2-135M.

`python -m experiments.lime part=scratch|pretrained|report [key=value ...]`

part=scratch: Llama vs LIMe (`routings`: static v1 by default; dynamic v1 and v2 on request) trained from a random
init on a deep, narrow model at the full SmolLM2 vocabulary, once per seed in `seeds`. The models of one seed start
from the same key and read the same packed contexts of the general corpus in the same order. Measures the
held-out loss per model and seed and the training loss against FLOPs; for the first seed also the paper's
analyses on held-out contexts: each layer's values' matrix entropy (Rényi alpha = 0.5, standardised features,
float64), the 5-fold linear-probe accuracy separating the value vectors of " is/ are/ was/ were", and the
routers' weights over depth.

part=pretrained: SmolLM2-135M (`pre_model=tiny`: a random-weight stand-in for smoke tests) trained further on the
general corpus in three arms that read the same tokens in the same order with the same AdamW settings:
  smollm2_all     plain SmolLM2, every weight learning;
  lime_v2_router  SmolLM2 converted to LIMe v2 (`model.to_lime`), only the routers learning (`trainable=router`);
  lime_v2_all     the converted model, every weight learning;
  lime_v2_router_current  the control: only the routers' current-layer blocks learning (a mix of each layer's own
                  K/V heads, no reads of earlier layers), at the routers' learning rate.
The conversion uses v2 because it is exact and trainable at once: v2's router is an unconstrained linear mix, so
"read only the current layer" is representable exactly (the converted model computes SmolLM2's logits), and the
loss is linear in every router entry, so each gets a full-size gradient from the first step. A v1 softmax router
can only approach one-hot (logit gap 20: earlier layers weigh e^-20); there its gradients are ~e^-20 times smaller,
so the routers would not move unless the gap (and exactness) is given up. Measures held-out loss on general and
code text and the values' entropy per layer before and after, and the routers' learned weights.

Each part writes its own section of `results_dir/summary.json` (scratch: "config" and "models"; pretrained:
"pretrained"), after every finished run, and rebuilds `report.md` and the PNGs from the whole file;
part=report only rebuilds them. Training runs resume from their checkpoints under `out_dir`: rerunning the same
command continues where it stopped, and finished runs are not retrained.

`vocab_top` > 0 keeps only the most frequent training tokens (the rest share one id; the same map for every
model): it makes tiny models cheap, but the results here use the full 49,152-token vocabulary (vocab_top=0).
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import sys
from pathlib import Path

import jax
import numpy as np

from jaxsae import configlib
from lime_jax import analysis, config, corpora, model, train

ROUTINGS = ("none", "static", "dynamic", "v2")
NAMES = {"none": "llama", "static": "lime_static", "dynamic": "lime_dynamic", "v2": "lime_v2"}
PROBE_WORDS = (" is", " are", " was", " were")
PARTS = ("scratch", "pretrained", "report")
ARMS = {"smollm2_all": ("none", "all"), "lime_v2_router": ("v2", "router"), "lime_v2_all": ("v2", "all"),
        "lime_v2_router_current": ("v2", "router_current")}
PRE_MODELS = ("smollm2", "tiny")


@dataclasses.dataclass(frozen=True)
class LimeExperimentConfig:
    part: str = "scratch"  # scratch (random init) | pretrained (SmolLM2 retrofitted) | report (rebuild the report)
    # part=scratch
    n_layers: int = 16  # decoder blocks (deep and narrow: where the paper sees the largest effect)
    d_model: int = 32  # residual width
    n_heads: int = 2  # attention heads; multi-head attention (every head its own K/V), as in the paper's runs
    head_dim: int = 16  # width of each head
    d_ff: int = 96  # SwiGLU hidden width
    vocab_top: int = 0  # keep this many most frequent training tokens, the rest share one id (0: full vocab)
    seq_len: int = 256  # tokens per sequence (a divisor of the corpus's 256-token packed contexts)
    batch_size: int = 8  # sequences per step
    num_steps: int = 100  # optimiser steps of every model
    warmup_steps: int = 10  # linear learning-rate warm-up
    lr: float = 2e-3  # peak learning rate (routers: 10x)
    log_every: int = 5  # steps between loss-curve points (checkpoints every 10 of them)
    seeds: tuple[int, ...] = (0, 1)  # one run of every model per seed (init key and data order)
    heldout_contexts: int = 128  # held-out sequences for the held-out loss
    entropy_contexts: int = 32  # held-out sequences whose values' matrix entropy is averaged (first seed)
    probe_contexts: int = 384  # held-out sequences searched for the probe words (first seed)
    routings: tuple[str, ...] = ("none", "static")  # models to train: none (Llama) | static | dynamic | v2
    # part=pretrained
    pre_model: str = "smollm2"  # smollm2 (the GGUF) | tiny (config.tiny at random init, seed 0: smoke tests)
    pre_tiny_layers: int = 12  # n_layers of the tiny stand-in
    pre_arms: tuple[str, ...] = tuple(ARMS)  # smollm2_all | lime_v2_router | lime_v2_all | lime_v2_router_current
    pre_steps: int = 24  # optimiser steps of every arm
    pre_batch_size: int = 2  # sequences per step
    pre_seq_len: int = 256  # tokens per sequence (256: the cached packed contexts)
    pre_lr: float = 2e-5  # peak learning rate of the pretrained weights (AdamW, cosine, weight decay 0.1)
    pre_router_lr: float = 1e-3  # peak learning rate of the LIMe routers
    pre_warmup_steps: int = 3  # linear learning-rate warm-up
    pre_log_every: int = 2  # steps between loss-curve points (checkpoints every 10 of them)
    pre_eval_contexts: int = 16  # held-out sequences per corpus (general, code) for the before/after losses
    pre_entropy_contexts: int = 8  # held-out general sequences whose values' entropy is averaged
    pre_seed: int = 0  # data order of every arm
    out_dir: str = "runs/lime_experiment"  # training runs (checkpoints, metrics.jsonl)
    results_dir: str = "results/lime"  # summary.json, report.md, PNGs

    def __post_init__(self):
        if self.part not in PARTS:
            raise ValueError(f"part={self.part!r} not in {PARTS}")
        if not set(self.routings) <= set(ROUTINGS) or not self.routings:
            raise ValueError(f"routings={self.routings} must be a non-empty subset of {ROUTINGS}")
        if self.vocab_top and self.vocab_top < 2:
            raise ValueError(f"vocab_top must be 0 (full vocabulary) or >= 2, got {self.vocab_top}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")
        if not set(self.pre_arms) <= set(ARMS) or not self.pre_arms:
            raise ValueError(f"pre_arms={self.pre_arms} must be a non-empty subset of {tuple(ARMS)}")
        if self.pre_model not in PRE_MODELS:
            raise ValueError(f"pre_model={self.pre_model!r} not in {PRE_MODELS}")
        if not 0 < self.pre_lr <= self.pre_router_lr:
            raise ValueError(f"need 0 < pre_lr <= pre_router_lr, got {self.pre_lr}, {self.pre_router_lr}")


# ---------------------------------------------------------------- part=scratch


def _vocab_map(train_NxT: np.ndarray, top: int, vocab: int) -> np.ndarray:
    """int32 [vocab]: the `top - 1` most frequent training tokens keep ids 0.., every other token is `top - 1`."""
    counts = np.bincount(np.asarray(train_NxT).ravel(), minlength=vocab)
    keep = np.argsort(-counts, kind="stable")[: top - 1]
    table = np.full(vocab, top - 1, np.int32)
    table[keep] = np.arange(top - 1, dtype=np.int32)
    return table


def _contexts(cfg: LimeExperimentConfig):
    """(train, heldout) int32 [N, seq_len] and the vocabulary map (None for the full vocabulary)."""
    def cut(split):
        tokens = corpora.token_contexts("general", split, 256)
        if 256 % cfg.seq_len:
            raise ValueError(f"seq_len={cfg.seq_len} must divide the cached context length 256")
        return np.asarray(tokens).reshape(-1, cfg.seq_len)

    train_NxT, heldout_NxT = cut("train"), cut("heldout")
    if not cfg.vocab_top:
        return train_NxT, heldout_NxT, None
    table = _vocab_map(train_NxT, cfg.vocab_top, config.LlamaConfig().vocab)
    return table[train_NxT], table[heldout_NxT], table


def _analyse(params, model_cfg, heldout_NxT, probe_ids, cfg: LimeExperimentConfig) -> dict:
    """Values' matrix entropy and probe accuracy per layer, and the router heatmap."""
    L, bs = model_cfg.n_layers, 4 * cfg.batch_size  # forward-only batches
    entropy = analysis.value_entropy(params, model_cfg, heldout_NxT[: cfg.entropy_contexts], bs)
    values_fn = lambda p, t: model.values(p, t, model_cfg)  # noqa: E731  (jitted inside, shared with the entropy)
    flat = lambda v_LxBxTxKxH: np.asarray(v_LxBxTxKxH).reshape(*v_LxBxTxKxH.shape[:3], -1)  # noqa: E731
    feats, labels = [], []
    probe = heldout_NxT[: cfg.probe_contexts]
    for i in range(0, len(probe), bs):
        toks = probe[i:i + bs]
        hit_BxT = np.isin(toks, probe_ids)
        if hit_BxT.any():
            feats.append(flat(values_fn(params, toks))[:, hit_BxT])
            labels.append(np.argmax(toks[hit_BxT][:, None] == probe_ids[None, :], axis=1))
    x_LxNxF, y_N = np.concatenate(feats, axis=1), np.concatenate(labels)
    # Balance the classes (chance = 1/4): the first n of each word, n = the rarest word's count.
    n = np.bincount(y_N, minlength=len(probe_ids)).min()
    keep = np.concatenate([np.flatnonzero(y_N == c)[:n] for c in range(len(probe_ids))])
    probe_acc = [analysis.probe_accuracy(x_LxNxF[layer][keep], y_N[keep], folds=5) for layer in range(L)]

    routers = None
    if model_cfg.routing != "none":
        routers = analysis.router_weights(params, model_cfg, heldout_NxT[:bs]).round(4).tolist()
    return {"value_entropy": [round(e, 4) for e in entropy], "probe_accuracy": [round(a, 4) for a in probe_acc],
            "probe_examples": int(len(keep)), "router_weights": routers}


def _curve(run_dir: Path, x: str) -> dict:
    """The run's logged training loss against `x` (flops or tokens)."""
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln]
    return {x: [ln[x] for ln in lines], "loss": [ln["loss"] for ln in lines]}


def _aggregate(r: dict) -> None:
    """A model's seed mean and per-seed values of the held-out and final training loss."""
    seeds = sorted(r["seeds"], key=int)
    for key in ("heldout_loss", "final_loss"):
        vals = [r["seeds"][s][key] for s in seeds]
        r[key], r[key + "_seeds"] = float(np.mean(vals)), vals
    r["seed_ids"] = [int(s) for s in seeds]


def scratch(cfg: LimeExperimentConfig) -> dict:
    """Train every (seed, routing) run (resuming), analyse the first seed; write summary.json's scratch section."""
    out, runs = Path(cfg.results_dir), Path(cfg.out_dir)
    train_NxT, heldout_NxT, table = _contexts(cfg)
    heldout_NxT = heldout_NxT[: max(cfg.heldout_contexts, cfg.entropy_contexts, cfg.probe_contexts)]
    from lime_jax.tokenizer import load_tokenizer
    tok = load_tokenizer()
    probe_ids = np.array([tok.encode(w, add_special_tokens=False).ids[0] for w in PROBE_WORDS])
    probe_ids = table[probe_ids] if table is not None else probe_ids
    if len(set(probe_ids.tolist())) != len(PROBE_WORDS):
        raise ValueError(f"the probe words {PROBE_WORDS} must keep distinct ids, got {probe_ids}")
    models: dict = {}
    for seed in cfg.seeds:  # seed-major: a pair of models is complete before the next seed starts
        for routing in cfg.routings:
            name = NAMES[routing]
            model_cfg = config.tiny(vocab=cfg.vocab_top or config.LlamaConfig().vocab, d_model=cfg.d_model,
                                    n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads,
                                    head_dim=cfg.head_dim, d_ff=cfg.d_ff, max_len=cfg.seq_len, routing=routing)
            run_dir = runs / f"{name}_seed{seed}"
            train_cfg = train.TrainConfig(seq_len=cfg.seq_len, batch_size=cfg.batch_size, num_steps=cfg.num_steps,
                                          lr=cfg.lr, warmup_steps=cfg.warmup_steps, seed=seed,
                                          log_every=cfg.log_every, checkpoint_every=10 * cfg.log_every,
                                          keep_checkpoints=1, eval_batches=math.ceil(cfg.heldout_contexts /
                                                                                     cfg.batch_size),
                                          out_dir=str(run_dir))
            print(f"== {name} seed {seed}: {model_cfg.num_params:,} params, "
                  f"{model_cfg.flops_per_token:.3e} FLOPs/token", flush=True)
            state = train.fit(model_cfg, train_cfg, train_NxT, heldout_NxT[: cfg.heldout_contexts])
            run = json.loads((run_dir / "summary.json").read_text())
            r = models.setdefault(name, {"num_params": run["num_params"], "flops": run["flops"],
                                         "tokens": run["tokens"], "seeds": {}})
            r["seeds"][str(seed)] = {"heldout_loss": run["heldout_loss"], "final_loss": run["final_loss"],
                                     "train_seconds": run["train_seconds"], "curve": _curve(run_dir, "flops")}
            if seed == cfg.seeds[0]:
                r.update(_analyse(jax.device_get(state.params), model_cfg, heldout_NxT, probe_ids, cfg),
                         analysis_seed=seed)
            _aggregate(r)
            print(json.dumps({"model": name, "seed": seed, **r["seeds"][str(seed)], "curve": None}), flush=True)
            _write_section(out, {"config": dataclasses.asdict(cfg), "models": models})
    return models


# ---------------------------------------------------------------- part=pretrained


def _base_model(cfg: LimeExperimentConfig) -> tuple[config.LlamaConfig, dict]:
    """SmolLM2-135M from its GGUF, or the tiny random-weight stand-in."""
    if cfg.pre_model == "smollm2":
        from lime_jax import gguf
        return gguf.load_smollm2()
    tiny_cfg = config.tiny(n_layers=cfg.pre_tiny_layers)
    return tiny_cfg, model.init(jax.random.key(0), tiny_cfg)


def _router_summary(params, model_cfg) -> dict:
    """The v2 heatmap (mean |w| per layer and source layer) and each layer's share of it on earlier layers."""
    w_LxL = analysis.router_weights(params, model_cfg)
    earlier = [float(w_LxL[layer, :layer].sum() / w_LxL[layer, : layer + 1].sum()) for layer in range(1, len(w_LxL))]
    return {"router_weights": w_LxL.round(6).tolist(), "earlier_share": [round(e, 6) for e in earlier]}


def _sequence_losses(params, model_cfg, tokens_NxT, bs) -> list[float]:
    """Mean next-token loss (nats) of each sequence: the unit of the paired comparisons between arms."""
    out = []
    for i in range(0, len(tokens_NxT), bs):
        toks = jax.numpy.asarray(tokens_NxT[i:i + bs])
        out.append(np.asarray(model.token_nll(model.apply(params, toks, model_cfg), toks).mean(-1)))
    return [round(float(x), 6) for x in np.concatenate(out)]


def _evaluate_state(params, model_cfg, general_NxT, code_NxT, entropy_NxT, bs) -> dict:
    """Held-out general and code losses (mean and per sequence) and values' entropy per layer of one model."""
    flat = model.unstack_layers(params, model_cfg)  # per-block weights: the forward reads them in place
    general, code = (_sequence_losses(flat, model_cfg, t, bs) for t in (general_NxT, code_NxT))
    return {"general_loss": float(np.mean(general)), "code_loss": float(np.mean(code)),
            "general_seq": general, "code_seq": code,
            "value_entropy": [round(e, 4) for e in analysis.value_entropy(flat, model_cfg, entropy_NxT, bs)]}


def pretrained(cfg: LimeExperimentConfig) -> dict:
    """Before: the base model's held-out losses and entropy; each arm trained (resuming) and measured after."""
    out, runs = Path(cfg.results_dir), Path(cfg.out_dir) / f"pretrained_{cfg.pre_model}"
    runs.mkdir(parents=True, exist_ok=True)
    T, bs, n = cfg.pre_seq_len, cfg.pre_batch_size, cfg.pre_eval_contexts
    base_cfg, base_params = _base_model(cfg)
    train_NxT = corpora.token_contexts("general", "train", T)
    general_NxT = np.asarray(corpora.token_contexts("general", "heldout", T)[:n])
    code_NxT = np.asarray(corpora.token_contexts("code", "heldout", T)[:n])
    entropy_NxT = general_NxT[: cfg.pre_entropy_contexts]
    section = {"config": {k: v for k, v in dataclasses.asdict(cfg).items() if k.startswith("pre_")},
               "model": dataclasses.asdict(base_cfg), "eval_tokens": int(n * (T - 1)), "arms": {}}

    before_file = runs / "before.json"
    if before_file.exists():
        section["before"] = json.loads(before_file.read_text())
    else:
        print(f"== before: {cfg.pre_model}, {base_cfg.num_params:,} params", flush=True)
        section["before"] = _evaluate_state(base_params, base_cfg, general_NxT, code_NxT, entropy_NxT, bs)
        before_file.write_text(json.dumps(section["before"], indent=1))
    print(json.dumps({"before": section["before"]}), flush=True)

    for arm in cfg.pre_arms:
        routing, trainable = ARMS[arm]
        run_dir, after_file = runs / arm, runs / arm / "after.json"
        if after_file.exists() and json.loads(after_file.read_text())["steps"] == cfg.pre_steps:
            section["arms"][arm] = json.loads(after_file.read_text())
            continue
        if routing == "none":
            model_cfg, init = base_cfg, base_params
        else:
            init, model_cfg = model.to_lime(base_params, base_cfg, routing)
        train_cfg = train.TrainConfig(seq_len=T, batch_size=bs, num_steps=cfg.pre_steps, lr=cfg.pre_lr,
                                      router_lr_mult=cfg.pre_router_lr / cfg.pre_lr,
                                      min_lr=min(cfg.pre_lr, train.TrainConfig.min_lr),
                                      warmup_steps=cfg.pre_warmup_steps, seed=cfg.pre_seed,
                                      log_every=cfg.pre_log_every, checkpoint_every=10 * cfg.pre_log_every,
                                      keep_checkpoints=1, eval_batches=1, trainable=trainable,
                                      out_dir=str(run_dir))
        print(f"== {arm}: routing {routing}, trainable {trainable}", flush=True)
        state = train.fit(model_cfg, train_cfg, train_NxT, general_NxT, init_params=init)
        run = json.loads((run_dir / "summary.json").read_text())
        params = state.params
        result = {"routing": routing, "trainable": trainable, "steps": cfg.pre_steps, "tokens": run["tokens"],
                  "train_seconds": run["train_seconds"],
                  "trainable_params": {"router": model_cfg.router_entries, "all": model_cfg.num_params,
                                       "router_current": model_cfg.n_kv_heads ** 2 * (model_cfg.n_layers - 1),
                                       }[trainable],
                  **_evaluate_state(params, model_cfg, general_NxT, code_NxT, entropy_NxT, bs),
                  "curve": _curve(run_dir, "tokens")}
        if routing != "none":
            result.update(_router_summary(params, model_cfg))
        after_file.write_text(json.dumps(result, indent=1))
        section["arms"][arm] = result
        print(json.dumps({arm: {k: v for k, v in result.items() if k not in ("curve", "router_weights")}}), flush=True)
        _write_section(out, {"pretrained": section})
    _write_section(out, {"pretrained": section})
    return section


# ---------------------------------------------------------------- summary.json, report.md, PNGs


def _write_section(out: Path, section: dict) -> None:
    """Merge `section` into out/summary.json (the other part's keys stay) and rebuild report.md and the PNGs.

    Both parts may run at once: the read-merge-write holds an exclusive lock on the file, so neither drops the
    other's latest section.
    """
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "summary.json", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        text = f.read()
        summary = {**(json.loads(text) if text.strip() else {}), **section}
        f.seek(0)
        f.truncate()
        f.write(json.dumps(summary, indent=1))
        f.flush()
        render(out, summary)


def _scratch_plots(summary: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = summary["models"]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for i, (name, r) in enumerate(models.items()):
        color = f"C{i}"
        for j, s in enumerate(r["seed_ids"]):
            c = r["seeds"][str(s)]["curve"]
            style = dict(color=color, ls=("-", "--", ":", "-.")[j % 4], label=f"{name} seed {s}")
            axes[0].plot(c["flops"], c["loss"], **style)
            half = len(c["flops"]) // 2
            axes[1].plot(c["flops"][half:], c["loss"][half:], **style)
        axes[2].plot(r["value_entropy"], marker=".", color=color, label=name)
        axes[3].plot(r["probe_accuracy"], marker=".", color=color, label=name)
    axes[0].set(xlabel="training FLOPs", ylabel="train loss (nats, mean over log interval)", title="loss vs FLOPs")
    axes[1].set(xlabel="training FLOPs", ylabel="train loss (nats)", title="second half, zoomed")
    seed0 = next(iter(models.values())).get("analysis_seed", 0)
    axes[2].set(xlabel="layer", ylabel="Rényi-0.5 entropy of values (nats)",
                title=f"values' matrix entropy (seed {seed0})")
    axes[3].set(xlabel="layer", ylabel="5-fold accuracy (chance 0.25)", title=f"is/are/was/were probe (seed {seed0})")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_entropy_probe.png", dpi=70)
    plt.close(fig)

    routed = [n for n in models if models[n].get("router_weights") is not None]
    if routed:
        fig, axes = plt.subplots(1, len(routed), figsize=(4.5 * len(routed), 4), squeeze=False)
        for ax, name in zip(axes[0], routed):
            im = ax.imshow(np.array(models[name]["router_weights"]), cmap="viridis")
            ax.set(xlabel="source layer j", ylabel="layer l", title=name + (" (mean |w|)" if name == "lime_v2" else ""))
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        fig.savefig(out / "router_weights.png", dpi=70)
        plt.close(fig)


def _scratch_report(summary: dict) -> list[str]:
    cfg, models = summary["config"], summary["models"]
    tokens = cfg["num_steps"] * cfg["batch_size"] * cfg["seq_len"]
    vocab = (f"vocabulary {cfg['vocab_top']} (the most frequent SmolLM2 tokens, the rest merged into one id)"
             if cfg["vocab_top"] else f"the full SmolLM2 vocabulary ({config.LlamaConfig().vocab:,}, tied embeddings)")
    first = next(iter(models.values()))
    lines = [
        "# LIMe at CPU scale", "",
        "## From scratch: Llama vs LIMe, seeds", "",
        f"Model: {cfg['n_layers']} layers, d_model {cfg['d_model']}, {cfg['n_heads']} heads x {cfg['head_dim']} "
        f"(MHA), d_ff {cfg['d_ff']}, {vocab}. Training: {cfg['num_steps']} steps x {cfg['batch_size']} sequences x "
        f"{cfg['seq_len']} tokens = {tokens:,} tokens of the general corpus per run; seeds "
        f"{', '.join(map(str, cfg['seeds']))}: within a seed every model starts from the same key and reads the same "
        f"contexts in the same order. AdamW lr {cfg['lr']} (routers 10x), cosine, warm-up {cfg['warmup_steps']}. "
        f"Held-out loss over {cfg['heldout_contexts']} held-out sequences "
        f"({cfg['heldout_contexts'] * (cfg['seq_len'] - 1):,} predicted tokens, the same for every run). "
        f"Analyses on seed {first.get('analysis_seed', 0)}: entropy over {cfg['entropy_contexts']} sequences; probe on "
        f"the value vectors of {'/'.join(w.strip() for w in PROBE_WORDS)} tokens (balanced: the first n of each word, "
        f"n = the rarest word's count) in {cfg['probe_contexts']} held-out sequences.", "",
        "| model | params | training FLOPs | held-out loss, seed mean | per seed | final train loss (mean) | "
        "mean value entropy | probe acc. (mean over layers / last) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in models.items():
        per_seed = ", ".join(f"{v:.4f}" for v in r["heldout_loss_seeds"])
        lines.append(f"| {name} | {r['num_params']:,} | {r['flops']:.3e} | {r['heldout_loss']:.4f} | {per_seed} | "
                     f"{r['final_loss']:.4f} | {np.mean(r['value_entropy']):.3f} | "
                     f"{np.mean(r['probe_accuracy']):.3f} / {r['probe_accuracy'][-1]:.3f} |")
    lines += ["", f"Final train loss: mean over the last log interval. Probe: {first['probe_examples']} balanced "
              "examples, 5-fold CV, chance 0.25.", "",
              "![loss vs FLOPs per seed, entropy, probe](loss_entropy_probe.png)", ""]
    if any(r.get("router_weights") is not None for r in models.values()):
        lines += ["![router weights](router_weights.png)", ""]
    base = models.get("llama")
    if base is None:
        return lines
    lines += ["### Does LIMe reach lower held-out loss per FLOP here?", ""]
    lime = {n: r for n, r in models.items() if n != "llama"}
    for name, r in lime.items():
        common = [s for s in r["seed_ids"] if s in base["seed_ids"]]
        diffs = [r["seeds"][str(s)]["heldout_loss"] - base["seeds"][str(s)]["heldout_loss"] for s in common]
        spread = [max(x["heldout_loss_seeds"]) - min(x["heldout_loss_seeds"]) for x in (r, base)
                  if len(x["heldout_loss_seeds"]) > 1]
        lines.append(f"- {name}: held-out loss minus Llama's on the same seed: "
                     f"{', '.join(f'{d:+.4f} (seed {s})' for d, s in zip(diffs, common))}; mean {np.mean(diffs):+.4f} "
                     f"nats at {100 * (r['flops'] / base['flops'] - 1):+.2f}% training FLOPs"
                     + (f"; seed-to-seed spread of either model up to {max(spread):.4f}." if spread else "."))
        if len(diffs) > 1:
            same_sign = all(d < 0 for d in diffs) or all(d > 0 for d in diffs)
            beyond = abs(np.mean(diffs)) > max(spread) if spread else False
            verdict = ("lower" if np.mean(diffs) < 0 else "higher")
            where = (f"ends {verdict} than Llama on every seed" if same_sign
                     else f"ends {verdict} than Llama on average, but not on every seed")
            lines.append(f"  **{name} {where}; the mean difference is "
                         f"{'larger' if beyond else 'smaller'} than the seed-to-seed spread**"
                         + (f" (the same sign on all {len(diffs)} seeds, which two equally good models would also "
                            f"show with probability {2.0 ** (1 - len(diffs)):.2f})." if same_sign
                            else " (not a consistent effect)."))
    lines += ["", "### Representations (first seed)", "",
              "Values' matrix entropy (mean over layers) and the is/are/was/were probe (mean over layers), LIMe minus "
              "Llama:"]
    for name, r in lime.items():
        d_entropy = np.mean(r["value_entropy"]) - np.mean(base["value_entropy"])
        d_probe = np.mean(r["probe_accuracy"]) - np.mean(base["probe_accuracy"])
        # The paper reports LIMe's values with more entropy and more token identity (probe) than Llama's.
        agree = [what for what, d in (("entropy", d_entropy), ("probe", d_probe)) if d > 0]
        other = [what for what in ("entropy", "probe") if what not in agree]
        verdict = ("the paper's direction on both" if not other else "neither in the paper's direction" if not agree
                   else f"the paper's direction on {agree[0]}, not on {other[0]}")
        lines.append(f"- {name}: entropy {d_entropy:+.3f} nats, probe {d_probe:+.3f} ({verdict}).")
    lines += ["", "LIMe's routed values can read earlier layers' states directly (layer 0's source is the normalised "
              "token embedding), which is how the paper explains their higher entropy and token identity; the static "
              "router starts near-uniform over depth and its heatmap shows how far it moved.", ""]
    return lines


def _pretrained_plots(pre: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms, before = pre["arms"], pre["before"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    base = arms.get("smollm2_all")
    for i, (arm, r) in enumerate(arms.items()):
        c = r["curve"]
        axes[0].plot(c["tokens"], c["loss"], color=f"C{i}", label=arm)
        if base is not None and arm != "smollm2_all" and base["curve"]["tokens"] == c["tokens"]:
            axes[1].plot(c["tokens"], np.array(c["loss"]) - np.array(base["curve"]["loss"]), color=f"C{i}", label=arm)
        axes[2].plot(np.array(r["value_entropy"]) - np.array(before["value_entropy"]), marker=".", color=f"C{i}",
                     label=arm)
    axes[0].set(xlabel="training tokens", ylabel="train loss (nats, mean over log interval)", title="training loss")
    axes[1].axhline(0, color="k", lw=0.5)
    axes[1].set(xlabel="training tokens", ylabel="nats", title="train loss minus smollm2_all's (same batches)")
    axes[2].axhline(0, color="k", lw=0.5)
    axes[2].set(xlabel="layer", ylabel="nats", title="values' entropy: after minus before")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "pretrained.png", dpi=70)
    plt.close(fig)

    routed = [a for a, r in arms.items() if "router_weights" in r]
    if routed:
        fig, axes = plt.subplots(1, len(routed), figsize=(5 * len(routed), 4.2), squeeze=False)
        for ax, arm in zip(axes[0], routed):
            w_LxL = np.array(arms[arm]["router_weights"])
            L = len(w_LxL)
            w_LxL[np.arange(L), np.arange(L)] = np.nan  # the current layer (identity at the start) hides the rest
            w_LxL[np.triu_indices(L, 1)] = np.nan
            im = ax.imshow(w_LxL, cmap="viridis")
            ax.set(xlabel="source layer j", ylabel="layer l", title=f"{arm}: mean |w|, earlier layers")
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        fig.savefig(out / "pretrained_routers.png", dpi=70)
        plt.close(fig)


def _pretrained_report(pre: dict) -> list[str]:
    c, before, arms = pre["config"], pre["before"], pre["arms"]
    tokens = c["pre_steps"] * c["pre_batch_size"] * c["pre_seq_len"]
    name = "SmolLM2-135M" if c["pre_model"] == "smollm2" else f"the tiny random-weight stand-in ({c['pre_model']})"
    lines = [
        "## LIMe retrofitted onto pretrained SmolLM2-135M", "",
        f"{name} ({pre['model']['n_layers']} layers, {pre['model']['n_kv_heads']} KV heads) converted to LIMe v2 with "
        "`model.to_lime` (routers reading only the current layer: the converted model gives SmolLM2's logits, "
        "`tests/test_lime.py::test_smollm2_converted_to_lime_gives_its_own_logits`; v2 because that is exact *and* "
        "linear in the router, so every router entry gets a full gradient from step 0, where a v1 softmax router "
        f"started near one-hot is saturated and barely learns). {len(arms)} arms on the same general-corpus tokens "
        f"in the same order: {c['pre_steps']} steps x {c['pre_batch_size']} x {c['pre_seq_len']} = {tokens:,} "
        "tokens each; "
        f"AdamW (β 0.9/0.95, weight decay 0.1 on matrices), peak lr {c['pre_lr']} for pretrained weights and "
        f"{c['pre_router_lr']} for the routers "
        f"({c['pre_router_lr'] / c['pre_lr']:.0f}x: they start at the identity and have "
        f"only these few steps to move), warm-up {c['pre_warmup_steps']} steps, cosine, clip 1.0. Held-out loss on "
        f"{c['pre_eval_contexts']} sequences of each corpus ({pre['eval_tokens']:,} predicted tokens, the same for "
        f"every arm); values' entropy over {c['pre_entropy_contexts']} general sequences. The converted model's "
        "'before' is SmolLM2's (same logits, same values).", "",
        "| arm | trained params | general loss (before → after, Δ) | code loss (before → after, Δ) | "
        "mean value entropy Δ | final train loss | train time |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, r in arms.items():
        dg, dc = r["general_loss"] - before["general_loss"], r["code_loss"] - before["code_loss"]
        de = np.mean(r["value_entropy"]) - np.mean(before["value_entropy"])
        lines.append(f"| {arm} | {r['trainable_params']:,} | {before['general_loss']:.4f} → {r['general_loss']:.4f} "
                     f"({dg:+.4f}) | {before['code_loss']:.4f} → {r['code_loss']:.4f} ({dc:+.4f}) | {de:+.4f} | "
                     f"{r['curve']['loss'][-1]:.4f} | {r['train_seconds'] / 60:.1f} min |")
    lines += ["", "![training loss, paired difference to plain SmolLM2, entropy change](pretrained.png)", ""]
    routed = {a: r for a, r in arms.items() if "earlier_share" in r}
    if routed:
        lines += ["![routers' learned weights on earlier layers](pretrained_routers.png)", "",
                  "Router weights on earlier layers (mean |w| of each source layer's K x K block; the current layer "
                  "starts at the identity, mean |w| = 1/K): the share of each layer's router mass on earlier "
                  "layers, mean over layers / max:"]
        for arm, r in routed.items():
            lines.append(f"- {arm}: {np.mean(r['earlier_share']):.4f} / {np.max(r['earlier_share']):.4f} "
                         f"(layer {1 + int(np.argmax(r['earlier_share']))})")
        lines.append("")
    lines += _verdict(before, arms)
    return lines


def _paired(a: list[float], b: list[float]) -> str:
    """Mean and standard error of the per-sequence differences a - b (the same held-out sequences)."""
    d = np.asarray(a) - np.asarray(b)
    se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    return f"{d.mean():+.4f} ± {se:.4f}"


def _verdict(before: dict, arms: dict) -> list[str]:
    """The paired comparisons the verdict rests on: each arm against before, each LIMe arm against plain SmolLM2."""
    lines = ["### Paired comparisons on the same held-out sequences (mean ± standard error over sequences, nats)", ""]
    for arm, r in arms.items():
        lines.append(f"- {arm} after minus before: general {_paired(r['general_seq'], before['general_seq'])}, "
                     f"code {_paired(r['code_seq'], before['code_seq'])}.")
    base = arms.get("smollm2_all")
    for arm, r in arms.items():
        if base is not None and arm != "smollm2_all":
            lines.append(f"- {arm} minus smollm2_all, after training: general "
                         f"{_paired(r['general_seq'], base['general_seq'])}, code "
                         f"{_paired(r['code_seq'], base['code_seq'])}.")
    if "lime_v2_router" in arms and "lime_v2_router_current" in arms:
        a, b = arms["lime_v2_router"], arms["lime_v2_router_current"]
        lines.append(f"- lime_v2_router minus lime_v2_router_current (what reading earlier layers adds): general "
                     f"{_paired(a['general_seq'], b['general_seq'])}, code {_paired(a['code_seq'], b['code_seq'])}.")
    return lines + [""]


def render(out: Path, summary: dict | None = None) -> None:
    """report.md and the PNGs from `summary` (default: out/summary.json), of either part or both."""
    summary = json.loads((out / "summary.json").read_text()) if summary is None else summary
    lines = []
    if "models" in summary:
        _scratch_plots(summary, out)
        lines += _scratch_report(summary)
    if "pretrained" in summary and summary["pretrained"].get("arms"):
        _pretrained_plots(summary["pretrained"], out)
        lines += _pretrained_report(summary["pretrained"])
    verdict = out / "verdict.md"  # the hand-written reading of the numbers, kept beside the generated report
    if verdict.exists():
        lines += [verdict.read_text()]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    cfg = configlib.parse(LimeExperimentConfig(), argv)
    if cfg is None:
        return 0
    if cfg.part == "scratch":
        scratch(cfg)
    elif cfg.part == "pretrained":
        pretrained(cfg)
    else:
        if not (Path(cfg.results_dir) / "summary.json").exists():
            raise FileNotFoundError(f"part=report needs {Path(cfg.results_dir) / 'summary.json'}")
        render(Path(cfg.results_dir))
    return 0


if __name__ == "__main__":
    sys.exit(configlib.run(main, prog="python -m experiments.lime"))
