"""lightning_optim's optimizers and schedules through LightningCLI's own ``--optimizer`` / ``--lr_scheduler``.

A tiny next-token LightningModule that defines no ``configure_optimizers``: LightningCLI adds one from the
flags. Run from the repository root, e.g.::

    python examples/lightningcli_optimizer.py fit \\
        --optimizer lightning_optim.optim.muon.Muon --optimizer.lr 0.02 \\
        --lr_scheduler lightning_optim.lr_scheduler.PerStepLR --lr_scheduler.schedule wsd \\
        --lr_scheduler.total_steps 4 --trainer.max_steps 4

* ``lightning_optim.lr_scheduler.PerStepLR`` steps after every optimizer step (LightningCLI's own path would step a
  scheduler once per epoch); ``total_steps`` is required by the schedules with a horizon (cosine, linear, wsd).
* Optimizers that need a callback fail at their first step without it, naming it; add it on the command line::

    --optimizer lightning_optim.optim.sophia.SophiaG --trainer.callbacks+=lightning_optim.callbacks.SophiaHessian
    --optimizer lightning_optim.optim.sf_adamw.AdamWScheduleFree \\
        --trainer.callbacks+=lightning_optim.callbacks.ScheduleFreeSwitch

* ``--model.report out.json`` writes, after fit, each parameter group's lr and initial lr, the step count, the
  hybrid optimizers' routing table, the schedule-free mode and, for Sophia, whether the Hessian estimate was
  updated.
"""

from __future__ import annotations

import json

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader, TensorDataset


class TinyLM(pl.LightningModule):
    """Embedding → one hidden linear layer → output head over ``vocab_size`` tokens."""

    def __init__(self, vocab_size: int = 64, dim: int = 16, seq_len: int = 8, batch_size: int = 4,
                 num_batches: int = 8, report: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = torch.nn.Embedding(vocab_size, dim)
        self.hidden = torch.nn.Linear(dim, dim)
        self.lm_head = torch.nn.Linear(dim, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.relu(self.hidden(self.embed(tokens))))

    def logits_for_batch(self, batch: tuple[torch.Tensor]) -> torch.Tensor:
        """The logits of the inputs (what SophiaHessian's Hessian pass needs)."""
        return self(batch[0][:, :-1])

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens = batch[0]
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, hp.vocab_size, (hp.batch_size * hp.num_batches, hp.seq_len + 1), generator=g)
        return DataLoader(TensorDataset(tokens), batch_size=hp.batch_size)

    def on_train_end(self) -> None:
        if self.hparams.report is None:
            return
        opt = self.trainer.optimizers[0]
        report = {
            "optimizer": type(opt).__name__,
            "global_step": self.trainer.global_step,
            "groups": [{"name": g.get("name"), "lr": g["lr"], "initial_lr": g.get("initial_lr"),
                        "params": len(g["params"])} for g in opt.param_groups],
            "routing": opt.routing_table() if callable(getattr(opt, "routing_table", None)) else None,
            "train_mode": getattr(opt, "train_mode", None),  # schedule-free: False (x) after fit
        }
        if callable(getattr(opt, "update_hessian", None)):
            report["hessian_nonzero"] = any(bool(s["hessian"].abs().sum() > 0) for s in opt.state.values())
        with open(self.hparams.report, "w") as f:
            json.dump(report, f, default=list)


def main() -> None:
    LightningCLI(TinyLM, seed_everything_default=0, save_config_callback=None, trainer_defaults=dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False))


if __name__ == "__main__":
    main()
