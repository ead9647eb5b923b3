"""FSDP2 (ModelParallelStrategy, 2 CPU processes): the callbacks on DTensor shards.

- GradientClipping: the logged norm before clipping equals ``get_total_norm(grads).full_tensor()``; after ≤ max.
- LayerNormMonitor: the logged per-layer norms equal a direct ``full_tensor()`` computation (rank 0 logs).
- NonFiniteGuard: a NaN in rank 1's gradient shard only, at step 6: both ranks drop the step; local shards and
  optimizer state unchanged across it; everything finite at the end.

Writes ``rank{r}.json`` under the output directory given as the first argument.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_optim.callbacks import GradientClipping, LayerNormMonitor, NonFiniteGuard
from tests.dist_utils import finish
from tests.dist_scripts.stab_common import MetricsLogger, TinyLM, loader, trainer

torch.set_num_threads(1)
warnings.simplefilter("ignore")
MAX_NORM, NAN_STEP, LOG_STEP = 0.05, 6, 5


class ShardedLM(TinyLM):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.block, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def on_after_backward(self) -> None:
        if self.global_step == NAN_STEP and self.global_rank == 1:
            self.lm_head.weight.grad.to_local()[0, 0] = float("nan")


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class Probe(L.Callback):
    def __init__(self) -> None:
        self.full_norms: list[float] = []
        self.expected: dict[str, float] = {}
        self.before = self.after = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == NAN_STEP:
            self.before = self._local(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == NAN_STEP + 1 and self.after is None:
            self.after = self._local(trainer, pl_module)

    @staticmethod
    def _local(trainer, pl_module):
        w = {n: p.detach().to_local().clone() for n, p in pl_module.named_parameters()}
        s = {f"{i}.{k}": (v.to_local() if hasattr(v, "to_local") else v).detach().clone()
             for i, st in enumerate(trainer.optimizers[0].state.values()) for k, v in st.items()
             if isinstance(v, torch.Tensor)}
        return w, s

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.full_norms.append(float(_full(torch.nn.utils.get_total_norm(grads))))
        if trainer.global_step == LOG_STEP:
            for name, mod in pl_module.named_modules():
                own = list(mod.parameters(recurse=False))
                if own:
                    g = math.sqrt(sum(float(_full(p.grad).double().pow(2).sum()) for p in own))
                    w = math.sqrt(sum(float(_full(p.detach()).double().pow(2).sum()) for p in own))
                    self.expected[f"norms/grad/{name}"] = g
                    self.expected[f"norms/weight/{name}"] = w


def main(out: Path) -> None:
    L.seed_everything(0)
    model = ShardedLM(width=33)  # odd width: uneven shards
    probe = Probe()
    monitor = LayerNormMonitor(every_n_steps=LOG_STEP)
    guard = NonFiniteGuard()
    logger = MetricsLogger()
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False)
    # the probe sees the gradients first, then the guard and the monitor (before clipping), then the clipping
    t = trainer([probe, guard, monitor, GradientClipping(max_norm=MAX_NORM)], 10, devices=2, strategy=strategy,
                logger=logger, log_every_n_steps=1)
    t.fit(model, loader(batch_size=8))
    rank = t.global_rank
    logged_before = [v for _, v in logger.history.get("train/grad_norm", [])]
    logged_after = [v for _, v in logger.history.get("train/grad_norm_clipped", [])]
    finite_norms = [n for n in probe.full_norms if math.isfinite(n)]
    (w0, s0), (w1, s1) = probe.before, probe.after
    result = {
        "rank": rank,
        "nonfinite": guard.total,
        "unchanged": all(torch.equal(w0[k], w1[k]) for k in w0) and all(torch.equal(s0[k], s1[k]) for k in s0),
        "finite": all(bool(torch.isfinite(p.detach().to_local()).all()) for p in model.parameters()),
        "full_norms": finite_norms,
        "logged_before": [v for v in logged_before if math.isfinite(v)],
        "logged_after": [v for v in logged_after if math.isfinite(v)],
        "expected_layer_norms": probe.expected,
        "logged_layer_norms": {k: v for k, v in monitor.last_metrics.items() if k in probe.expected},
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    finish(out)  # results written: barrier, destroy the group, leave without interpreter finalisation


if __name__ == "__main__":
    main(Path(sys.argv[1]))
