"""`jaxsae harvest`: run a language model over a corpus and write one resumable activation cache per layer.

The model is any `jaxsae.adapter.ModelAdapter` (`model=smollm2-135m`, the default, or `model=pkg.mod:factory`).

Contexts are harvested in order, so a cache holds the rows of contexts [0, n) of
`token_contexts(corpus, split, ctx_len)`; it keeps those contexts beside its shards (`contexts.npy`), so
the CE splice reads the very tokens whose activations are cached even after the corpus is rebuilt, and
the manifest records a hash of the whole token array (a cache is only extended from the same one). Two kinds of
rows are left out, both attention sinks with norms ~100x the rest (15,000 against a median of 150): the first
`skip_first` positions of every context, and `<|endoftext|>` tokens (`exclude_tokens`; the packer puts one
between documents). Which rows are kept is a function of the tokens alone, so after a kill the committed
row count of a cache says exactly where it resumes.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import jax
import numpy as np
from tqdm import tqdm

from jaxsae import adapter, configlib, distributed
from jaxsae.adapter import ModelAdapter, kept_positions
from jaxsae.data import _DTYPES, MANIFEST, CacheWriter, _write_json_atomic, add_shard, open_manifest, read_shard, shard_name, \
    shard_sums, write_shard

CONTEXTS = "contexts.npy"
HOOK = "resid_post"


@dataclasses.dataclass(frozen=True)
class HarvestConfig:
    corpus: str = "general"  # corpus name: general, code, russian or german
    split: str = "train"  # corpus split: train or heldout
    num_tokens: int = 300_000  # activation rows per layer (rounded up to the end of a context)
    layers: tuple[int, ...] = (14,)  # residual stream after block l (0-based); one forward feeds every layer
    ctx_len: int = 256  # tokens per context
    skip_first: int | None = None  # leading positions of every context left out; None: the model's own (4 for SmolLM2)
    exclude_tokens: tuple[int, ...] | None = None  # token ids whose rows are left out; None: the model's own ((0,))
    batch_size: int = 16  # contexts per model forward
    shard_tokens: int = 32_768  # rows per .npy shard (a killed harvest loses at most one shard's work)
    dtype: str = "float16"  # storage dtype: float16 or bfloat16
    model: str = "smollm2-135m"  # a model registered with jaxsae (smollm2-135m, tiny) or a "module:factory" spec
    root: str = "cache/acts"  # caches go to {root}/{model}/L{layer}/{corpus}_{split}/
    tokens: str = ""  # harvest these token contexts instead of the corpus (.npy of int [N, ctx_len])


def cache_dir(corpus: str, split: str, layer: int = 14, root: str = "cache/acts", model: str = "smollm2-135m") -> Path:
    """Where the cache of one (model, layer, corpus, split) lives."""
    return Path(root) / model / f"L{layer}" / f"{corpus}_{split}"


def tokens_sha256(tokens_NxT: np.ndarray) -> str:
    """Hash of a token array, recorded in the manifest so evaluation can check it reads the same contexts."""
    return hashlib.sha256(np.ascontiguousarray(tokens_NxT, np.int32).tobytes()).hexdigest()


def load_model(name: str) -> ModelAdapter:
    """The adapter of a registered model name or "module:factory" spec (see `jaxsae.adapter.load`)."""
    return adapter.load(name)


def _masking(cfg: HarvestConfig, model: ModelAdapter) -> tuple[int, tuple[int, ...]]:
    """(skip_first, exclude_tokens): the config's overrides, else the model's own."""
    skip = model.skip_first if cfg.skip_first is None else cfg.skip_first
    exclude = model.exclude_tokens if cfg.exclude_tokens is None else cfg.exclude_tokens
    return skip, tuple(exclude)


def _check(cfg: HarvestConfig, model: ModelAdapter, tokens_NxT: np.ndarray) -> np.ndarray:
    """Validate everything before a file is touched; returns the cumulative kept rows [N + 1] per context."""
    bad = [l for l in cfg.layers if not 0 <= l < model.n_layers]
    if not cfg.layers or bad:
        raise ValueError(f"layers {list(cfg.layers)} must be non-empty and in [0, {model.n_layers})")
    skip_first, exclude_tokens = _masking(cfg, model)
    if not 0 <= skip_first < cfg.ctx_len:
        raise ValueError(f"skip_first={skip_first} must be in [0, ctx_len={cfg.ctx_len})")
    if cfg.num_tokens < 1 or cfg.batch_size < 1 or cfg.shard_tokens < 1:
        raise ValueError(f"num_tokens, batch_size and shard_tokens must be >= 1, got {cfg}")
    if tokens_NxT.ndim != 2 or tokens_NxT.shape[0] == 0 or tokens_NxT.shape[1] != cfg.ctx_len:
        raise ValueError(f"corpus {cfg.corpus}/{cfg.split}: need int tokens [N >= 1, {cfg.ctx_len}], "
                         f"got shape {tokens_NxT.shape}")
    kept_N = kept_positions(np.asarray(tokens_NxT), skip_first, exclude_tokens).sum(1)
    cum_rows = np.concatenate([[0], np.cumsum(kept_N)])
    if cum_rows[-1] < cfg.num_tokens:
        raise ValueError(f"corpus {cfg.corpus}/{cfg.split} has {cum_rows[-1]} usable rows in {len(tokens_NxT)} "
                         f"contexts; num_tokens={cfg.num_tokens} asks for more")
    return cum_rows


def _lock(path: Path):
    """An exclusive lock on a cache directory, so two processes never append to the same cache."""
    path.mkdir(parents=True, exist_ok=True)
    f = open(path / ".lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"[harvest] {path} is being written by another process; waiting for it", file=sys.stderr, flush=True)
        fcntl.flock(f, fcntl.LOCK_EX)
    return f


def _write_contexts(out_dirs: Mapping[int, str | os.PathLike], tokens_NxT: np.ndarray, n_ctx: int) -> None:
    """Each cache's contexts.npy, written before any of their rows (kept when it already covers n_ctx)."""
    for path in out_dirs.values():
        old = Path(path) / CONTEXTS
        if not old.is_file() or len(np.load(old, mmap_mode="r")) < n_ctx:
            tmp = Path(path) / (CONTEXTS + ".tmp")
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(tokens_NxT[:n_ctx], np.int32))
            os.replace(tmp, old)


