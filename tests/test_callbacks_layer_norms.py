"""LayerNormMonitor: the logged per-layer norms equal a direct computation."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_optim.callbacks import LayerNormMonitor
from tests.dist_scripts.stab_common import MetricsLogger, TinyLM, loader, trainer

torch.set_num_threads(1)


class Direct(L.Callback):
    """Computes the expected per-module norms by hand on step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.expected: dict[str, float] = {}
        self._before = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step != self.step:
            return
        self._before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        for name, mod in pl_module.named_modules():
            own = list(mod.named_parameters(recurse=False))
            if not own:
                continue
            g = torch.sqrt(sum(p.grad.double().pow(2).sum() for _, p in own))
            w = torch.sqrt(sum(p.detach().double().pow(2).sum() for _, p in own))
            m = torch.sqrt(sum(optimizer.state[p]["exp_avg"].double().pow(2).sum() for _, p in own))
            self.expected[f"norms/grad/{name}"] = float(g)
            self.expected[f"norms/weight/{name}"] = float(w)
            self.expected[f"norms/state_exp_avg/{name}"] = float(m)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._before is None:
            return
        modules = dict(pl_module.named_modules())
        for name, mod in modules.items():
            own = [f"{name}.{n}" if name else n for n, _ in mod.named_parameters(recurse=False)]
            if not own:
                continue
            params = dict(pl_module.named_parameters())
            u = torch.sqrt(sum((params[n].detach().double() - self._before[n].double()).pow(2).sum() for n in own))
            self.expected[f"norms/update/{name}"] = float(u)
            self.expected[f"norms/update_ratio/{name}"] = float(u) / self.expected[f"norms/weight/{name}"]
        self._before = None


def test_logged_norms_equal_direct_computation():
    L.seed_everything(0)
    direct = Direct(step=10)
    monitor = LayerNormMonitor(every_n_steps=5)
    logger = MetricsLogger()
    trainer([direct, monitor], 12, logger=logger).fit(TinyLM(), loader())
    assert direct.expected
    logged = monitor.last_metrics
    for key, value in direct.expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
    # it reached the logger, at steps 0, 5, 10 only
    steps = [s for s, _ in logger.history["norms/grad/lm_head"]]
    assert steps == [1, 6, 11]
    assert "norms/grad/_total" in logged and "norms/update_ratio/lm_head" in logged


def test_state_dict_round_trip(tmp_path):
    monitor = LayerNormMonitor(every_n_steps=7)
    torch.save(monitor.state_dict(), tmp_path / "m.pt")
    LayerNormMonitor().load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
