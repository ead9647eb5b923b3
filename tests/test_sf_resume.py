"""Schedule-free resume through a real Trainer is bit-exact, whether or not a validation lands on the
checkpoint step.

For ``sf-adamw`` and ``sf-normuon``: ``2k`` steps straight (validation every ``val_every`` steps, a
step-interval checkpoint every ``k``) must equal ``k`` steps → the checkpoint of step ``k`` → a fresh
Trainer and model resumed from it → ``k`` more steps, bit for bit in the weights, the optimizer state (``z``,
moments, the schedule-free clock) and the modes. Every eval/train switch costs a rounding (``y → x → y`` is
not the identity in floating point), so the two runs agree only if the resumed one sees exactly the switches
the straight one saw after the checkpoint was written.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_optim import OptimizerMixin
from tests.conformance._helpers import diff_states

K = 4  # steps before and after the checkpoint
BATCH = 4
N_BATCHES = 4 * K  # one epoch covers the whole run: the resume lands mid-epoch
HP = {
    "sf-adamw": dict(lr=5e-2, betas=(0.9, 0.999), warmup_steps=2),
    "sf-normuon": dict(lr=2e-1, warmup_steps=2, adamw_lr=2e-1),
}


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of one optimizer step, a function of the step alone: a plain DataLoader resumed mid-epoch
    restarts the epoch from its first batch, which would make the runs differ for a reason that has nothing
    to do with the optimizer."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(BATCH, 6, generator=g)
    return x, torch.tanh(x @ torch.linspace(-1, 1, 6).unsqueeze(1))


class MLP(OptimizerMixin, pl.LightningModule):
    """Two matrices (Muon's rule under sf-normuon) and biases (its internal SF-AdamW); float32."""

    def __init__(self, name: str):
        super().__init__()
        self.save_hyperparameters({"optim": {"name": name, "scheduler": "constant", "extra": HP[name]}})
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 256), torch.nn.Tanh(), torch.nn.Linear(256, 1))
        with torch.no_grad():  # small weights: the steps are large next to them, so is every switch's rounding
            for p in self.net.parameters():
                p.mul_(1e-2)

    def training_step(self, batch, i):
        x, y = _batch(self.global_step)
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, i):
        x, y = _batch(10_000 + i)
        self.log("val", torch.nn.functional.mse_loss(self.net(x), y))

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(N_BATCHES)), batch_size=1)  # a clock

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(2)), batch_size=1)


def _fit(name: str, dirpath, val_every: int, ckpt_path=None) -> tuple[MLP, pl.Trainer]:
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=dirpath, filename="{step}", every_n_train_steps=K, save_top_k=-1)
    trainer = pl.Trainer(max_steps=2 * K, val_check_interval=val_every, check_val_every_n_epoch=None,
                         limit_val_batches=2, num_sanity_val_steps=0, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[ckpt])
    model = MLP(name)
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, trainer


def _an_extra_switch_would_show(name: str, path) -> bool:
    """Whether one more eval/train round trip on the checkpoint's state changes a bit of the weights: the
    guard that this test can see a switch too many (at small steps the round trip is often exact)."""
    ck = torch.load(path, weights_only=False)
    model = MLP(name)
    model.load_state_dict(ck["state_dict"])
    opt = model.configure_optimizers()["optimizer"]
    opt.load_state_dict(ck["optimizer_states"][0])
    opt.train()
    before = [p.detach().clone() for p in model.parameters()]
    opt.eval()
    opt.train()
    return any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("val_every", [K, 3], ids=["val-on-checkpoint-step", "val-off-checkpoint-step"])
@pytest.mark.parametrize("name", ["sf-adamw", "sf-normuon"])
def test_trainer_resume_is_bit_exact(name, val_every, tmp_path):
    straight, t_straight = _fit(name, tmp_path / "straight", val_every)
    path = tmp_path / "straight" / f"step={K}.ckpt"
    assert path.is_file(), sorted(p.name for p in (tmp_path / "straight").iterdir())
    assert _an_extra_switch_would_show(name, path)
    resumed, t_resumed = _fit(name, tmp_path / "resumed", val_every, ckpt_path=path)
    assert t_straight.global_step == t_resumed.global_step == 2 * K

    problems = diff_states(straight.state_dict(), resumed.state_dict())
    problems += [f"optimizer {p}" for p in diff_states(t_straight.optimizers[0].state_dict(),
                                                       t_resumed.optimizers[0].state_dict())]
    assert not problems, f"{name}: {2 * K} steps straight != {K} + resume + {K}:\n  " + "\n  ".join(problems)
    # so are the files both write at step 2k: weights x, optimizer state in eval mode
    a = torch.load(tmp_path / "straight" / f"step={2 * K}.ckpt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / f"step={2 * K}.ckpt", weights_only=False)
    problems = diff_states(a["state_dict"], b["state_dict"])
    problems += [f"optimizer {p}" for p in diff_states(a["optimizer_states"], b["optimizer_states"])]
    assert not problems, f"{name}: checkpoints of step {2 * K} differ:\n  " + "\n  ".join(problems)
    assert all(g["train_mode"] is False for g in a["optimizer_states"][0]["param_groups"])
    # the run did move (a no-op optimizer would pass the comparison above)
    fresh = MLP(name)
    assert not torch.equal(fresh.net[0].weight, straight.net[0].weight)
