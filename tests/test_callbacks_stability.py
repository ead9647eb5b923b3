"""LossSpikeDetector and NonFiniteGuard in real Trainer runs on CPU (tiny LM, single process and 2-process DDP)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_optim as lo
from lightning_optim.callbacks import LossSpikeDetector, NonFiniteGuard
from lightning_optim.callbacks._decisions import TrainingUnstableError
from tests.dist_scripts.stab_common import Probe, TinyLM, all_finite, eval_loss, loader, trainer
from tests.dist_utils import run_distributed

torch.set_num_threads(1)
HERE = Path(__file__).parent


def _assert_unchanged(probe: Probe, step: int) -> None:
    (w0, s0), (w1, s1) = probe.before[step], probe.after[step]
    for name in w0:
        assert torch.equal(w0[name], w1[name]), f"{name} changed on the dropped step"
    assert s0.keys() == s1.keys()
    for key in s0:
        assert torch.equal(s0[key], s1[key]), f"optimizer state {key} changed on the dropped step"


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_skip_detects_spike_and_leaves_weights_and_state_untouched(kind):
    L.seed_everything(0)
    model = TinyLM(inject={"kind": kind, "step": 40, "factor": 1000.0})
    detector = LossSpikeDetector(action="skip", window=16, monitor_grad_norm=(kind == "grad"))
    probe = Probe([39, 40])
    with pytest.warns(RuntimeWarning, match="spike at step 40"):
        trainer([detector, probe], 45).fit(model, loader())
    assert detector.spikes == 1 and detector.skipped == 1
    assert detector.events[0]["step"] == 40
    _assert_unchanged(probe, 40)
    # the step before was a normal step: it did change the weights
    assert not torch.equal(probe.before[39][0]["lm_head.weight"], probe.after[39][0]["lm_head.weight"])


def test_log_action_only_logs():
    L.seed_everything(0)
    model = TinyLM(inject={"kind": "loss", "step": 30})
    detector = LossSpikeDetector(action="log", window=16)
    probe = Probe([30])
    with pytest.warns(RuntimeWarning, match="logged"):
        trainer([detector, probe], 32).fit(model, loader())
    assert detector.spikes == 1 and detector.skipped == 0
    assert not torch.equal(probe.before[30][0]["lm_head.weight"], probe.after[30][0]["lm_head.weight"])


def test_rollback_recovers_final_loss():
    steps, spike = 150, 80
    L.seed_everything(0)
    clean = TinyLM(scheduler="cosine", total_steps=steps)
    trainer([], steps).fit(clean, loader(batch_size=32))
    L.seed_everything(0)
    broken = TinyLM(scheduler="cosine", total_steps=steps, inject={"kind": "loss", "step": spike, "factor": 1e4})
    trainer([], steps).fit(broken, loader(batch_size=32))
    L.seed_everything(0)
    model = TinyLM(scheduler="cosine", total_steps=steps, inject={"kind": "loss", "step": spike, "factor": 1e4})
    detector = LossSpikeDetector(action="rollback", window=32, snapshot_every=20, lr_factor=0.7)
    t = trainer([detector], steps)
    with pytest.warns(RuntimeWarning, match="rollback"):
        t.fit(model, loader(batch_size=32))
    assert detector.rollbacks == 1 and detector.events[0]["step"] == spike
    sched = t.lr_scheduler_configs[0].scheduler
    assert sched.base_lrs[0] == pytest.approx(1e-2 * 0.7)
    assert detector.lr_scale == pytest.approx(0.7)
    final_clean, final_rollback, final_broken = eval_loss(clean), eval_loss(model), eval_loss(broken)
    assert abs(final_rollback - final_clean) / final_clean < 0.02, (final_clean, final_rollback)
    assert final_broken > final_clean * 1.02, "the injection should hurt an unprotected run"


@pytest.mark.parametrize("optimizer", lo.available_optimizers())
def test_nan_gradient_never_reaches_weights_or_state(optimizer):
    try:  # an optional dependency (bitsandbytes for adamw8bit) may be absent
        lo.create_optimizer(optimizer, [torch.nn.Parameter(torch.zeros(2, 2))])
    except ImportError as err:
        pytest.skip(f"{optimizer}: optional dependency missing ({err})")
    L.seed_everything(0)
    model = TinyLM(optimizer=optimizer, lr=1e-3, inject={"kind": "nan_grad", "step": 4})
    guard = NonFiniteGuard()
    probe = Probe([4])
    with pytest.warns(RuntimeWarning, match="non-finite"):
        t = trainer([guard, probe], 6)
        t.fit(model, loader())
    assert guard.total == 1 and guard.consecutive == 0
    _assert_unchanged(probe, 4)
    assert all_finite(model.parameters())
    assert all_finite(v for st in t.optimizers[0].state.values() for v in st.values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_nan_loss_is_dropped(optimizer):
    L.seed_everything(0)
    kw = {"momentum": 0.9} if optimizer == "sgd" else {}
    model = TinyLM(optimizer=optimizer, lr=1e-2, inject={"kind": "nan_loss", "step": 5}, **kw)
    guard = NonFiniteGuard()
    probe = Probe([5])
    with pytest.warns(RuntimeWarning):
        t = trainer([guard, probe], 8)
        t.fit(model, loader())
    _assert_unchanged(probe, 5)
    assert all_finite(model.parameters())
    assert all_finite(v for st in t.optimizers[0].state.values() for v in st.values() if isinstance(v, torch.Tensor))


def test_consecutive_nonfinite_steps_stop_training_and_keep_checkpoint(tmp_path):
    L.seed_everything(0)
    model = TinyLM(inject={"kind": "nan_loss", "steps": list(range(12, 40))})
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_last=True, save_top_k=-1)
    guard = NonFiniteGuard(max_consecutive=3)
    t = trainer([guard, ckpt], 40, enable_checkpointing=True)
    with pytest.warns(RuntimeWarning), pytest.raises(TrainingUnstableError, match="3 consecutive optimizer steps"):
        t.fit(model, loader())
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert last["global_step"] == 10
    assert all_finite(last["state_dict"].values())
    assert all_finite(v for st in last["optimizer_states"][0]["state"].values() for v in st.values())
    assert all_finite(model.parameters())  # the live model too: the dropped steps were restored


def test_ddp_one_rank_spike_and_nan_same_decision(tmp_path):
    run_distributed(HERE / "dist_scripts" / "stab_ddp.py", str(tmp_path), out_dir=tmp_path)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    weights = [torch.load(tmp_path / f"weights{r}.pt", weights_only=True) for r in range(2)]
    for r in results:
        assert r["spikes"] == 1 and r["skipped"] == 1 and r["spike_step"] == 20
        assert r["nonfinite"] == 1
        assert r["finite"]
        assert r["unchanged_20"] and r["unchanged_25"]
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


def test_state_dict_round_trip_and_resume(tmp_path):
    det = LossSpikeDetector(window=8)
    det.losses.extend([1.0, 2.0, 3.0]); det.grad_norms.extend([0.5]); det.spikes = 2; det.rollbacks = 1
    det.lr_scale = 0.49
    det.events.append({"step": 3.0, "loss": 9.0, "z_loss": 7.0, "z_grad_norm": float("nan")})
    path = tmp_path / "s.pt"
    torch.save(det.state_dict(), path)
    other = LossSpikeDetector(window=8)
    other.load_state_dict(torch.load(path, weights_only=True))
    assert list(other.losses) == [1.0, 2.0, 3.0] and other.spikes == 2 and other.rollbacks == 1
    assert other.lr_scale == 0.49 and other.events[0]["loss"] == 9.0

    guard = NonFiniteGuard(); guard.total, guard.consecutive = 4, 2
    torch.save(guard.state_dict(), path)
    g2 = NonFiniteGuard(); g2.load_state_dict(torch.load(path, weights_only=True))
    assert (g2.total, g2.consecutive) == (4, 2)

    # through a real Lightning checkpoint and resume
    L.seed_everything(0)
    det = LossSpikeDetector(window=16)
    t = trainer([det], 20)
    t.fit(TinyLM(), loader())
    t.save_checkpoint(tmp_path / "a.ckpt")
    saved = list(det.losses)
    resumed = LossSpikeDetector(window=16)

    class Check(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.seen = list(resumed.losses)

    check = Check()
    trainer([resumed, check], 22).fit(TinyLM(), loader(), ckpt_path=tmp_path / "a.ckpt")
    assert check.seen == saved and len(saved) == 16


def test_fsdp2_clipping_norms_and_nonfinite_shard(tmp_path):
    run_distributed(HERE / "dist_scripts" / "stab_fsdp2.py", str(tmp_path), out_dir=tmp_path)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["nonfinite"] == 1 and r["unchanged"] and r["finite"]
    rank0 = results[0]
    # step 6 (NaN on rank 1's shard): the guard ran first and zeroed the gradients of the dropped step
    logged = rank0["logged_before"][:6] + rank0["logged_before"][7:]
    assert len(logged) == len(rank0["full_norms"]) == 9
    assert logged == pytest.approx(rank0["full_norms"], rel=1e-5)
    assert all(v <= 0.05 for v in rank0["logged_after"])
    assert rank0["expected_layer_norms"]
    for key, value in rank0["expected_layer_norms"].items():
        assert rank0["logged_layer_norms"][key] == pytest.approx(value, rel=1e-5), key


def test_rollback_from_last_checkpoint(tmp_path):
    L.seed_everything(0)
    model = TinyLM(inject={"kind": "loss", "step": 45})
    detector = LossSpikeDetector(action="rollback", window=16, rollback_source="checkpoint")
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=20, save_last=True, save_top_k=-1)
    probe = Probe([45])
    t = trainer([detector, ckpt, probe], 47, enable_checkpointing=True)
    with pytest.warns(RuntimeWarning, match="rollback"):
        t.fit(model, loader())
    saved = torch.load(tmp_path / "epoch=0-step=40.ckpt", weights_only=False)
    weights_after_rollback = probe.after[45][0]
    for name, value in saved["state_dict"].items():
        assert torch.equal(weights_after_rollback[name], value), name
    assert detector.rollbacks == 1
    assert t.lr_scheduler_configs[0].scheduler.base_lrs[0] == pytest.approx(1e-2 * 0.7)
