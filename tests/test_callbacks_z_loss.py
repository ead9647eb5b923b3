"""ZLoss: gradients equal an explicit cross_entropy + alpha·lse² loss; it lowers the logsumexp over a run."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_optim.callbacks import ZLoss
from lightning_optim.callbacks.z_loss import z_loss, z_loss_paused
from tests.dist_scripts.stab_common import VOCAB, MetricsLogger, TinyLM, Windows, loader, trainer

torch.set_num_threads(1)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("accumulate", [1, 3])
def test_gradients_equal_explicit_loss(accumulate):
    torch.manual_seed(0)
    alpha = 0.05
    model = TinyLM().double()
    reference = copy.deepcopy(model)
    x, y = Windows(8).data[:, :-1], Windows(8).data[:, 1:]

    cb = ZLoss(alpha=alpha)
    cb.setup(SimpleNamespace(training=True, accumulate_grad_batches=accumulate), model, "fit")
    model.train()
    logits = model(x)
    (F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1)) / accumulate).backward()
    cb.teardown(None, model, "fit")

    logits = reference(x)
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1)) + z_loss(logits, alpha)
    (loss / accumulate).backward()

    got, want = _grads(model), _grads(reference)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-8)  # z-loss math is float32 by design
    assert cb._calls == 1
    assert float(cb._sum_z) == pytest.approx(float(z_loss(logits.detach(), alpha)), rel=1e-6)


def test_inactive_outside_training_forward():
    model = TinyLM()
    cb = ZLoss(alpha=1.0)
    cb.setup(SimpleNamespace(training=True, accumulate_grad_batches=1), model, "fit")
    x = Windows(4).data[:, :-1]
    model.eval()
    out = model(x)
    assert out.grad_fn is None or "AddZLossGrad" not in type(out.grad_fn).__name__
    model.train()
    with torch.no_grad():
        model(x)
    with z_loss_paused():
        out = model(x)
    assert "AddZLossGrad" not in type(out.grad_fn).__name__
    assert cb._calls == 0
    out = model(x)
    assert "AddZLossGrad" in type(out.grad_fn).__name__ and cb._calls == 1
    cb.teardown(None, model, "fit")


def _mean_lse(model) -> float:
    data = Windows(256, seed=7).data[:, :-1]
    with torch.no_grad():
        return float(torch.logsumexp(model(data).float(), -1).mean())


def test_run_lowers_logsumexp_and_logs():
    steps = 60
    L.seed_everything(0)
    plain = TinyLM(lr=1e-2)
    trainer([], steps).fit(plain, loader())
    L.seed_everything(0)
    with_z = TinyLM(lr=1e-2)
    logger = MetricsLogger()
    trainer([ZLoss(alpha=0.05)], steps, logger=logger, log_every_n_steps=5).fit(with_z, loader())
    assert abs(_mean_lse(with_z)) < abs(_mean_lse(plain)) - 0.1, (_mean_lse(with_z), _mean_lse(plain))
    assert "train/z_loss" in logger.history and "train/logsumexp" in logger.history
    assert all(v >= 0 for _, v in logger.history["train/z_loss"])


def test_state_dict_round_trip(tmp_path):
    cb = ZLoss(alpha=3e-5)
    torch.save(cb.state_dict(), tmp_path / "z.pt")
    other = ZLoss()
    other.load_state_dict(torch.load(tmp_path / "z.pt", weights_only=True))
    assert other.alpha == 3e-5
