"""The Lightning side of the conformance suite: a tiny LightningModule built on ``OptimizerMixin``.

``ConfLM(optimizer=name)`` gets its optimizer and schedule from the registry through the mixin, shards itself
with FSDP2 in ``configure_model`` when the strategy gives it a device mesh (``ModelParallelStrategy``), and
trains on the suite's deterministic batches.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_optim import OptimizerMixin

from ._helpers import SHORT_RUN_HP, VOCAB, Tiny, batch, diff_states, nonfinite_entries

from lightning_optim.registry import get_optimizer_spec


class Batches(Dataset):
    """Sample i is row 0 of the suite's batch i (so every rank sees distinct, reproducible data)."""

    def __init__(self, n: int = 64) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        idx, tgt = batch(i, size=1)
        return idx[0], tgt[0]


class ConfLM(OptimizerMixin, L.LightningModule):
    def __init__(self, optimizer: str = "adamw", scheduler: str = "cosine", warmup_steps: int = 1,
                 total_steps: int = 8, extra: dict | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.model = Tiny()

    def optim_config(self):
        from lightning_optim import OptimConfig

        spec = get_optimizer_spec(self.hparams.optimizer)
        extra = {k: v for k, v in SHORT_RUN_HP.items() if k in spec.defaults}
        return OptimConfig(name=self.hparams.optimizer, scheduler=self.hparams.scheduler,
                           warmup_steps=self.hparams.warmup_steps, total_steps=self.hparams.total_steps,
                           extra={**extra, **(self.hparams.extra or {})})

    def configure_model(self) -> None:
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        dp = mesh["data_parallel"]
        fully_shard(self.model.fc1, mesh=dp)
        fully_shard(self.model, mesh=dp)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def output_head(self):
        return self.model.head

    def logits_for_batch(self, b) -> torch.Tensor:
        return self(b[0])

    def training_step(self, b, i):
        idx, tgt = b
        logits = self(idx)
        return F.cross_entropy(logits.float().reshape(-1, VOCAB), tgt.reshape(-1))

    def train_dataloader(self):
        return DataLoader(Batches(), batch_size=2, shuffle=False)


def trainer(tmp: Path, max_steps: int, **kw: Any) -> L.Trainer:
    base = dict(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp),
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    base.update(kw)
    return L.Trainer(**base)


class CaptureOnStart(L.Callback):
    """Copies the optimizer's state_dict and the weights when training (re)starts, after a checkpoint restore."""

    def on_train_start(self, trainer, pl_module):
        self.optimizer_state = copy.deepcopy(trainer.optimizers[0].state_dict())
        self.global_step = trainer.global_step


# ----------------------------------------------------------------------------------------------------------
# NonFiniteGuard in a Trainer run


class PoisonGrad(L.Callback):
    """Sets one gradient element to ``value`` after the backward of batch ``at``; snapshots around it."""

    def __init__(self, at: int, value: float) -> None:
        self.at, self.value = at, value
        self.before = self.after = None

    def _snap(self, trainer, pl_module):
        return ({n: p.detach().clone() for n, p in pl_module.named_parameters()},
                copy.deepcopy(trainer.optimizers[0].state_dict()["state"]))

    def on_train_batch_start(self, trainer, pl_module, b, i):
        if i == self.at:
            self.before = self._snap(trainer, pl_module)

    def on_after_backward(self, trainer, pl_module):
        if trainer.fit_loop.epoch_loop.batch_idx == self.at:
            pl_module.model.fc1.weight.grad[0, 0] = self.value

    def on_train_batch_end(self, trainer, pl_module, out, b, i):
        if i == self.at:
            self.after = self._snap(trainer, pl_module)


def run_with_guard(name: str, tmp: Path, value: float = float("nan")) -> None:
    from lightning_optim.callbacks import NonFiniteGuard

    poison = PoisonGrad(at=2, value=value)
    model = ConfLM(optimizer=name, total_steps=5)
    trainer(tmp, max_steps=5, callbacks=[NonFiniteGuard(), poison]).fit(model)
    assert poison.before is not None and poison.after is not None, "the poisoned step never ran"
    (w0, s0), (w1, s1) = poison.before, poison.after
    problems = diff_states(w0, w1) + [f"state {p}" for p in diff_states(s0, s1)]
    assert not problems, (
        f"{name}: with NonFiniteGuard, a step with a {value} gradient changed weights/state:\n  "
        + "\n  ".join(problems[:20])
    )
    bad = nonfinite_entries({n: p for n, p in model.named_parameters()})
    assert not bad, f"{name}: non-finite weights after the run: {bad}"
