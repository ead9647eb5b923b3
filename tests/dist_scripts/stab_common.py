"""A tiny language model and data for the stability-callback tests (CPU, seconds per run).

The task is learnable (the next token is a fixed function of the current one), so the loss falls steadily and
a spike stands out. ``inject`` multiplies the loss or the gradients by a factor, or puts a NaN in them, at a
chosen optimizer step and (optionally) on one rank only.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning_optim as lo

VOCAB = 32
SEQ = 16


class Windows(Dataset):
    def __init__(self, n: int = 4096, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        steps = torch.arange(SEQ + 1)
        data = (start * 5 + steps * 3) % VOCAB  # x_{t+1} = x_t + 3 (mod V) ...
        noise = torch.randint(0, VOCAB, data.shape, generator=g)
        keep = torch.rand(data.shape, generator=g) < 0.6  # ... for 60% of the tokens: the loss has a floor
        self.data = torch.where(keep, data, noise)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        row = self.data[i]
        return row[:-1], row[1:]


class TinyLM(L.LightningModule):
    def __init__(self, optimizer: str = "adamw", lr: float = 1e-2, scheduler: str = "constant",
                 total_steps: int = 100, width: int = 32, inject: dict | list | None = None, **opt_kw: Any) -> None:
        super().__init__()
        self.optimizer_name, self.lr, self.scheduler_name = optimizer, lr, scheduler
        self.total_steps, self.opt_kw = total_steps, opt_kw
        self.inject = inject or {}
        self.emb = nn.Embedding(VOCAB, width)
        self.block = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.lm_head = nn.Linear(width, VOCAB)
        self.losses: list[float] = []

    def forward(self, x):
        h = self.emb(x)
        h = h + self.block(h)
        return self.lm_head(h)

    def _injection(self) -> dict | None:
        """The injection for this step and rank: ``inject`` is one dict or a list of dicts with ``kind``, ``step``
        (or ``steps``), optional ``rank`` and ``factor``."""
        specs = self.inject if isinstance(self.inject, list) else [self.inject] if self.inject else []
        for spec in specs:
            steps = spec.get("steps", [spec.get("step", -1)])
            rank = spec.get("rank")
            if self.global_step in steps and (rank is None or rank == self.global_rank):
                return spec
        return None

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        self.losses.append(float(loss.detach()))
        spec = self._injection()
        if spec is not None:
            kind = spec["kind"]
            if kind == "loss":
                loss = loss * spec.get("factor", 1000.0)
            elif kind == "nan_loss":
                loss = loss * float("nan")
        self.log("train/loss", loss, on_step=True)
        return loss

    def on_after_backward(self) -> None:
        spec = self._injection()
        if spec is not None:
            kind = spec["kind"]
            if kind == "grad":
                for p in self.parameters():
                    if p.grad is not None:
                        p.grad.mul_(spec.get("factor", 1000.0))
            elif kind == "nan_grad":
                self.lm_head.weight.grad[0, 0] = float("nan")

    def logits_for_batch(self, batch):
        """The logits Sophia-G's Hessian pass (SophiaHessian) samples labels from."""
        return self(batch[0])

    def configure_callbacks(self):
        """The callbacks the optimizer's registry entry needs (SophiaHessian, ScheduleFreeSwitch): without
        them those optimizers refuse to step in a Trainer."""
        from lightning_optim.class_paths import import_object

        return [import_object(path)() for path in lo.optimizer_info(self.optimizer_name).callbacks]

    def configure_optimizers(self):
        opt = lo.create_optimizer(self.optimizer_name, self, lr=self.lr, **self.opt_kw)
        sched = lo.create_scheduler(self.scheduler_name, opt, total_steps=self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader(batch_size: int = 16, n: int = 4096, seed: int = 0, **kw: Any) -> DataLoader:
    return DataLoader(Windows(n, seed), batch_size=batch_size, shuffle=False, **kw)


def trainer(callbacks: list, max_steps: int, **kw: Any) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    defaults.update(kw)
    return L.Trainer(callbacks=callbacks, **defaults)


def eval_loss(model: TinyLM, n: int = 512) -> float:
    data = Windows(n, seed=123)
    with torch.no_grad():
        logits = model(data.data[:, :-1])
        return float(F.cross_entropy(logits.reshape(-1, VOCAB), data.data[:, 1:].reshape(-1)))


def flat_state(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, (p, st) in enumerate(opt.state.items()):
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"{i}.{k}"] = v.detach().clone()
    return out


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def is_close_rel(a: float, b: float, rel: float) -> bool:
    return math.isclose(a, b, rel_tol=rel)


class Probe(L.Callback):
    """Records the weights and optimizer state at the start and the end of chosen optimizer steps."""

    def __init__(self, steps) -> None:
        self.steps = set(steps)
        self.before: dict[int, tuple] = {}
        self.after: dict[int, tuple] = {}
        self._current = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._current = trainer.global_step if trainer.global_step in self.steps else None
        if self._current is not None:
            self.before[self._current] = self._grab(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._current is not None:
            self.after[self._current] = self._grab(trainer, pl_module)

    @staticmethod
    def _grab(trainer, pl_module):
        params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        return params, flat_state(trainer.optimizers[0])


class MetricsLogger(L.pytorch.loggers.Logger):
    """Keeps every logged metric in memory: ``history[name] = [(step, value), ...]``."""

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[str, list] = {}

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        for k, v in metrics.items():
            self.history.setdefault(k, []).append((step, float(v)))
