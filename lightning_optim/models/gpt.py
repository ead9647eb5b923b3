"""GPT-2 and Llama-style decoder-only transformers, readable in one sitting, and their size presets.

Two architectures share one :class:`Transformer`:

* ``arch="gpt2"``: learned absolute positions, LayerNorm (with biases), GELU MLP of width 4d, biases in
  every linear layer, tied input/output embeddings (nanoGPT's GPT-2).
* ``arch="llama"``: RoPE, RMSNorm, SwiGLU MLP of width ``256·ceil(8d/3/256)``, no biases, tied embeddings
  (the Llama-style model of Semenov et al. 2025, "Benchmarking Optimizers for LLM Pretraining").

Both use causal ``scaled_dot_product_attention``, initialise every weight from N(0, 0.02) and scale the
residual output projections (attention ``proj``, MLP ``down``) by ``1/sqrt(2·n_layer)`` (GPT-2).

``mup_base_width`` (default ``None``: the standard parametrization above, unchanged) builds the model in muP
(:mod:`lightning_optim.mup`): hidden matrices initialised with std ``base std / sqrt(fan_in / base_fan_in)``,
the readout's input multiplied by ``base_width / n_embd`` (the head stays tied to the embedding: ``mup``'s
``MuSharedReadout``), attention logits scaled ``sqrt(base_head_dim) / head_dim`` (``1/head_dim`` scaling;
width grows with ``n_head`` fixed). At ``n_embd == mup_base_width`` the model is the standard one.

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

from lightning_optim.mup import MuPMultipliers, MuPParam

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
    mup_base_width: int | None = None  # muP (lightning_optim.mup): the width whose hyperparameters transfer

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
            self.mlp_hidden = default_mlp_hidden(self.arch, self.n_embd)
        if self.mup_base_width is not None:
            self._check_mup_base_width()

    def _check_mup_base_width(self) -> None:
        base = self.mup_base_width
        if isinstance(base, bool) or not isinstance(base, int) or base <= 0:
            raise ValueError(f"mup_base_width must be a positive integer (a width), got {base!r}")
        if base % self.n_head:
            raise ValueError(f"mup_base_width={base} is not divisible by n_head={self.n_head}: the base model keeps "
                             f"n_head and needs an integer head dimension (muP scales head_dim with width)")
        if self.arch == "llama" and (base // self.n_head) % 2:
            raise ValueError(f"mup_base_width={base} gives the base model an odd head dimension "
                             f"{base // self.n_head}; RoPE needs an even one")
        if self.mlp_hidden != default_mlp_hidden(self.arch, self.n_embd) and (self.mlp_hidden * base) % self.n_embd:
            raise ValueError(f"mlp_hidden={self.mlp_hidden} is not the default for n_embd={self.n_embd}, so the base "
                             f"model's is mlp_hidden * mup_base_width / n_embd, which is not an integer for "
                             f"mup_base_width={base}")

    def mup_base_config(self) -> "ModelConfig":
        """The model at ``mup_base_width`` (same depth, heads, vocabulary; the default MLP width rule, or a custom
        ``mlp_hidden`` scaled in proportion): the shapes muP's fan-in multipliers are measured against."""
        if self.mup_base_width is None:
            raise ValueError("mup_base_config: this ModelConfig has no mup_base_width")
        base = self.mup_base_width
        custom = self.mlp_hidden != default_mlp_hidden(self.arch, self.n_embd)
        hidden = self.mlp_hidden * base // self.n_embd if custom else None
        return dataclasses.replace(self, n_embd=base, mlp_hidden=hidden)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_dim(self) -> int:
        """Width of the key (and of the value) projection: ``n_kv_head · head_dim`` (``n_embd`` without GQA)."""
        return self.n_kv_head * self.head_dim