def shards_of(done: int, end: int, shard_tokens: int) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) of the shards that take a cache from `done` to `end` rows."""
    return [(r0, min(r0 + shard_tokens, end)) for r0 in range(done, end, shard_tokens)]


def check_processes(cfg: HarvestConfig, num_processes: int, new_rows: int | None = None) -> None:
    """A harvest split over processes by shard needs at least one new shard per process."""
    rows = cfg.num_tokens if new_rows is None else new_rows
    shards = -(-rows // cfg.shard_tokens)
    if num_processes > 1 and 0 < shards < num_processes:
        raise ValueError(f"{rows} new rows make {shards} shard(s) of shard_tokens={cfg.shard_tokens}, fewer than "
                         f"num_processes={num_processes}: each process writes whole shards; lower shard_tokens")


def _harvest_split(model: ModelAdapter, tokens_NxT: np.ndarray, cfg: HarvestConfig, out_dirs: dict[int, Path],
                   fields: dict, cum_rows: np.ndarray, n_ctx: int) -> dict[int, dict]:
    """`harvest` over several processes: new shard j of every layer is written by process j % P, which runs the
    model only on the contexts holding its rows; process 0 writes contexts.npy and, after all shards, the manifests.

    Shard boundaries, contents and manifest sums are those of a one-process harvest (the same forward batches, the
    same float64 sums in shard order). A killed run resumes: a complete shard file already on disk is kept.
    """
    P, me, D, dtype = jax.process_count(), jax.process_index(), model.d_model, cfg.dtype
    skip_first, exclude_tokens = _masking(cfg, model)
    layers, end = sorted(out_dirs), int(cum_rows[n_ctx])
    manifests = {l: open_manifest(out_dirs[l], dict(fields, layer=l), D, dtype) for l in layers}
    done = {l: int(m["num_tokens"]) for l, m in manifests.items()}
    for l, rows in done.items():
        if rows > cum_rows[-1]:
            raise ValueError(f"{out_dirs[l]} holds {rows} rows, more than these tokens give ({cum_rows[-1]})")
    plan = {l: shards_of(done[l], end, cfg.shard_tokens) for l in layers}  # the new shards, j = 0, 1, ...
    check_processes(cfg, P, max(end - min(done.values()), 0))
    first = {l: len(manifests[l]["shards"]) for l in layers}  # file index of new shard 0
    for path in out_dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    locks = [_lock(out_dirs[l]) for l in layers] if me == 0 else []
    if me == 0:
        _write_contexts(out_dirs, tokens_NxT, n_ctx)

    written = {}  # (layer, j) -> (num_tokens, size, sum_D, sum_sq) of this process's shards
    todo = {}  # (layer, j) -> (r0, r1, parts) still to forward
    for l in layers:
        for j, (r0, r1) in enumerate(plan[l]):
            if j % P != me:
                continue
            x = read_shard(out_dirs[l], first[l] + j, r1 - r0, D, dtype)  # left by a killed run
            if x is None:
                todo[l, j] = (r0, r1, [])
            else:
                written[l, j] = (r1 - r0, (out_dirs[l] / shard_name(first[l] + j)).stat().st_size,
                                 *shard_sums(x))
    forward = jax.jit(lambda params, tokens_BxT: model.residuals(params, tokens_BxT, tuple(layers)))
    start = int(np.searchsorted(cum_rows, min(done.values()), side="right")) - 1  # the one-process batch grid
    t0 = time.time()
    for c0 in range(start, n_ctx, cfg.batch_size):
        c1 = min(c0 + cfg.batch_size, n_ctx)
        a, b = int(cum_rows[c0]), int(cum_rows[c1])
        wanted = [key for key, (r0, r1, _) in todo.items() if r0 < b and r1 > a]
        if not wanted:
            continue
        batch_BxT = np.asarray(tokens_NxT[c0:c1], np.int32)
        keep_BxT = kept_positions(batch_BxT, skip_first, exclude_tokens)
        if len(batch_BxT) < cfg.batch_size:  # pad the last batch: one compiled shape for the whole run
            batch_BxT = np.concatenate([batch_BxT, np.repeat(batch_BxT[:1], cfg.batch_size - len(batch_BxT), 0)])
        h = forward(model.params, batch_BxT)
        for l, j in wanted:
            r0, r1, parts = todo[l, j]
            parts.append(np.asarray(h[l][: c1 - c0])[keep_BxT][max(r0, a) - a : min(r1, b) - a])
            if sum(len(p) for p in parts) == r1 - r0:
                x = _stored(np.concatenate(parts), dtype)
                entry, sum_D, sum_sq = write_shard(out_dirs[l], first[l] + j, x, dtype)
                written[l, j] = (entry["num_tokens"], entry["size"], sum_D, sum_sq)
                del todo[l, j]
    seconds = time.time() - t0

    # Every shard's length, size and float64 sums, from the process that wrote it (bit for bit: a byte gather).
    for l in layers:
        if not plan[l]:  # nothing new for this layer, on every process alike
            continue
        table = np.zeros((len(plan[l]), D + 3), np.float64)
        for (layer, j), (n, size, sum_D, sum_sq) in written.items():
            if layer == l:
                table[j] = [n, size, sum_sq, *sum_D]
        table = distributed.gather(table)
        for j in range(len(plan[l])):
            n, size, sum_sq, *sum_D = table[j % P, j]
            add_shard(manifests[l], {"file": shard_name(first[l] + j), "num_tokens": int(n), "size": int(size)},
                      np.asarray(sum_D), float(sum_sq))
        if me == 0:
            _write_json_atomic(out_dirs[l] / MANIFEST, manifests[l])
    distributed.barrier("jaxsae.harvest: manifests written")
    for f in locks:
        f.close()
    if me == 0:
        print(json.dumps({"harvest": f"{cfg.corpus}_{cfg.split}", "layers": layers, "contexts": n_ctx, "rows": end,
                          "processes": P, "seconds": round(seconds, 1)}), flush=True)
    return manifests


def _stored(x_NxD: np.ndarray, dtype: str) -> np.ndarray:
    """Rows cast to the cache's storage dtype, as CacheWriter.add casts them; an error for overflow."""
    with np.errstate(over="ignore"):
        x = np.asarray(x_NxD).astype(_DTYPES[dtype])
    if not np.isfinite(x.astype(np.float32)).all():
        raise ValueError(f"harvest: non-finite activations after casting to {dtype}")
    return x


