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


# -- the schedule-free core shared by sf-adamw and sf-normuon ------------------------------------------------


def test_clock_follows_the_formula():
    """lr_t = lr·min(1, t/warmup), c = w_t/Σw with w = t^r·lr_max^power (r 0, power 2: lr_t²/Σ lr_i²)."""
    from lightning_optim.optim._schedule_free import clock_defaults, tick

    group = {"lr": 0.3, **clock_defaults(warmup_steps=3, r=0.0, weight_lr_power=2.0)}
    lrs = [0.1, 0.2, 0.3, 0.3, 0.3]
    for t, lr_t in enumerate(lrs, start=1):
        got_lr, c = tick(group)
        assert got_lr == pytest.approx(lr_t) and group["scheduled_lr"] == got_lr and group["k"] == t
        assert c == pytest.approx(lr_t ** 2 / sum(x ** 2 for x in lrs[:t]))
    group = {"lr": 1.0, **clock_defaults(warmup_steps=0, r=1.0, weight_lr_power=0.0)}
    assert [tick(group)[1] for _ in range(3)] == pytest.approx([1.0, 2 / 3, 3 / 6])  # w_t = t


@pytest.mark.parametrize("name", ["sf-adamw", "sf-normuon"])
def test_train_eval_have_the_reference_signature(name):
    """train() / eval() take no argument and return None, as schedulefree's do; both are idempotent and
    eval() gives x = (y - (1-β1)·z)/β1."""
    import inspect

    schedulefree = pytest.importorskip("schedulefree")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)).double()
    opt = create_optimizer(name, net, lr=0.1, warmup_steps=1)
    for meth in ("train", "eval"):
        assert list(inspect.signature(getattr(opt, meth)).parameters) == list(
            inspect.signature(getattr(schedulefree.AdamWScheduleFree([torch.zeros(1)]), meth)).parameters) == []
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(8, 4, dtype=torch.float64)).square().mean().backward()
        opt.step()
    y = [p.detach().clone() for p in net.parameters()]
    assert opt.eval() is None and opt.eval() is None and not opt.train_mode
    beta1 = {id(p): g["betas"][0] for g in opt.param_groups for p in g["params"]}
    for p, yp in zip(net.parameters(), y):
        z = opt.state[p]["z"]
        torch.testing.assert_close(p.detach(), (yp - (1 - beta1[id(p)]) * z) / beta1[id(p)], rtol=1e-12, atol=1e-14)
    assert opt.train() is None and opt.train() is None and opt.train_mode
    for p, yp in zip(net.parameters(), y):
        torch.testing.assert_close(p.detach(), yp, rtol=1e-12, atol=1e-14)


