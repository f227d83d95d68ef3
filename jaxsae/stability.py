"""Seed stability of SAE features: best-match cosines, per-feature stability, Hungarian matching, PW-MCC,
principal angles between the spans of feature sets, and greedy pooling of unique features across seeds.

Everything works on plain direction arrays (decoder rows `W_dec_MxD`, encoder columns `W_enc_DxM.T`);
signs are ignored (|cosine|) and rows are normalised here, so unnormalised dictionaries are fine.

Stability of feature i of seed s (Paulo & Belrose 2025; our reading of Gerasimov et al. 2026):
  p_i = (1 / (S − 1)) · #{s′ ≠ s : max_j |cos(d_i, d′_j)| ≥ τ},
and with the encoder requirement the partner j must agree on both sides: max_j min(|cos_dec|, |cos_enc|) ≥ τ.

The S·(S−1)/2 seed pairs are compared blockwise: one [block, M] tile of similarities exists at a time, and
each tile yields the best partner of its rows (seed s → s′) and, folded into a running maximum, of its
columns (s′ → s), so every pair costs one M×M×D product. The products run in `search_dtype` with float32
accumulation: bfloat16 (the default) has twice float32's throughput on this CPU and, on unit rows, errs by
at most 2⁻⁸ in absolute cosine (typically ~1e-4); pass "float32" for exact values.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from jaxsae import distributed


def _check_dirs(name: str, x: jax.Array, ndim: int) -> None:
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f"{name} holds NaN or inf values")


def unit_rows(x_NxD: jax.Array) -> jax.Array:
    """Rows scaled to unit norm (zero rows stay zero, so their cosine with anything is 0)."""
    x_NxD = jnp.asarray(x_NxD, jnp.float32)
    return x_NxD / jnp.maximum(jnp.linalg.norm(x_NxD, axis=-1, keepdims=True), 1e-12)


def _scan_best(a_nbxbxD, ea_nbxbxD, valid_nbxb, b_NxD, eb_NxD, use_enc: bool, axis: str | None = None):
    """Row-tile scan: (best score of each tiled row of a in b [nb, b], best of each row of b over these tiles [N])."""

    def step(col_best_N, x):
        a_bxD, ea_bxD, valid_b = x
        sim_bxN = jnp.abs(jnp.einsum("bd,nd->bn", a_bxD, b_NxD, preferred_element_type=jnp.float32))
        if use_enc:
            enc_bxN = jnp.abs(jnp.einsum("bd,nd->bn", ea_bxD, eb_NxD, preferred_element_type=jnp.float32))
            sim_bxN = jnp.minimum(sim_bxN, enc_bxN)
        sim_bxN = jnp.where(valid_b[:, None], sim_bxN, -1.0)  # padding rows never win a column
        # Maxima only: an argmax in this loop costs twice the matmul on CPU.
        return jnp.maximum(col_best_N, jnp.max(sim_bxN, axis=0)), jnp.max(sim_bxN, axis=1)

    init = jnp.full((b_NxD.shape[0],), -1.0, jnp.float32)
    if axis is not None:  # inside shard_map the column maxima differ per device until the pmax
        init = jax.lax.pcast(init, (axis,), to="varying")
    return jax.lax.scan(step, init, (a_nbxbxD, ea_nbxbxD, valid_nbxb))[::-1]


def _tiles(x_MxD, nb: int, block: int, dt):
    """Rows padded with zeros to nb*block and cut into [nb, block, D] tiles of dtype dt."""
    return jnp.pad(x_MxD, ((0, nb * block - x_MxD.shape[0]), (0, 0))).astype(dt).reshape(nb, block, -1)


@functools.partial(jax.jit, static_argnames=("block", "search_dtype", "mesh"))
def _cross_best(a_MxD, b_NxD, ea_MxD, eb_NxD, block: int, search_dtype: str, mesh=None):
    """Best score in b of every row of a and in a of every row of b, score = min(|cos_dec|, |cos_enc|).

    Inputs are unit rows; `ea`/`eb` are None without the encoder requirement. Returns (best_M, best_N). With a
    1-axis `mesh`, a's row tiles are split over its devices (of every process) and the column maxima reduced.
    """
    M, D = a_MxD.shape
    dt = jnp.dtype(search_dtype)
    use_enc = ea_MxD is not None
    ea_MxD, eb_NxD = (ea_MxD, eb_NxD) if use_enc else (a_MxD, b_NxD)  # unused stand-ins keep one code path
    parts = 1 if mesh is None else mesh.size
    nb = parts * -(-M // (block * parts))  # tiles, a multiple of the devices
    valid_nbxb = (jnp.arange(nb * block) < M).reshape(nb, block)
    args = (_tiles(a_MxD, nb, block, dt), _tiles(ea_MxD, nb, block, dt), valid_nbxb, b_NxD.astype(dt),
            eb_NxD.astype(dt))
    if mesh is None:
        best_nbxb, best_N = _scan_best(*args, use_enc)
    else:
        (axis,) = mesh.axis_names
        tile, rep = P(axis), P()

        def local(a, ea, valid, b, eb):
            rows, cols = _scan_best(a, ea, valid, b, eb, use_enc, axis)
            return rows, jax.lax.pmax(cols, axis)

        best_nbxb, best_N = jax.shard_map(local, mesh=mesh, in_specs=(tile, tile, tile, rep, rep),
                                          out_specs=(tile, rep))(*args)
    return best_nbxb.reshape(-1)[:M], best_N


def search_mesh() -> Mesh:
    """A one-axis mesh over every device of every process, for `best_matches(..., mesh=search_mesh())`."""
    return Mesh(np.asarray(jax.devices()), ("tiles",))


def cross_best(a_MxD, b_NxD, enc_a_MxD=None, enc_b_NxD=None, *, block: int = 512,
               search_dtype: str = "bfloat16", mesh: Mesh | None = None):
    """Best |cos| of each row of a among the rows of b and vice versa: (best_M, best_N) as numpy.

    With encoder directions given, a pair's score is min(|cos_dec|, |cos_enc|). With `mesh` (one axis, e.g.
    `search_mesh()`) the tiles are split over its devices, across processes too; every process gets the result.
    """
    _check_dirs("a", jnp.asarray(a_MxD), 2)
    _check_dirs("b", jnp.asarray(b_NxD), 2)
    if a_MxD.shape[1] != b_NxD.shape[1]:
        raise ValueError(f"a and b must share the last dim, got {tuple(a_MxD.shape)} and {tuple(b_NxD.shape)}")
    if (enc_a_MxD is None) != (enc_b_NxD is None):
        raise ValueError("give encoder directions for both a and b, or for neither")
    if enc_a_MxD is not None:
        for name, e, d in (("enc_a", enc_a_MxD, a_MxD), ("enc_b", enc_b_NxD, b_NxD)):
            _check_dirs(name, jnp.asarray(e), 2)
            if e.shape != d.shape:
                raise ValueError(f"{name} must match its decoder's shape {tuple(d.shape)}, got {tuple(e.shape)}")
        enc_a_MxD, enc_b_NxD = unit_rows(enc_a_MxD), unit_rows(enc_b_NxD)
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    block = min(block, a_MxD.shape[0])
    if mesh is not None and len(mesh.axis_names) != 1:
        raise ValueError(f"the search mesh must have one axis, got {mesh.axis_names}")
    args = [unit_rows(a_MxD), unit_rows(b_NxD), enc_a_MxD, enc_b_NxD]
    if mesh is not None:  # inputs every process holds in full, as arrays replicated over the (global) mesh
        rep = NamedSharding(mesh, P())
        args = [None if x is None else jax.make_array_from_callback(x.shape, rep, lambda i, x=np.asarray(x): x[i])
                for x in args]
    best_M, best_N = _cross_best(*args, block, search_dtype, mesh)
    return tuple(np.asarray(a) for a in distributed.to_host((best_M, best_N)))  # gathered across processes


def best_matches(dec_SxMxD, enc_SxMxD=None, *, block: int = 512, search_dtype: str = "bfloat16",
                 progress: bool = False, mesh: Mesh | None = None):
    """cos_SxSxM: `cos[s, s2, i]` is the best score of feature i of seed s among the features of seed s2.

    The diagonal s == s2 is 1. `enc_SxMxD` (encoder directions, W_enc.T) adds the encoder requirement; `mesh`
    splits each pair's tiles over devices (see `cross_best`).
    """
    dec_SxMxD = jnp.asarray(dec_SxMxD)
    _check_dirs("dec_SxMxD", dec_SxMxD, 3)
    S, M, _ = dec_SxMxD.shape
    if S < 2:
        raise ValueError(f"stability needs at least 2 seeds, got S={S}")
    if enc_SxMxD is not None and jnp.shape(enc_SxMxD) != dec_SxMxD.shape:
        raise ValueError(f"enc_SxMxD must match dec_SxMxD {tuple(dec_SxMxD.shape)}, got {jnp.shape(enc_SxMxD)}")
    cos = np.ones((S, S, M), np.float32)
    pairs = list(itertools.combinations(range(S), 2))
    for s, t in tqdm(pairs, desc="seed pairs", disable=not progress):
        enc = (None, None) if enc_SxMxD is None else (enc_SxMxD[s], enc_SxMxD[t])
        cos[s, t], cos[t, s] = cross_best(dec_SxMxD[s], dec_SxMxD[t], *enc, block=block, search_dtype=search_dtype,
                                          mesh=mesh)
    return cos


def stability(cos_SxSxM: np.ndarray, tau: float = 0.7) -> np.ndarray:
    """p_SxM: the fraction of the other seeds whose best partner reaches |cos| ≥ τ."""
    S = cos_SxSxM.shape[0]
    if cos_SxSxM.ndim != 3 or cos_SxSxM.shape[1] != S:
        raise ValueError(f"expected cos of shape [S, S, M], got {cos_SxSxM.shape}")
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    hit_SxSxM = np.asarray(cos_SxSxM) >= tau
    hit_SxSxM[np.arange(S), np.arange(S)] = False
    return hit_SxSxM.sum(1) / (S - 1)


def stability_against(dec_MxD, refs_RxNxD, enc_MxD=None, enc_refs_RxNxD=None, *, tau: float = 0.7,
                      block: int = 512, search_dtype: str = "bfloat16") -> np.ndarray:
    """p_M of one dictionary against R reference dictionaries (e.g. fresh seeds): fraction holding a match."""
    refs_RxNxD = jnp.asarray(refs_RxNxD)
    _check_dirs("refs_RxNxD", refs_RxNxD, 3)
    hits = []
    for r in range(refs_RxNxD.shape[0]):
        enc = (None, None) if enc_MxD is None else (enc_MxD, enc_refs_RxNxD[r])
        best_M = cross_best(dec_MxD, refs_RxNxD[r], *enc, block=block, search_dtype=search_dtype)[0]
        hits.append(np.asarray(best_M) >= tau)
    return np.mean(hits, axis=0)


def cosine_matrix(a_MxD, b_NxD) -> np.ndarray:
    """Dense |cos| [M, N] in float32 (small dictionaries only)."""
    return np.asarray(jnp.abs(unit_rows(a_MxD) @ unit_rows(b_NxD).T))


def hungarian_match(a_MxD, b_NxD):
    """One-to-one matching maximising total |cos| (scipy's linear_sum_assignment): (rows, cols, cos)."""
    _check_dirs("a", jnp.asarray(a_MxD), 2)
    _check_dirs("b", jnp.asarray(b_NxD), 2)
    cos_MxN = cosine_matrix(a_MxD, b_NxD)
    rows, cols = scipy.optimize.linear_sum_assignment(cos_MxN, maximize=True)
    return rows, cols, cos_MxN[rows, cols]


def pw_mcc(a_MxD, b_NxD, *, block: int = 512, search_dtype: str = "bfloat16") -> float:
    """Pairwise mean correlation coefficient: mean best |cos| of a's rows in b and of b's rows in a, averaged."""
    best_M, best_N = cross_best(a_MxD, b_NxD, block=block, search_dtype=search_dtype)
    return 0.5 * (float(jnp.mean(best_M)) + float(jnp.mean(best_N)))


def span_basis(dirs_NxD, rank: int) -> jax.Array:
    """Orthonormal basis [D, r] of the top-r right singular subspace of the unit rows of `dirs_NxD`."""
    dirs_NxD = jnp.asarray(dirs_NxD)
    _check_dirs("dirs_NxD", dirs_NxD, 2)
    N, D = dirs_NxD.shape
    if not 1 <= rank <= min(N, D):
        raise ValueError(f"rank must be in [1, min(N={N}, D={D})], got {rank}")
    _, _, Vt_rxD = jnp.linalg.svd(unit_rows(dirs_NxD), full_matrices=False)
    return Vt_rxD[:rank].T


@jax.jit
def principal_angles(A_Dxr, B_Dxq) -> jax.Array:
    """Principal angles (radians, ascending) between span(A) and span(B); columns need not be orthonormal."""
    Qa, _ = jnp.linalg.qr(jnp.asarray(A_Dxr, jnp.float32))
    Qb, _ = jnp.linalg.qr(jnp.asarray(B_Dxq, jnp.float32))
    cos_k = jnp.linalg.svd(Qa.T @ Qb, compute_uv=False)
    return jnp.arccos(jnp.clip(cos_k, -1.0, 1.0))


def subspace_overlap(A_Dxr, B_Dxq) -> float:
    """Mean cos² of the principal angles: ‖QaᵀQb‖²_F / min(r, q); r/D in expectation for random subspaces."""
    return float(jnp.mean(jnp.cos(principal_angles(A_Dxr, B_Dxq)) ** 2))


def random_subspace_overlap(key: jax.Array, d: int, rank: int, n: int = 16) -> float:
    """Mean overlap of n pairs of uniformly random rank-r subspaces of R^d."""
    g = jax.random.normal(key, (n, 2, d, rank))
    return float(np.mean([subspace_overlap(g[i, 0], g[i, 1]) for i in range(n)]))


@functools.partial(jax.jit, static_argnames=("width",))
def _greedy_unique(dirs_NxD, order_N, width: int, tau: float):
    """Walk candidates in `order`; keep one when its |cos| to every kept one is < τ; stop at `width`."""
    N, D = dirs_NxD.shape

    def cond(c):
        i, n, _, _ = c
        return (i < N) & (n < width)

    def body(c):
        i, n, kept_WxD, idx_W = c
        v_D = dirs_NxD[order_N[i]]
        keep = jnp.max(jnp.abs(kept_WxD @ v_D)) < tau  # empty rows are zero: cos 0
        kept_WxD = jnp.where(keep, kept_WxD.at[n].set(v_D), kept_WxD)
        idx_W = jnp.where(keep, idx_W.at[n].set(order_N[i]), idx_W)
        return i + 1, n + keep, kept_WxD, idx_W

    init = (0, 0, jnp.zeros((width, D), jnp.float32), jnp.full((width,), -1, jnp.int32))
    _, n, _, idx_W = jax.lax.while_loop(cond, body, init)
    return idx_W, n


def pool_unique(dirs_NxD, order_N, width: int, tau: float = 0.7) -> np.ndarray:
    """Indices of at most `width` mutually dissimilar (|cos| < τ) rows of `dirs_NxD`, picked greedily in `order_N`.

    For pooling across seeds pass the concatenated decoders [S·M, D] and an order that prefers stable, then
    frequent, features (`np.lexsort((-freq, -p))`).
    """
    dirs_NxD = jnp.asarray(dirs_NxD)
    _check_dirs("dirs_NxD", dirs_NxD, 2)
    order_N = np.asarray(order_N)
    if order_N.ndim != 1 or len(np.unique(order_N)) != len(order_N) or order_N.min() < 0 or order_N.max() >= len(dirs_NxD):
        raise ValueError(f"order_N must be distinct indices into {len(dirs_NxD)} rows, got shape {order_N.shape}")
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    idx_W, n = _greedy_unique(unit_rows(dirs_NxD), jnp.asarray(order_N, jnp.int32), width, tau)
    return np.asarray(idx_W)[: int(n)]


@dataclasses.dataclass(frozen=True)
class StabilityConfig:
    run: str = ""  # a run folder holding one SAE folder per seed (seed_0/, seed_1/, ...)
    taus: tuple[float, ...] = (0.5, 0.7, 0.9)  # |cos| thresholds to report p_i at
    use_encoder: bool = False  # also require the partner's encoder direction to reach tau
    block: int = 512  # rows per similarity tile
    search_dtype: str = "bfloat16"  # dtype of the tiles' products (float32 for exact cosines)
    out: str = ""  # where to write the JSON (default: {run}/stability.json)


def run_stability(cfg: StabilityConfig) -> dict:
    """p_i of every latent of every seed of a run at each τ, the tiles split over every device of every process."""
    from jaxsae import evaluate, io

    folders = evaluate.find_saes(cfg.run)
    params = [io.load_any(f)[0] for f in folders]
    if len(params) < 2:
        raise ValueError(f"stability needs at least 2 seeds, found {len(params)} SAE folder(s) under {cfg.run}")
    dec = np.stack([p["W_dec"] for p in params])
    enc = np.stack([np.asarray(p["W_enc"]).T for p in params]) if cfg.use_encoder else None
    mesh = search_mesh() if jax.device_count() > 1 else None
    cos = best_matches(dec, enc, block=cfg.block, search_dtype=cfg.search_dtype, mesh=mesh,
                       progress=distributed.is_main())
    result = {"run": cfg.run, "seeds": [str(f) for f in folders], "search_dtype": cfg.search_dtype,
              "use_encoder": cfg.use_encoder, "by_tau": {}}
    for tau in cfg.taus:
        p_SxM = stability(cos, tau)
        result["by_tau"][str(tau)] = {"mean": float(p_SxM.mean()), "p": np.round(p_SxM, 6).tolist()}
    return result


def main(argv=None) -> int:
    """`jaxsae stability run=RUN_DIR [key=value ...]`: per-feature stability of a seed ensemble, as JSON."""
    import json
    from pathlib import Path

    from jaxsae import configlib

    argv = list(argv or [])
    defaults = [StabilityConfig(), distributed.DistConfig()]
    if any(a in ("-h", "--help", "help") for a in argv):
        print("usage: jaxsae stability run=RUN_DIR [key=value ...]\n" +
              "\n\n".join(configlib.help_text(c) for c in defaults))
        return 0
    cfg_argv, dist_argv = configlib.split_argv(argv, defaults)
    cfg = configlib.override(StabilityConfig(), cfg_argv)
    if not cfg.run:
        raise ValueError("jaxsae stability needs run=RUN_DIR")
    dist_cfg = configlib.override(distributed.DistConfig(), dist_argv)
    # The search mesh is every device of the job and pads its tiles to their count: no batch to split.
    distributed.check_split(dist_cfg, {"model": dist_cfg.num_processes * max(dist_cfg.cpu_devices, 1)}, 1)
    distributed.initialize(dist_cfg)
    result = run_stability(cfg)
    if distributed.is_main():
        out = Path(cfg.out or Path(cfg.run) / "stability.json")
        out.write_text(json.dumps(result))
        print(json.dumps({"out": str(out), **{t: r["mean"] for t, r in result["by_tau"].items()}}))
    return 0