def harvest(model: ModelAdapter, tokens_NxT: np.ndarray, cfg: HarvestConfig,
            out_dirs: Mapping[int, str | os.PathLike] | None = None) -> dict[int, dict]:
    """Write (or resume, or extend) the kept rows of the fewest first contexts that give num_tokens rows.

    Returns {layer: manifest}. Every layer's cache resumes from its own committed row count.
    """
    cum_rows = _check(cfg, model, tokens_NxT)
    skip_first, exclude_tokens = _masking(cfg, model)
    n_ctx = int(np.searchsorted(cum_rows, cfg.num_tokens))  # first n with cum_rows[n] >= num_tokens
    layers = tuple(sorted(set(cfg.layers)))
    if out_dirs is None:
        out_dirs = {l: cache_dir(cfg.corpus, cfg.split, l, cfg.root, model.name) for l in layers}
    if set(out_dirs) != set(layers):
        raise ValueError(f"out_dirs names layers {sorted(out_dirs)}, config asks for {list(layers)}")
    fields = {"model": model.name, "hook": HOOK, "corpus": cfg.corpus, "split": cfg.split, "ctx_len": cfg.ctx_len,
              "skip_first": skip_first, "exclude_tokens": list(exclude_tokens),
              "contexts": "the kept rows of the first contexts, in order (see jaxsae.harvest.cache_contexts)",
              "tokens_sha256": tokens_sha256(tokens_NxT)}
    if jax.process_count() > 1:
        return _harvest_split(model, tokens_NxT, cfg, {l: Path(out_dirs[l]) for l in layers}, fields, cum_rows, n_ctx)
    locks = [_lock(Path(out_dirs[l])) for l in layers]
    writers = {l: CacheWriter(out_dirs[l], dict(fields, layer=l), model.d_model, cfg.dtype, cfg.shard_tokens)
               for l in layers}
    _write_contexts(out_dirs, tokens_NxT, n_ctx)
    done = {l: w.num_tokens for l, w in writers.items()}  # rows committed; global row r belongs to context c
    for l, rows in done.items():  # with cum_rows[c] <= r < cum_rows[c + 1]
        if rows > cum_rows[-1]:
            raise ValueError(f"{out_dirs[l]} holds {rows} rows, more than these tokens give ({cum_rows[-1]})")
    start = int(np.searchsorted(cum_rows, min(done.values()), side="right")) - 1
    forward = jax.jit(lambda params, tokens_BxT: model.residuals(params, tokens_BxT, layers))
    t0 = time.time()
    bar = tqdm(total=int(cum_rows[n_ctx]), initial=int(min(min(done.values()), cum_rows[n_ctx])), unit="tok",
               unit_scale=True, desc=f"harvest {cfg.corpus}/{cfg.split} L{','.join(map(str, layers))}", mininterval=5)
    for c0 in range(start, n_ctx, cfg.batch_size):
        c1 = min(c0 + cfg.batch_size, n_ctx)
        batch_BxT = np.asarray(tokens_NxT[c0:c1], np.int32)
        keep_BxT = kept_positions(batch_BxT, skip_first, exclude_tokens)
        if len(batch_BxT) < cfg.batch_size:  # pad the last batch: one compiled shape for the whole run
            batch_BxT = np.concatenate([batch_BxT, np.repeat(batch_BxT[:1], cfg.batch_size - len(batch_BxT), 0)])
        h = forward(model.params, batch_BxT)
        for l, w in writers.items():
            skip = done[l] - cum_rows[c0]  # rows of this batch a layer's cache got before a kill
            if skip < cum_rows[c1] - cum_rows[c0]:
                w.add(np.asarray(h[l][: c1 - c0])[keep_BxT][max(skip, 0) :])
        bar.update(int(cum_rows[c1] - max(cum_rows[c0], min(done.values()))))
    bar.close()
    seconds = time.time() - t0
    manifests = {}
    for l, w in writers.items():
        w.close()
        manifests[l] = w.manifest
    for f in locks:
        f.close()
    new_tokens = max(0, n_ctx - start) * cfg.ctx_len
    print(json.dumps({"harvest": f"{cfg.corpus}_{cfg.split}", "layers": list(layers), "contexts": n_ctx,
                      "rows": int(cum_rows[n_ctx]), "resumed_from_context": start, "seconds": round(seconds, 1),
                      "model_tokens_per_s": round(new_tokens / max(seconds, 1e-9), 1)}), flush=True)
    return manifests


