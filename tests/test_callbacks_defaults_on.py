"""The stability callbacks as recipes turn them on by default: NonFiniteGuard + LossSpikeDetector(skip/rollback)
+ GradientClipping + LayerNormMonitor together.

- one event has one owner, whatever the order of the callbacks: a non-finite step is the guard's, a finite
  spike the detector's;
- a diverging run stops with TrainingUnstableError out of ``trainer.fit`` (a non-zero exit status for a script)
  and leaves finite weights and optimizer state;
- cost: one host read per step for all of them together, one ``torch._foreach_norm`` pass per step shared by
  the guard, the detector and the clipping; ``enabled=False`` costs nothing and does nothing.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_optim.callbacks import GradientClipping, LayerNormMonitor, LossSpikeDetector, NonFiniteGuard
from lightning_optim.callbacks._decisions import StepGate, TrainingUnstableError
from tests.dist_scripts.stab_common import Probe, TinyLM, all_finite, loader, trainer

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def _unchanged(probe: Probe, step: int) -> bool:
    (w0, s0), (w1, s1) = probe.before[step], probe.after[step]
    return all(torch.equal(w0[k], w1[k]) for k in w0) and all(torch.equal(s0[k], s1[k]) for k in s0)


def _ordered(guard, detector, guard_first: bool) -> list:
    return [guard, detector] if guard_first else [detector, guard]


# ------------------------------------------------------------------ ownership
@pytest.mark.parametrize("guard_first", [True, False], ids=["guard-first", "detector-first"])
@pytest.mark.parametrize("action", ["rollback", "skip"])
@pytest.mark.parametrize("kind", ["nan_loss", "nan_grad"])
def test_nonfinite_step_is_the_guards_alone(guard_first, action, kind):
    L.seed_everything(0)
    model = TinyLM(inject={"kind": kind, "step": 30})
    guard = NonFiniteGuard()
    detector = LossSpikeDetector(action=action, window=16, snapshot_every=10, monitor_grad_norm=True)
    probe = Probe([30])
    with pytest.warns(RuntimeWarning, match="NonFiniteGuard: non-finite"):
        t = trainer(_ordered(guard, detector, guard_first) + [probe], 34)
        t.fit(model, loader())
    assert guard.total == 1
    assert (detector.spikes, detector.skipped, detector.rollbacks) == (0, 0, 0)
    assert detector.lr_scale == 1.0 and t.lr_scheduler_configs[0].scheduler.base_lrs[0] == pytest.approx(1e-2)
    # the dropped step's loss and gradient norm never entered the windows (33 finite steps, window 16)
    assert len(detector.losses) == 16 and all(torch.isfinite(torch.tensor(list(detector.losses))))
    assert all(torch.isfinite(torch.tensor(list(detector.grad_norms))))
    assert _unchanged(probe, 30)
    assert all_finite(model.parameters())


@pytest.mark.parametrize("guard_first", [True, False], ids=["guard-first", "detector-first"])
def test_finite_spike_is_the_detectors_alone(guard_first):
    L.seed_everything(0)
    model = TinyLM(inject={"kind": "loss", "step": 30, "factor": 1000.0})
    guard, detector = NonFiniteGuard(), LossSpikeDetector(action="skip", window=16)
    probe = Probe([30])
    with pytest.warns(RuntimeWarning, match="spike at step 30"):
        trainer(_ordered(guard, detector, guard_first) + [probe], 32).fit(model, loader())
    assert detector.spikes == 1 and detector.skipped == 1 and guard.total == 0
    assert _unchanged(probe, 30)


def test_detector_alone_still_treats_nonfinite_as_spike():
    L.seed_everything(0)
    detector = LossSpikeDetector(action="skip", window=16)
    probe = Probe([20])
    with pytest.warns(RuntimeWarning, match="spike at step 20"):
        trainer([detector, probe], 22).fit(TinyLM(inject={"kind": "nan_loss", "step": 20}), loader())
    assert detector.skipped == 1 and _unchanged(probe, 20)


# ------------------------------------------------------------------ divergence
def _diverging(lr: float = 100.0) -> TinyLM:
    return TinyLM(optimizer="sgd", lr=lr)  # loss 3.6 -> 410 -> 1e15 -> NaN from step 3


def test_diverging_run_raises_out_of_fit_with_finite_weights():
    L.seed_everything(0)
    model = _diverging()
    guard = NonFiniteGuard(max_consecutive=4)
    callbacks = [LossSpikeDetector(action="skip", window=16), guard, LayerNormMonitor(every_n_steps=50)]
    t = trainer(callbacks, 60)
    with pytest.warns(RuntimeWarning), pytest.raises(TrainingUnstableError, match="4 consecutive optimizer steps"):
        t.fit(model, loader())
    assert guard.total == 4 and t.global_step < 60
    assert all_finite(model.parameters())
    state = [v for st in t.optimizers[0].state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    assert state and all_finite(state)
    assert not StepGate.dropping(t.optimizers[0])  # the pending drop was restored before raising


def test_diverging_script_exits_nonzero(tmp_path):
    script = tmp_path / "diverge.py"
    script.write_text(
        "import warnings; warnings.simplefilter('ignore')\n"
        "import lightning as L, torch\n"
        "from lightning_optim.callbacks import NonFiniteGuard\n"
        "from tests.dist_scripts.stab_common import TinyLM, loader, trainer\n"
        "torch.set_num_threads(1); L.seed_everything(0)\n"
        "trainer([NonFiniteGuard(max_consecutive=3)], 60).fit(TinyLM(optimizer='sgd', lr=100.0), loader())\n"
        "print('FINISHED')\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "TrainingUnstableError" in proc.stderr and "3 consecutive optimizer steps" in proc.stderr
    assert "FINISHED" not in proc.stdout


# ------------------------------------------------------------------ cost
class _HostReads(L.Callback):
    """Counts reads of tensor values on the host (``item``, ``tolist``, ``bool``/``float``/``int``, ``cpu``,
    ``numpy``) per optimizer step; on an accelerator each is a device sync."""

    METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        self.per_step: list[int] = []
        self._mark = 0
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)

            def counted(*args, _original=original, **kwargs):
                self.count += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._mark = self.count

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.per_step.append(self.count - self._mark)


def _defaults(enabled: bool = True) -> list:
    return [NonFiniteGuard(enabled=enabled), LossSpikeDetector(action="skip", window=8, enabled=enabled),
            GradientClipping(max_norm=1.0, enabled=enabled), LayerNormMonitor(every_n_steps=50, enabled=enabled)]


def _reads_per_step(monkeypatch, callbacks: list, **kw) -> int:
    with monkeypatch.context() as m:
        reads = _HostReads(m)
        L.seed_everything(0)
        trainer(callbacks + [reads], 14, log_every_n_steps=1000, **kw).fit(TinyLM(), loader())
    return statistics.median(reads.per_step[2:])  # steps 2..13: not a LayerNormMonitor step, window filled


def test_defaults_on_cost_one_host_read_per_step_and_off_none(monkeypatch):
    base = _reads_per_step(monkeypatch, [])
    on = _reads_per_step(monkeypatch, _defaults())
    off = _reads_per_step(monkeypatch, _defaults(enabled=False), gradient_clip_val=None)
    assert on == base + 1, (base, on)   # the single decision round shared by the guard and the detector
    assert off == base, (base, off)


@pytest.mark.parametrize("clip_first", [True, False])
def test_one_norm_pass_per_step_shared_and_detector_sees_unclipped_norm(monkeypatch, clip_first):
    calls = [0]
    original = torch._foreach_norm

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    class Probe(L.Callback):  # the unclipped global norm, measured first
        def __init__(self):
            self.norms, self.calls = [], []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            self.norms.append(float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))))
            self.calls.append(calls[0])

    probe = Probe()
    clip = GradientClipping(max_norm=0.05)
    watchers = [NonFiniteGuard(), LossSpikeDetector(action="log", window=64, monitor_grad_norm=True)]
    callbacks = [probe] + ([clip] + watchers if clip_first else watchers + [clip])
    monkeypatch.setattr(torch, "_foreach_norm", counted)
    L.seed_everything(0)
    trainer(callbacks, 10).fit(TinyLM(lr=1e-3), loader())
    per_step = [b - a for a, b in zip(probe.calls, probe.calls[1:])]
    assert per_step == [1] * 9
    detector = watchers[1]
    assert list(detector.grad_norms) == pytest.approx(probe.norms, rel=1e-5)  # before clipping, in either order
    assert max(probe.norms) > 0.05  # clipping was active


def test_disabled_callbacks_do_nothing():
    L.seed_everything(0)
    model = TinyLM(inject={"kind": "nan_grad", "step": 3})
    callbacks = _defaults(enabled=False)
    t = trainer(callbacks, 5, gradient_clip_val=1.0)  # a disabled GradientClipping does not object
    t.fit(model, loader())
    assert not all_finite(model.parameters())  # the NaN went through: the guard really was off
    assert callbacks[0].total == 0 and callbacks[1].spikes == 0 and callbacks[2].last_norm is None
    assert callbacks[3].last_metrics == {}
    assert StepGate.get(t.optimizers[0]) is None


def test_step_gate_public_api():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    assert StepGate.get(opt) is None and not StepGate.dropping(opt)
    gate = StepGate.of(opt)
    assert StepGate.get(opt) is gate and not gate.armed
    p.grad = torch.full((3,), 2.0)
    gate.drop()
    assert StepGate.dropping(opt) and torch.equal(p.grad, torch.zeros(3))
    with torch.no_grad():
        p.add_(5.0)  # the step never runs; something changed the weight meanwhile
    StepGate.finish_all([opt])
    assert torch.equal(p.detach(), torch.ones(3)) and not StepGate.dropping(opt) and gate.dropped_steps == 1
    gate.remove()
    assert StepGate.get(opt) is None


@pytest.mark.parametrize("make, match", [
    (lambda: LossSpikeDetector(max_consecutive=0), "max_consecutive"),
    (lambda: LossSpikeDetector(max_rollbacks=-1), "max_rollbacks"),
    (lambda: LossSpikeDetector(window=8, min_history=9), "min_history"),
    (lambda: LossSpikeDetector(action="drop"), "action"),
    (lambda: NonFiniteGuard(max_consecutive=0), "max_consecutive"),
    (lambda: NonFiniteGuard(on_give_up="ignore"), "on_give_up"),
])
def test_bad_settings_are_refused_by_name(make, match):
    with pytest.raises(ValueError, match=match):
        make()
