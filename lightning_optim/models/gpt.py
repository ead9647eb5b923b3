"""GPT-2 and Llama-style decoder-only transformers, readable in one sitting, and their size presets.

Two architectures share one :class:`Transformer`:

* ``arch="gpt2"``: learned absolute positions, LayerNorm (with biases), GELU MLP of width 4d, biases in
  every linear layer, tied input/output embeddings (nanoGPT's GPT-2).
* ``arch="llama"``: RoPE, RMSNorm, SwiGLU MLP of width ``256·ceil(8d/3/256)``, no biases, tied embeddings
  (the Llama-style model of Semenov et al. 2025, "Benchmarking Optimizers for LLM Pretraining").

Both use causal ``scaled_dot_product_attention``, initialise every weight from N(0, 0.02) and scale the
residual output projections (attention ``proj``, MLP ``down``) by ``1/sqrt(2·n_layer)`` (GPT-2).

Initialisation lives in each module's ``reset_parameters`` so a model built on the meta device
(``with torch.device("meta"): build_model("720m")``) is materialised correctly by ``to_empty`` +
``reset_parameters`` — what Lightning's ``ModelParallelStrategy`` does after ``configure_model``.

Usage::

    from lightning_optim.models import build_model
    model = build_model("124m", arch="gpt2")            # 124.5M parameters, vocab 50304
    logits = model(idx)                                  # (batch, seq, vocab)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ModelConfig",
    "PRESETS",
    "ARCHS",
    "Transformer",
    "Block",
    "build_model",
    "model_config",
    "flops_per_token",
    "count_parameters",
]

ARCHS = ("llama", "gpt2")
INIT_STD = 0.02


@dataclass
class ModelConfig:
    """Shape of a model. ``vocab_size=None`` (the ``tiny`` preset) means "the tokenizer's vocabulary"."""

    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int | None = 50304
    block_size: int = 512
    arch: str = "llama"
    mlp_hidden: int | None = None  # default: 4d (gpt2) or 256·ceil(8d/3/256) (llama)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    n_kv_head: int | None = None  # grouped-query attention (Ainslie et al. 2023): key/value heads; default n_head

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.arch == "llama" and (self.n_embd // self.n_head) % 2:
            raise ValueError("RoPE needs an even head dimension")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if not (isinstance(self.n_kv_head, int) and 0 < self.n_kv_head <= self.n_head and self.n_head % self.n_kv_head == 0):
            raise ValueError(f"n_kv_head={self.n_kv_head!r} must be a positive divisor of n_head={self.n_head}")
        if self.mlp_hidden is None:
            self.mlp_hidden = 4 * self.n_embd if self.arch == "gpt2" else 256 * math.ceil(8 * self.n_embd / 3 / 256)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_dim(self) -> int:
        """Width of the key (and of the value) projection: ``n_kv_head · head_dim`` (``n_embd`` without GQA)."""
        return self.n_kv_head * self.head_dim


# (n_layer, n_embd, n_head); vocab 50304 (GPT-2's 50257 padded to a multiple of 64) for the benchmark sizes.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=4, n_embd=192, n_head=6, vocab_size=None, block_size=256),
    "124m": dict(n_layer=12, n_embd=768, n_head=12),
    "210m": dict(n_layer=24, n_embd=768, n_head=12),
    "583m": dict(n_layer=11, n_embd=1920, n_head=15),
    "720m": dict(n_layer=12, n_embd=2048, n_head=16),
}


def model_config(preset: str, arch: str = "llama", **overrides) -> ModelConfig:
    """The :class:`ModelConfig` of ``preset`` for ``arch`` with ``overrides`` (``None`` values ignored)."""
    key = str(preset).lower()
    if key not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; presets: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown model setting(s) {sorted(unknown)}; settings: {', '.join(sorted(fields))}")
    values = {**PRESETS[key], "arch": arch, **{k: v for k, v in overrides.items() if v is not None}}
    return ModelConfig(**values)


# ---------------------------------------------------------------------------------------------------------
# layers with their own initialisation (meta-device friendly)


class Linear(nn.Linear):
    """``nn.Linear`` initialised N(0, std), zero bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool, std: float = INIT_STD) -> None:
        self.init_std = std
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Embedding(nn.Embedding):
    """``nn.Embedding`` initialised N(0, 0.02)."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=INIT_STD)


class RMSNorm(nn.Module):
    """RMSNorm with a learned gain (no bias); computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


def _rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, hd/2)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the last dim of ``x`` (B, H, T, hd) — the Llama/NeoX layout."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x)