def cache_tokens(path: str | os.PathLike) -> int:
    """Rows committed to the cache at `path` (0 when there is none)."""
    manifest = Path(path) / MANIFEST
    return int(json.loads(manifest.read_text())["num_tokens"]) if manifest.is_file() else 0


def cache_contexts(path: str | os.PathLike) -> np.ndarray:
    """The token contexts [n, ctx_len] all of whose kept rows the cache at `path` holds."""
    m = json.loads((Path(path) / MANIFEST).read_text())
    contexts_NxT = np.load(Path(path) / CONTEXTS)
    kept_N = kept_positions(contexts_NxT, m["skip_first"], m["exclude_tokens"]).sum(1)
    n = int(np.searchsorted(np.cumsum(kept_N), m["num_tokens"], side="right"))
    return contexts_NxT[:n]


def ensure_cache(corpus: str, split: str, num_tokens: int, layer: int = 14, **overrides) -> Path:
    """The cache directory of (corpus, split, layer), harvested (or extended) first if it holds < num_tokens."""
    cfg = HarvestConfig(corpus=corpus, split=split, num_tokens=num_tokens, layers=(layer,), **overrides)
    path = cache_dir(corpus, split, layer, cfg.root, cfg.model)
    if cache_tokens(path) < num_tokens:
        model = load_model(cfg.model)
        harvest(model, corpus_tokens(model, cfg), cfg, {layer: path})
    return path