def default_mlp_hidden(arch: str, n_embd: int) -> int:
    """The MLP width when ``mlp_hidden`` is not given: ``4d`` (gpt2) or ``256·ceil(8d/3/256)`` (llama)."""
    return 4 * n_embd if arch == "gpt2" else 256 * math.ceil(8 * n_embd / 3 / 256)


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

    The logits are ``softmax_scale · q·kᵀ`` (``softmax_scale = 1/sqrt(head_dim)``; under muP
    ``sqrt(base_head_dim)/head_dim``). Code that needs the
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
        fan_in = _fan_in_mults(cfg)
        self.qkv = Linear(cfg.n_embd, cfg.n_embd + 2 * cfg.kv_dim, bias=bias, std=_std(INIT_STD, fan_in["embd"]))
        self.proj = Linear(cfg.n_embd, cfg.n_embd, bias=bias,
                           std=_std(INIT_STD / math.sqrt(2 * cfg.n_layer), fan_in["embd"]))
        self.softmax_scale = 1.0 / math.sqrt(self.head_dim)
        if cfg.mup_base_width is not None:  # 1/head_dim scaling, equal to 1/sqrt(head_dim) at the base width
            self.softmax_scale = MuPMultipliers(cfg.mup_base_width, cfg.n_embd).attention_scale(
                self.head_dim, cfg.mup_base_width // cfg.n_head)
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
        fan_in = _fan_in_mults(cfg)
        self.up = Linear(cfg.n_embd, hidden, bias=bias, std=_std(INIT_STD, fan_in["embd"]))
        if self.swiglu:
            self.gate = Linear(cfg.n_embd, hidden, bias=False, std=_std(INIT_STD, fan_in["embd"]))
        self.down = Linear(hidden, cfg.n_embd, bias=bias,
                           std=_std(INIT_STD / math.sqrt(2 * cfg.n_layer), fan_in["mlp"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate="tanh"))


def _fan_in_mults(cfg: ModelConfig) -> dict[str, float]:
    """``fan_in / base_fan_in`` of the matrices reading the residual stream (``embd``) and the MLP hidden layer
    (``mlp``); 1 without muP."""
    if cfg.mup_base_width is None:
        return {"embd": 1.0, "mlp": 1.0}
    base = cfg.mup_base_config()
    return {"embd": cfg.n_embd / base.n_embd, "mlp": cfg.mlp_hidden / base.mlp_hidden}


def _std(base_std: float, fan_in_mult: float) -> float:
    """A hidden matrix's init std: ``base_std`` without muP (``fan_in_mult == 1``: exactly the base value)."""
    return base_std if fan_in_mult == 1.0 else base_std * MuPMultipliers.hidden_std_factor(fan_in_mult)


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
        #: muP's readout multiplier 1/m on the head's input (None: standard parametrization, no multiply at all)
        self.readout_multiplier = (None if cfg.mup_base_width is None
                                   else MuPMultipliers(cfg.mup_base_width, cfg.n_embd).readout_multiplier)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.config.block_size and self.pos_emb is not None:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if self.readout_multiplier is not None:
            x = x * self.readout_multiplier
        return self.lm_head(x)

    def mup_params(self) -> list[tuple[nn.Parameter, MuPParam]]:
        """Every parameter once (a tied weight once) with its muP role and the base model's shape (built on the
        meta device from :meth:`ModelConfig.mup_base_config`): the token/position tables and a tied head are
        ``embedding``, an untied head ``readout``, 1-D tensors ``vector``, every other matrix ``hidden``."""
        cfg = self.config
        if cfg.mup_base_width is None:
            raise ValueError("mup_params: the model was built without mup_base_width")
        with torch.device("meta"):
            base = Transformer(cfg.mup_base_config())
        base_shapes = {name: tuple(p.shape) for name, p in base.named_parameters()}
        embeddings = {id(self.tok_emb.weight)} | ({id(self.pos_emb.weight)} if self.pos_emb is not None else set())
        out = []
        for name, p in self.named_parameters():
            if id(p) in embeddings:
                role = "embedding"
            elif p is self.lm_head.weight:
                role = "readout"
            elif p.ndim < 2:
                role = "vector"
            else:
                role = "hidden"
            out.append((p, MuPParam(name=name, role=role, shape=tuple(p.shape), base_shape=base_shapes[name])))
        return out

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
