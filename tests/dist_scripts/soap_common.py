"""A tiny language model (implements the logits protocol) and a Lightning fit shared by the SOAP / Sophia tests
and the torchrun script ``soap_ddp.py``: the same data, model and hyperparameters in 1 or 2 processes.

Rank ``r`` of ``world`` sees rows ``r::world`` of each global batch (split here, with Lightning's distributed
sampler off), so the global batch, and the mean loss, are the same for any world size.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optim import OptimizerMixin

VOCAB, DIM, SEQ = 24, 16, 8
GLOBAL_BATCH = 8


class TinyLM(OptimizerMixin, L.LightningModule):
    def __init__(self, optim: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.fc1 = nn.Linear(DIM, 32)
        self.fc2 = nn.Linear(32, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.lm_head(self.norm(x))

    def output_head(self) -> nn.Module:
        return self.lm_head

    def logits_for_batch(self, batch: Any) -> torch.Tensor:
        return self(batch[0])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        idx, tgt = batch
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, VOCAB), tgt.reshape(-1))


def dataset(steps: int, rank: int = 0, world: int = 1) -> TensorDataset:
    """Rows ``rank::world`` of the global data: per step, rank r's batch is rows r::world of the global batch."""
    g = torch.Generator().manual_seed(123)
    idx = torch.randint(0, VOCAB, (steps * GLOBAL_BATCH, SEQ), generator=g)
    tgt = torch.randint(0, VOCAB, (steps * GLOBAL_BATCH, SEQ), generator=g)
    return TensorDataset(idx[rank::world], tgt[rank::world])


def argmax_labels(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def fit(name: str, steps: int, world: int = 1, strategy: Any = "auto", **extra: Any) -> tuple[TinyLM, Any]:
    """Train ``name`` for ``steps`` optimizer steps; returns the module and the SophiaHessian callback."""
    from lightning_optim.callbacks.sophia_hessian import SophiaHessian

    model = TinyLM({"name": name, "lr": 1e-2, "scheduler": "constant", "extra": extra})
    hess = SophiaHessian(sample_fn=argmax_labels)
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy=strategy, max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[hess],
        use_distributed_sampler=False,  # Lightning's sampler would shuffle; the split is done by dataset()
    )
    rank = int(os.environ.get("RANK", 0)) if world > 1 else 0
    loader = DataLoader(dataset(steps, rank, world), batch_size=GLOBAL_BATCH // world, shuffle=False)
    trainer.fit(model, loader)
    return model, hess