def corpus_tokens(model: ModelAdapter, cfg: HarvestConfig) -> np.ndarray:
    """The model's token contexts of cfg.corpus/cfg.split; an error for a model that ships no corpora."""
    if model.token_contexts is None:
        raise ValueError(f"model {model.name!r} has no named corpora; call harvest() with your own tokens")
    return model.token_contexts(cfg.corpus, cfg.split, cfg.ctx_len)


def main(argv: Sequence[str] | None = None) -> int:
    """`jaxsae harvest [key=value ...]`: fields of HarvestConfig and DistConfig (several processes split the shards)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = [HarvestConfig(), distributed.DistConfig()]
    if any(a in ("-h", "--help", "help") for a in argv):
        print("usage: jaxsae harvest [key=value ...]\n" + "\n\n".join(configlib.help_text(c) for c in defaults))
        return 0
    harvest_argv, dist_argv = configlib.split_argv(argv, defaults)
    cfg = configlib.override(HarvestConfig(), harvest_argv)
    dist_cfg = configlib.override(distributed.DistConfig(), dist_argv)
    distributed.check(dist_cfg)
    check_processes(cfg, dist_cfg.num_processes)
    distributed.initialize(dist_cfg)
    model = load_model(cfg.model)
    tokens = np.load(cfg.tokens, mmap_mode="r") if cfg.tokens else corpus_tokens(model, cfg)
    harvest(model, tokens, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(configlib.run(main, prog="python -m jaxsae.harvest"))
