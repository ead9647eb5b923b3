"""``LanguageModel``: the GPT-2 / Llama-style models as a LightningModule trained by the OptimizerMixin.

Usage::

    import lightning as L
    from lightning_optim import OptimConfig
    from lightning_optim.models import LanguageModel

    model = LanguageModel("124m", arch="llama", optim=OptimConfig(name="muon", scheduler="wsd"))
    L.Trainer(max_steps=1000).fit(model, datamodule)

The batch is ``(inputs, targets)``, two ``(B, T)`` int64 tensors (targets = inputs shifted by one).
``output_head()`` and ``logits_for_batch(batch)`` implement :class:`lightning_optim.protocols.LogitsModel`
(z-loss hooks the head; Sophia's Hessian pass calls ``logits_for_batch``). ``configure_model`` applies
``fully_shard`` per block and then to the whole model when the strategy gives a device mesh
(``ModelParallelStrategy`` = FSDP2), and compiles the blocks in place with ``compile=True``.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from lightning_optim.mixin import OptimConfig, OptimizerMixin
from lightning_optim.models.gpt import Transformer, count_parameters, flops_per_token, model_config

__all__ = ["LanguageModel"]

_VOCAB_MULTIPLE = 64


class LanguageModel(OptimizerMixin, L.LightningModule):
    """A decoder-only language model (see :mod:`lightning_optim.models.gpt`) with a registry-built optimizer.

    Args:
        preset: ``tiny 124m 210m 583m 720m``.
        arch: ``llama`` (RMSNorm, RoPE, SwiGLU) or ``gpt2`` (LayerNorm, learned positions, GELU).
        optim: optimizer and schedule (:class:`~lightning_optim.OptimConfig`, or a dict of its fields).
        vocab_size: embedding rows; default the preset's (50304), or for ``tiny`` the tokenizer's
            vocabulary rounded up to a multiple of 64.
        tokenizer_vocab_size: the tokenizer's vocabulary (the recipes link it from the data module); an
            error if it does not fit in ``vocab_size``.
        block_size: maximum sequence length (the recipes link it from ``data.seq_len``).
        n_layer, n_embd, n_head, mlp_hidden: override the preset's shape.
        compile: ``torch.compile`` each block in place (parameter names are unchanged).

    muP: ``optim.mup_base_width`` (``--optim.mup_base_width 64`` on a recipe) builds the model in muP for that
    base width (:mod:`lightning_optim.mup`) and gives the optimizer's groups muP's lr multipliers; one setting
    for both, so they cannot disagree.
    """

    def __init__(
        self,
        preset: str = "tiny",
        arch: str = "llama",
        optim: OptimConfig | dict | None = None,
        vocab_size: int | None = None,
        tokenizer_vocab_size: int | None = None,
        block_size: int | None = None,
        n_layer: int | None = None,
        n_embd: int | None = None,
        n_head: int | None = None,
        mlp_hidden: int | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        optim_cfg = _as_optim_config(optim)
        self.save_hyperparameters(ignore=["optim"])
        self.record_run_settings({"optim": optim_cfg})  # itself: a safe global for weights_only loads
        cfg = model_config(preset, arch, block_size=block_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                           mlp_hidden=mlp_hidden, vocab_size=vocab_size, mup_base_width=optim_cfg.mup_base_width)
        if cfg.vocab_size is None:
            if tokenizer_vocab_size is None:
                raise ValueError(f"preset {preset!r} takes its vocabulary from the tokenizer: pass vocab_size or "
                                 "tokenizer_vocab_size (the recipes link data.vocab_size to it)")
            cfg.vocab_size = -(-int(tokenizer_vocab_size) // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE
        if tokenizer_vocab_size is not None and tokenizer_vocab_size > cfg.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer_vocab_size} tokens but the model's vocab_size is "
                             f"{cfg.vocab_size}; pass --model.vocab_size >= {tokenizer_vocab_size}")
        self.config = cfg
        self.model = Transformer(cfg)
        self.flops_per_token = flops_per_token(cfg, cfg.block_size)
        self._parallelized = False

    def record_run_settings(self, settings: dict[str, Any]) -> None:
        """Add plain-data ``settings`` to the hyperparameters: saved in checkpoints and ``hparams.yaml`` and logged
        once at the start of ``fit`` (TensorBoard's HPARAMS tab), so runs can be compared by them."""
        self.hparams.update(_plain_data(settings))
        self._hparams_initial = copy.deepcopy(self._hparams)

    def model_hyperparameters(self) -> dict[str, Any]:
        """The attention head count, for optimizers that block their state per head (Adam-mini's ``n_heads``)."""
        return {"n_heads": int(self.config.n_head)}

    # -- protocol for z-loss / Sophia --------------------------------------------------------------------------

    def output_head(self) -> nn.Module:
        return self.model.lm_head

    def logits_for_batch(self, batch: Any) -> torch.Tensor:
        inputs, _ = batch
        return self(inputs)

    # -- model ---------------------------------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def num_parameters(self, non_embedding: bool = False) -> int:
        return count_parameters(self.model, non_embedding=non_embedding)

    def configure_model(self) -> None:
        if self._parallelized:
            return
        self._parallelized = True
        if self.hparams.get("compile"):
            for block in self.model.blocks:
                block.compile()
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        # No tensor parallelism here: the whole mesh is the FSDP mesh. ModelParallelStrategy's "auto" sizes give
        # (data_parallel=nodes, tensor_parallel=devices per node): a 2-D mesh = HSDP, sharded within a node and
        # replicated across nodes; a 1-D mesh = plain FSDP.
        fsdp_mesh = mesh if mesh.ndim == 1 or mesh.size(0) > 1 else mesh[mesh.mesh_dim_names[-1]]
        for block in self.model.blocks:
            fully_shard(block, mesh=fsdp_mesh)
        fully_shard(self.model, mesh=fsdp_mesh)  # embeddings, tied head and the final norm in the root unit

    # -- steps -----------------------------------------------------------------------------------------------------

    def _loss(self, batch: Any) -> torch.Tensor:
        inputs, targets = batch
        logits = self(inputs)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True)
        return loss


def _plain_data(value: Any) -> Any:
    """Tuples as lists, recursively: ``hparams.yaml`` then loads with ``yaml.safe_load``."""
    if isinstance(value, dict):
        return {k: _plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_data(v) for v in value]
    return value


def _as_optim_config(optim: OptimConfig | dict | None) -> OptimConfig:
    if optim is None:
        return OptimConfig()
    if isinstance(optim, OptimConfig):
        return optim
    if isinstance(optim, dict):
        return OptimConfig(**optim)
    if hasattr(optim, "__dict__"):  # a jsonargparse Namespace
        return OptimConfig(**{k: v for k, v in vars(optim).items() if not k.startswith("_")})
    raise TypeError(f"optim must be an OptimConfig or a dict, got {type(optim).__name__}")
