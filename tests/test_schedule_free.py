"""ScheduleFreeSwitch in a real Trainer: validation and every checkpoint see x, every gradient is taken at y,
a resumed run continues exactly. Compared against a plain loop with the same optimizer."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_optim import OptimizerMixin, create_optimizer
from lightning_optim.callbacks.schedule_free import ScheduleFreeSwitch

HP = dict(lr=0.05, betas=(0.9, 0.999), warmup_steps=2, weight_decay=0.0)  # the mixin exempts biases
N_BATCHES, BATCH = 4, 8


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_BATCHES * BATCH, 5, generator=g, dtype=torch.float64)
    y = x @ torch.randn(5, 1, generator=g, dtype=torch.float64) + 0.1
    return TensorDataset(x, y)


class Regr(OptimizerMixin, pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.save_hyperparameters({"optim": {"name": "sf-adamw", "scheduler": "constant", "extra": HP}})
        torch.manual_seed(0)
        self.net = torch.nn.Linear(5, 1).double()  # float64: the comparison is tight
        self.modes_in_training: list[bool] = []
        self.modes_in_validation: list[bool] = []

    def training_step(self, batch, i):
        self.modes_in_training.append(self.trainer.optimizers[0].param_groups[0]["train_mode"])
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, i):
        self.modes_in_validation.append(self.trainer.optimizers[0].param_groups[0]["train_mode"])
        x, y = batch
        self.log("val", torch.nn.functional.mse_loss(self.net(x), y))

    def train_dataloader(self):
        return DataLoader(_data(), batch_size=BATCH, shuffle=False)

    def val_dataloader(self):
        return DataLoader(_data(), batch_size=BATCH)


def _plain_loop(n_steps):
    """The same run without Lightning; returns x after every step."""
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 1).double()
    opt = create_optimizer("sf-adamw", net.parameters(), **HP)
    batches = list(DataLoader(_data(), batch_size=BATCH, shuffle=False))
    xs = []
    for t in range(n_steps):
        x, y = batches[t % N_BATCHES]
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        opt.eval()
        xs.append({k: v.detach().clone() for k, v in net.state_dict().items()})
        opt.train()
    return xs


def _trainer(tmp_path, epochs, **kw):
    steps = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="{epoch}-{step}", every_n_train_steps=3,
                                         save_top_k=-1)
    ends = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="end-{epoch}-{step}", every_n_epochs=1,
                                          save_top_k=-1, save_on_train_epoch_end=True)
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[steps, ends], num_sanity_val_steps=1, **kw)


def test_schedule_free_switch_in_trainer(tmp_path):
    model = Regr()
    trainer = _trainer(tmp_path, epochs=2)
    trainer.fit(model)
    assert any(isinstance(cb, ScheduleFreeSwitch) for cb in trainer.callbacks)  # added by the mixin
    assert all(model.modes_in_training) and len(model.modes_in_training) == 2 * N_BATCHES
    assert model.modes_in_validation and not any(model.modes_in_validation)

    xs = _plain_loop(2 * N_BATCHES)
    # the model left after fit holds x; a gradient taken at x after validation would break this agreement
    for k, v in model.net.state_dict().items():
        torch.testing.assert_close(v, xs[-1][k], rtol=1e-9, atol=1e-12)
    ckpts = sorted(tmp_path.glob("*.ckpt"))
    steps_seen = set()
    for path in ckpts:
        ck = torch.load(path, weights_only=False)
        step = ck["global_step"]
        steps_seen.add(step)
        assert ck["optimizer_states"][0]["param_groups"][0]["train_mode"] is False
        for k, v in ck["state_dict"].items():
            torch.testing.assert_close(v, xs[step - 1][k.removeprefix("net.")], rtol=1e-9, atol=1e-12, msg=lambda m: f"{path.name}: {m}")
    assert {3, 4, 6, 8} <= steps_seen  # step-interval (3, 6) and epoch-end (4, 8) checkpoints


def test_resume_continues_exactly(tmp_path):
    straight = Regr()
    _trainer(tmp_path / "a", epochs=2).fit(straight)
    first = Regr()
    _trainer(tmp_path / "b", epochs=1).fit(first)
    path = sorted((tmp_path / "b").glob("end-epoch=0-step=4.ckpt"))[0]
    resumed = Regr()
    _trainer(tmp_path / "c", epochs=2).fit(resumed, ckpt_path=path)
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def test_generic_optimizer_with_train_eval():
    """The switch drives any optimizer exposing train()/eval() (SF-NorMuon reuses it)."""

    class Dummy(torch.optim.SGD):
        calls: list[str] = []

        def train(self):
            self.calls.append("train")

        def eval(self):
            self.calls.append("eval")

    opt = Dummy([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    class T:
        optimizers = [opt, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)]

    cb = ScheduleFreeSwitch()
    cb.on_train_batch_start(T, None, None, 0)
    cb.on_validation_start(T, None)
    assert Dummy.calls == ["train", "eval"]