class Attention(nn.Module):
    """Causal self-attention with one fused ``qkv`` projection (rows: q, then k, then v). With
    ``n_kv_head < n_head`` (grouped-query attention) k and v have ``n_kv_head`` heads, each shared by
    ``n_head / n_kv_head`` query heads.

    The logits are ``softmax_scale · q·kᵀ`` (``softmax_scale = 1/sqrt(head_dim)``). Code that needs the
    queries and keys (QK-clip's per-head maximum logit) sets ``qk_observer`` to a callable
    ``observer(module, q, k)``; it is called in every forward with ``q`` of shape ``(B, n_head, T, head_dim)``
    and ``k`` of shape ``(B, n_kv_head, T, head_dim)``, after RoPE. :meth:`qk_head_rows` says which rows of
    ``qkv.weight`` produce a head.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        bias = cfg.arch == "gpt2"
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.rope, self.rope_theta = cfg.arch == "llama", cfg.rope_theta
        self.qkv = Linear(cfg.n_embd, cfg.n_embd + 2 * cfg.kv_dim, bias=bias)
        self.proj = Linear(cfg.n_embd, cfg.n_embd, bias=bias, std=INIT_STD / math.sqrt(2 * cfg.n_layer))
        self.softmax_scale = 1.0 / math.sqrt(self.head_dim)
        self.qk_observer = None

    def qk_head_rows(self, head: int) -> tuple[slice, slice]:
        """Rows of ``qkv.weight`` (and of its bias) that produce query head ``head`` and the key head it reads
        (``head // (n_head / n_kv_head)``)."""
        if not 0 <= head < self.n_head:
            raise ValueError(f"head must be in [0, {self.n_head}), got {head}")
        hd, width = self.head_dim, self.n_head * self.head_dim
        g = head // (self.n_head // self.n_kv_head)
        return slice(head * hd, (head + 1) * hd), slice(width + g * hd, width + (g + 1) * hd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.qkv(x).split((C, kv, kv), dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.rope:
            cos, sin = _rope_tables(T, self.head_dim, self.rope_theta, x.device)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.qk_observer is not None:
            self.qk_observer(self, q, k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """GELU MLP (gpt2) or SwiGLU (llama): ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swiglu = cfg.arch == "llama"
        bias = not self.swiglu
        hidden = cfg.mlp_hidden
        self.up = Linear(cfg.n_embd, hidden, bias=bias)
        if self.swiglu:
            self.gate = Linear(cfg.n_embd, hidden, bias=False)
        self.down = Linear(hidden, cfg.n_embd, bias=bias, std=INIT_STD / math.sqrt(2 * cfg.n_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate="tanh"))


def _norm(cfg: ModelConfig) -> nn.Module:
    return RMSNorm(cfg.n_embd, cfg.norm_eps) if cfg.arch == "llama" else nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)


class Block(nn.Module):
    """Pre-norm transformer block; the unit FSDP shards (``fully_shard`` per block)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = _norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = _norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """A decoder-only language model: ``forward(idx (B, T) int64) -> logits (B, T, vocab)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("vocab_size is not set: pass vocab_size=... (the tokenizer's vocabulary size)")
        self.config = cfg
        self.tok_emb = Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = Embedding(cfg.block_size, cfg.n_embd) if cfg.arch == "gpt2" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = _norm(cfg)
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.config.block_size and self.pos_emb is not None:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))

    def num_parameters(self, non_embedding: bool = False) -> int:
        return count_parameters(self, non_embedding=non_embedding)


def count_parameters(model: nn.Module, non_embedding: bool = False) -> int:
    """Unique parameters (a tied weight counted once); ``non_embedding`` leaves out token/position tables."""
    seen, total = set(), 0
    skip = set()
    if non_embedding:
        skip = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for p in model.parameters():
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None, training: bool = True) -> float:
    """Model FLOPs per token (PaLM appendix B): ``6·N + 12·L·d·T`` for training (``2·N + 4·L·d·T`` forward).

    ``N`` counts the matmul parameters — every block's weights plus the output head (vocab·d), not the
    embedding lookups; ``T`` is the sequence length (attention scores and values).
    """
    d, L, T = cfg.n_embd, cfg.n_layer, seq_len or cfg.block_size
    mlp = (3 if cfg.arch == "llama" else 2) * d * cfg.mlp_hidden
    attention = d * (d + 2 * cfg.kv_dim) + d * d  # qkv, proj
    n_matmul = L * (attention + mlp) + (cfg.vocab_size or 0) * d
    per_pass = 2 * n_matmul + 4 * L * d * T
    return float(3 * per_pass if training else per_pass)


def build_model(preset: str, arch: str = "llama", **overrides) -> Transformer:
    """A plain :class:`Transformer` for ``preset`` (``tiny 124m 210m 583m 720m``) and ``arch`` (``llama``/``gpt2``).

    ``overrides`` replace preset fields (``vocab_size``, ``block_size``, ``n_layer`` ...). Works under
    ``with torch.device("meta"):``. Unknown preset → ``ValueError`` listing the presets.
    """
    return Transformer(model_config(preset, arch, **overrides))