def test_sf_normuon_non_matrix_rule_is_sf_adamw():
    """SF-NorMuon's non-matrix parameters take the SF-AdamW step (same core): without weight decay, where the
    two differ only in where the decay is taken (z vs y), the trajectories agree bit for bit."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(7))
    b = torch.nn.Parameter(a.detach().clone())
    hp = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-8, warmup_steps=2)
    sf_adamw = create_optimizer("sf-adamw", [a], weight_decay=0.0, **hp)
    sf_normuon = create_optimizer("sf-normuon", [{"params": [b], "matrix": False}], adamw_lr=hp["lr"],
                                  adamw_betas=hp["betas"], adamw_eps=hp["eps"], adamw_weight_decay=0.0,
                                  warmup_steps=hp["warmup_steps"])
    for step in range(5):
        g = torch.randn(7, generator=torch.Generator().manual_seed(step))
        a.grad, b.grad = g.clone(), g.clone()
        sf_adamw.step()
        sf_normuon.step()
        assert torch.equal(a, b), step
    assert torch.equal(sf_adamw.state[a]["z"], sf_normuon.state[b]["z"])
    assert not torch.equal(a.detach(), sf_adamw.state[a]["z"])  # the iterates did separate


@pytest.mark.parametrize("name, field", [("sf-adamw", "betas"), ("sf-normuon", "betas"),
                                         ("sf-normuon", "adamw_betas")])
def test_zero_beta1_is_refused(name, field):
    with pytest.raises(ValueError, match=rf"{field}\[0\] must be > 0"):
        create_optimizer(name, torch.nn.Linear(3, 3), **{field: (0.0, 0.99)})


def test_save_inside_a_training_batch_returns_to_train_mode(tmp_path):
    """A checkpoint written between backward and the optimizer step holds x and leaves the optimizer in train
    mode (the step would raise in eval mode). (A save after a batch leaves it in eval until the next batch:
    tests/test_sf_resume.py.)"""

    class SaveBeforeStep(pl.Callback):
        def __init__(self):
            self.modes_after_save: list[tuple[str, bool]] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 2:
                trainer.save_checkpoint(tmp_path / "inside.ckpt")
                self.modes_after_save.append(("inside", optimizer.train_mode))

    probe = SaveBeforeStep()
    model = Regr()
    trainer = pl.Trainer(max_steps=N_BATCHES, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[probe])
    trainer.fit(model)
    assert probe.modes_after_save == [("inside", True)]
    assert all(model.modes_in_training) and len(model.modes_in_training) == N_BATCHES
    xs = _plain_loop(N_BATCHES)
    inside = torch.load(tmp_path / "inside.ckpt", weights_only=False)  # saved before step 3's update: x_2
    for k, v in inside["state_dict"].items():
        torch.testing.assert_close(v, xs[1][k.removeprefix("net.")], rtol=1e-9, atol=1e-12)
    assert inside["optimizer_states"][0]["param_groups"][0]["train_mode"] is False


# ---------------------------------------------------------------------------------------------------------
# built without the mixin (LightningCLI's --optimizer): the switch callback is required, plain loops are not checked


class PlainRegr(pl.LightningModule):
    """configure_optimizers returns the optimizer class's instance directly, as LightningCLI's does."""

    def __init__(self, cls_name: str):
        super().__init__()
        self.cls_name = cls_name
        torch.manual_seed(0)
        self.net = torch.nn.Linear(5, 3).double()

    def training_step(self, batch, i):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y.expand(-1, 3))

    def configure_optimizers(self):
        from lightning_optim.optim.sf_adamw import AdamWScheduleFree
        from lightning_optim.optim.sf_normuon import SFNorMuon

        cls = {"sf-adamw": AdamWScheduleFree, "sf-normuon": SFNorMuon}[self.cls_name]
        return cls(self.parameters(), lr=0.01, warmup_steps=1)

    def train_dataloader(self):
        return DataLoader(_data(), batch_size=BATCH, shuffle=False)


def _bare_trainer(**kw):
    return pl.Trainer(max_steps=N_BATCHES, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, **kw)


@pytest.mark.parametrize("name,cls", [("sf-adamw", "AdamWScheduleFree"), ("sf-normuon", "SFNorMuon")])
def test_trainer_without_the_switch_raises_at_the_first_step_naming_it(name, cls):
    model = PlainRegr(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _bare_trainer()
    with pytest.raises(RuntimeError, match=rf"{cls} .*without the ScheduleFreeSwitch callback"):
        trainer.fit(model)
    assert trainer.global_step == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_trainer_with_the_switch_trains_and_ends_in_eval_mode():
    model = PlainRegr("sf-adamw")
    before = model.net.weight.detach().clone()
    trainer = _bare_trainer(callbacks=[ScheduleFreeSwitch()])
    trainer.fit(model)
    opt = trainer.optimizers[0]
    assert trainer.global_step == N_BATCHES and not opt.train_mode  # on_train_end left x in the parameters
    assert not torch.equal(model.net.weight.detach(), before)


def test_plain_loop_and_fabric_are_not_checked_eval_mode_still_refuses():
    from lightning.fabric import Fabric

    torch.manual_seed(0)
    net = torch.nn.Linear(5, 1).double()
    opt = create_optimizer("sf-adamw", net.parameters(), **HP)
    x, y = next(iter(DataLoader(_data(), batch_size=BATCH)))
    for _ in range(2):  # a plain loop: no callback, no error
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    assert opt.param_groups[0]["k"] == 2
    opt.eval()
    with pytest.raises(RuntimeError, match=r"step\(\) called in eval mode: call optimizer\.train\(\)"):
        opt.step()

    fabric = Fabric(accelerator="cpu", devices=1)
    net2 = torch.nn.Linear(5, 1).double()
    model, fopt = fabric.setup(net2, create_optimizer("sf-adamw", net2.parameters(), **HP))
    for _ in range(2):
        fopt.zero_grad()
        fabric.backward(torch.nn.functional.mse_loss(model(x), y))
        fopt.step()
    assert fopt.optimizer.param_groups[0]["k"] == 2
