"""OptimizerMixin in a real Trainer: the lr follows the schedule step by step; resume restores both states."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_optim import OptimConfig, OptimizerMixin


class RecordLR(Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


class Body(L.LightningModule):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 4, generator=g)
        dataset = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
        return torch.utils.data.DataLoader(dataset, batch_size=self.batch_size)

    batch_size = 4


class Tiny(OptimizerMixin, Body):
    def __init__(self, optim: OptimConfig = OptimConfig()):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.Linear(16, 1))


class Flat(OptimizerMixin, Body):
    def __init__(self, optimizer="sgd", lr=0.05, scheduler="linear", warmup_steps=3, width=16):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, width), nn.Linear(width, 1))


def trainer(tmp_path, **kw):
    return L.Trainer(
        default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", **kw,
    )


def test_lr_follows_the_schedule_every_step(tmp_path):
    rec = RecordLR()
    model = Tiny(OptimConfig(name="adamw", lr=1e-2, scheduler="wsd", warmup_steps=4, decay_fraction=0.5))
    trainer(tmp_path, max_steps=12, callbacks=[rec], enable_checkpointing=False).fit(model)
    sched = model.trainer.lr_scheduler_configs[0]
    assert sched.interval == "step"
    f = sched.scheduler.schedule
    assert f.total_steps == 12  # horizon from trainer.max_steps
    assert len(rec.lrs) == 12
    for t, lrs in enumerate(rec.lrs):
        assert lrs == [pytest.approx(1e-2 * f(t))] * 2  # both groups (decay, no_decay) follow
    assert rec.lrs[4] == [pytest.approx(1e-2)] * 2 and rec.lrs[0] == [0.0, 0.0]


def test_flat_hyperparameters_and_estimated_horizon(tmp_path):
    rec = RecordLR()
    model = Flat()
    trainer(tmp_path, max_epochs=2, callbacks=[rec], enable_checkpointing=False).fit(model)
    opt = model.trainer.optimizers[0]
    assert isinstance(opt, torch.optim.SGD)
    sched = model.trainer.lr_scheduler_configs[0].scheduler
    assert sched.schedule.total_steps == 32  # 2 epochs × 16 batches, read after the loader was set up
    assert rec.lrs[-1][0] == pytest.approx(0.05 * sched.schedule(31))


def test_resume_restores_optimizer_and_scheduler_state(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    # 4 batches an epoch; the checkpoint at step 4 ends epoch 0, so a plain DataLoader resumes in order
    cfg = OptimConfig(name="adamw", lr=1e-2, scheduler="cosine", warmup_steps=2)
    torch.manual_seed(0)
    straight = Tiny(cfg)
    straight.batch_size = 16
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1, filename="{step}")
    trainer(tmp_path / "a", max_steps=10, callbacks=[ckpts]).fit(straight)
    ckpt = tmp_path / "ckpt" / "step=4.ckpt"
    saved = torch.load(ckpt, weights_only=True)  # hyperparameters and scheduler state are plain data
    assert saved["lr_schedulers"][0]["last_epoch"] == 4

    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    resumed = Tiny(cfg)
    resumed.batch_size = 16
    rec = RecordLR()
    t2 = trainer(tmp_path / "c", max_steps=10, callbacks=[rec], enable_checkpointing=False)
    t2.fit(resumed, ckpt_path=ckpt)
    f = t2.lr_scheduler_configs[0].scheduler.schedule
    assert [lr[0] for lr in rec.lrs] == [pytest.approx(1e-2 * f(t)) for t in range(4, 10)]
    for p, q in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)  # bit for bit on CPU


def test_config_is_validated_before_training():
    with pytest.raises(ValueError, match="Did you mean 'adamw'"):
        OptimConfig(name="adamww")
    with pytest.raises(ValueError, match="lr must be >= 0"):
        OptimConfig(lr=-1.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        OptimConfig(total_steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="decay_fraction"):
        OptimConfig(scheduler="wsd", decay_fraction=0.0)
    with pytest.raises(ValueError, match="does not apply to schedule 'cosine'"):
        OptimConfig(scheduler="cosine", cooldown_shape="linear")
    with pytest.raises(ValueError, match="unknown hyperparameter.*'alpha'"):
        OptimConfig(name="adamw", extra={"alpha": 8})


def test_param_groups_override_hook(tmp_path):
    class OneGroup(Tiny):
        def optimizer_param_groups(self, config, split_matrices):
            return [{"params": list(self.parameters()), "name": "everything"}]

    model = OneGroup()
    trainer(tmp_path, max_steps=1, enable_checkpointing=False).fit(model)
    assert [g["name"] for g in model.trainer.optimizers[0].param_groups] == ["everything"]


def test_lightning_cli_configures_the_module(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    cli = LightningCLI(
        Tiny, run=False, auto_configure_optimizers=False, save_config_kwargs={"overwrite": True},
        args=["--model.optim.name", "sgd", "--model.optim.lr", "0.02", "--model.optim.scheduler", "wsd",
              "--model.optim.decay_fraction", "0.5",
              "--trainer.max_steps", "6", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
              "--trainer.enable_progress_bar", "false", f"--trainer.default_root_dir={tmp_path}"],
    )
    assert cli.model.optim_config() == OptimConfig(name="sgd", lr=0.02, scheduler="wsd", decay_fraction=0.5)
    cli.trainer.fit(cli.model)
    assert isinstance(cli.trainer.optimizers[0], torch.optim.SGD)
    sched = cli.trainer.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == 6 and sched.schedule.decay_start == 3  # the last half of 6 steps
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == 0.0  # wsd ends at final_fraction 0


def test_horizon_hyperparameters_are_filled_from_the_schedule(tmp_path):
    model = Tiny(OptimConfig(name="ademamix", scheduler="cosine"))
    trainer(tmp_path, max_steps=3, enable_checkpointing=False).fit(model)
    group = model.trainer.optimizers[0].param_groups[0]
    assert group["alpha_warmup"] == 3 and group["beta3_warmup"] == 3  # the benchmark's "warmups = total steps"
    explicit = Tiny(OptimConfig(name="ademamix", extra={"alpha_warmup": 100, "beta3_warmup": 0}))
    trainer(tmp_path, max_steps=1, enable_checkpointing=False).fit(explicit)
    group = explicit.trainer.optimizers[0].param_groups[0]
    assert group["alpha_warmup"] == 100 and group["beta3_warmup"] == 0
