"""StabilityGuard in a real ``lightning.fabric.Fabric`` loop: drops are bit-exact, clipping is the usual one."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from lightning.fabric import Fabric
from torch import nn

from lightning_optim.fabric import StabilityGuard, TrainingUnstableError, create_optimizer, create_scheduler

OPTIMIZERS = {"adamw": {"lr": 1e-2}, "muon": {"lr": 2e-2}}


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(32, 8, generator=g)
    return x, x[:, :1].sin() + 0.1 * torch.randn(32, 1, generator=g)


def fabric_setup(name: str, seed: int = 0, **guard_kwargs):
    fabric = Fabric(accelerator="cpu", devices=1)
    model = tiny_model(seed)
    opt = create_optimizer(name, model, **OPTIMIZERS[name])
    sched = create_scheduler("cosine", opt, total_steps=50, warmup_steps=2)
    fmodel, fopt = fabric.setup(model, opt)
    guard = StabilityGuard(fopt, sched, fabric=fabric, **guard_kwargs)
    return fabric, fmodel, fopt, guard


def loss_of(model: nn.Module, step: int) -> torch.Tensor:
    x, y = batch(step)
    return nn.functional.mse_loss(model(x), y)


def state_copy(opt: torch.optim.Optimizer, model: nn.Module) -> tuple[list[torch.Tensor], list[dict]]:
    params = [p.detach().clone() for p in model.parameters()]
    state = [{k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in opt.state[p].items()}
             for g in opt.param_groups for p in g["params"]]
    return params, state


def assert_same(before, after) -> None:
    (p0, s0), (p1, s1) = before, after
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert len(s0) == len(s1)
    for a, b in zip(s0, s1):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], torch.Tensor):
                assert torch.equal(a[k], b[k]), k
            else:
                assert a[k] == b[k], k


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_nan_at_step_k_is_dropped_bit_exactly(name: str) -> None:
    fabric, model, opt, guard = fabric_setup(name, spike=False)
    k = 4
    for step in range(8):
        loss = loss_of(model, step)
        if step == k:
            loss = loss * float("nan")
            before = state_copy(opt, model)
        fabric.backward(loss)
        with pytest.warns(RuntimeWarning, match="non-finite") if step == k else _nullcontext():
            metrics = guard.step(loss)
        if step == k:
            assert_same(before, state_copy(opt, model))
            assert metrics["stability/skipped"] == 1.0 and metrics["stability/nonfinite_steps"] == 1.0
        else:
            assert metrics["stability/skipped"] == 0.0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert guard.nonfinite_steps == 1 and guard.steps == 8


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_loss_spike_is_skipped(name: str) -> None:
    fabric, model, opt, guard = fabric_setup(name, window=8, min_history=4, threshold=4.0, max_norm=1.0)
    k = 6
    for step in range(9):
        loss = loss_of(model, step)
        if step == k:
            loss = loss * 1000.0
            before = state_copy(opt, model)
        fabric.backward(loss)
        metrics = guard.step(loss) if step != k else _warned(guard, loss, "spike")
        if step == k:
            assert_same(before, state_copy(opt, model))
            assert metrics["stability/skipped"] == 1.0 and metrics["stability/spike_steps"] == 1.0
        else:
            assert metrics["stability/skipped"] == 0.0
    assert guard.spike_steps == 1 and len(guard.losses) == 8  # the spike is not in the window


def test_clipping_matches_clip_grad_norm() -> None:
    max_norm = 0.05
    fabric = Fabric(accelerator="cpu", devices=1)
    model = tiny_model()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=1.0)
    fmodel, fopt = fabric.setup(model, opt)
    guard = StabilityGuard(fopt, fabric=fabric, max_norm=max_norm, spike=False)
    loss = loss_of(fmodel, 0)
    fabric.backward(loss)
    metrics = guard.step(loss)
    nn.functional.mse_loss(ref(batch(0)[0]), batch(0)[1]).backward()
    total = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    ref_opt.step()
    assert total.item() > 10 * max_norm  # clipping was active
    assert metrics["train/grad_norm"] == pytest.approx(total.item(), rel=1e-6)
    assert metrics["train/grad_norm_clipped"] == pytest.approx(max_norm, rel=1e-4)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_clean_steps_equal_a_plain_loop_bit_for_bit(name: str) -> None:
    """N clean steps through the guard equal a hand-written loop: norm, the clip factor, step, schedule."""
    max_norm, steps = 0.1, 6
    fabric, model, opt, guard = fabric_setup(name, max_norm=max_norm, window=4, min_history=2, log_every=2)
    ref = tiny_model()
    ref_opt = create_optimizer(name, ref, **OPTIMIZERS[name])
    ref_sched = create_scheduler("cosine", ref_opt, total_steps=50, warmup_steps=2)
    clipped = 0
    for step in range(steps):
        loss = loss_of(model, step)
        fabric.backward(loss)
        metrics = guard.step(loss)
        assert (metrics == {}) == (step % 2 == 1)
        loss_of(ref, step).backward()
        grads = [p.grad for g in ref_opt.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.stack(torch._foreach_norm(grads, 2.0)).float().pow(2).sum().sqrt()
        if norm > max_norm:  # c = max_norm / (‖g‖ + 1e-6), the clip_grad_norm_ factor, as a float32 division
            clipped += 1  # (clip_grad_norm_'s `float / tensor` is reciprocal-then-multiply: can differ by one ulp)
            torch._foreach_mul_(grads, torch.tensor(max_norm) / (norm + 1e-6))
        ref_opt.step()
        ref_sched.step()
        ref_opt.zero_grad(set_to_none=True)
    assert clipped > 0
    assert guard.steps == steps and guard.spike_steps == 0 and guard.nonfinite_steps == 0
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))  # adamw is fused: it handles the scaler's unscaling itself
def test_fp16_grad_scaler_sees_the_dropped_step_and_lowers_its_scale(name: str) -> None:
    from lightning.fabric.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    model = tiny_model()
    opt = create_optimizer(name, model, **OPTIMIZERS[name])
    fmodel, fopt = fabric.setup(model, opt)
    guard = StabilityGuard(fopt, fabric=fabric, max_norm=0.05, spike=False)
    ref = copy.deepcopy(model)
    for step in range(4):
        loss = loss_of(fmodel, step)
        if step == 2:
            loss = loss * float("nan")
            before = state_copy(opt, model)
        fabric.backward(loss)
        with pytest.warns(RuntimeWarning) if step == 2 else _nullcontext():
            metrics = guard.step(loss)
        if step == 0:  # the norms are those of the unscaled gradients (fp16 autocast: close, not equal)
            loss_of(ref, 0).backward()
            true = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e9).item()
            assert metrics["train/grad_norm"] == pytest.approx(true, rel=1e-3)  # scaled would be 1024x
        if step == 2:
            assert_same(before, state_copy(opt, model))
            assert scaler.get_scale() == 512.0  # the scaler saw the inf and halved its scale
    assert guard.nonfinite_steps == 1 and all(torch.isfinite(p).all() for p in model.parameters())


def test_divergence_raises_after_max_consecutive_and_keeps_the_last_good_state() -> None:
    fabric, model, opt, guard = fabric_setup("adamw", max_consecutive=3, spike=False)
    for step in range(2):
        loss = loss_of(model, step)
        fabric.backward(loss)
        guard.step(loss)
    good = state_copy(opt, model)
    with pytest.warns(RuntimeWarning), pytest.raises(TrainingUnstableError, match="3 dropped optimizer steps"):
        for step in range(2, 10):
            loss = loss_of(model, step) * float("inf")
            fabric.backward(loss)
            guard.step(loss)
    assert guard.steps == 4  # two dropped steps, the third raised before it counted
    assert_same(good, state_copy(opt, model))
    assert all(p.grad is None for p in model.parameters())


def test_plain_loop_without_fabric_and_state_dict_roundtrip() -> None:
    model = tiny_model()
    opt = create_optimizer("adamw", model, lr=1e-2)
    guard = StabilityGuard(opt, max_norm=None, window=4, min_history=2)
    for step in range(5):
        loss = loss_of(model, step)
        loss.backward()
        metrics = guard.step(loss)
        assert metrics["train/grad_norm"] == metrics["train/grad_norm_clipped"]  # no clipping
        assert math.isclose(metrics["train/loss"], loss.item())
    fresh = StabilityGuard(opt)
    fresh.load_state_dict(guard.state_dict())
    assert list(fresh.losses) == list(guard.losses) and fresh.steps == 5


def test_per_layer_gradient_norms_on_metric_steps() -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    model = tiny_model()
    ref = copy.deepcopy(model)
    opt = create_optimizer("muon", model, lr=2e-2)
    fmodel, fopt = fabric.setup(model, opt)
    guard = StabilityGuard(fopt, fabric=fabric, max_norm=0.05, spike=False, layer_norms=fmodel, log_every=2)
    loss = loss_of(fmodel, 0)
    fabric.backward(loss)
    metrics = guard.step(loss)
    loss_of(ref, 0).backward()
    for i in (0, 2, 4):  # the Linear layers of the Sequential: weight and bias together, before clipping
        layer = ref[i]
        expected = torch.sqrt(layer.weight.grad.pow(2).sum() + layer.bias.grad.pow(2).sum()).item()
        assert metrics[f"norms/grad/{i}"] == pytest.approx(expected, rel=1e-5)
    total = math.sqrt(sum(metrics[f"norms/grad/{i}"] ** 2 for i in (0, 2, 4)))
    assert total == pytest.approx(metrics["train/grad_norm"], rel=1e-5)
    assert metrics["train/grad_norm_clipped"] == pytest.approx(0.05, rel=1e-4)
    loss = loss_of(fmodel, 1)
    fabric.backward(loss)
    assert guard.step(loss) == {}  # not a metric step: nothing returned
    with pytest.raises(TypeError, match="layer_norms"):
        StabilityGuard(fopt, layer_norms="model")


@pytest.mark.parametrize("kwargs, field", [
    ({"max_norm": 0.0}, "max_norm"), ({"max_norm": float("nan")}, "max_norm"), ({"window": 1}, "window"),
    ({"threshold": -1.0}, "threshold"), ({"min_history": 0}, "min_history"),
    ({"max_consecutive": 0}, "max_consecutive"), ({"log_every": 0}, "log_every"),
])
def test_bad_settings_name_the_field(kwargs: dict, field: str) -> None:
    opt = torch.optim.SGD(tiny_model().parameters(), lr=0.1)
    with pytest.raises(ValueError, match=field):
        StabilityGuard(opt, **kwargs)


def test_not_an_optimizer_is_refused() -> None:
    with pytest.raises(TypeError, match="optimizer"):
        StabilityGuard(tiny_model())


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _warned(guard: StabilityGuard, loss: torch.Tensor, match: str) -> dict:
    with pytest.warns(RuntimeWarning, match=match):
        return guard.step(loss)


# ---------------------------------------------------------------- language models, and two ranks
def _lm_loop(model: nn.Module, vocab: int, name: str, nan_step: int, steps: int = 10) -> tuple[float, float]:
    """A Fabric loop over one fixed batch (the loss must fall) with a NaN loss at ``nan_step``: (first, last) loss."""
    fabric = Fabric(accelerator="cpu", devices=1)
    opt = create_optimizer(name, model, **OPTIMIZERS[name])
    sched = create_scheduler("cosine", opt, total_steps=steps, warmup_steps=1)
    fmodel, fopt = fabric.setup(model, opt)
    guard = StabilityGuard(fopt, sched, fabric=fabric, max_norm=1.0, window=6, min_history=3)
    data = torch.randint(0, vocab, (4, 17), generator=torch.Generator().manual_seed(1))
    losses = []
    for step in range(steps):
        logits = fmodel(data[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        if step == nan_step:
            loss = loss * float("nan")
            before = state_copy(opt, model)
        fabric.backward(loss)
        with pytest.warns(RuntimeWarning) if step == nan_step else _nullcontext():
            metrics = guard.step(loss)
        if step == nan_step:
            assert_same(before, state_copy(opt, model))
        else:
            losses.append(metrics["train/loss"])
    assert guard.nonfinite_steps == 1
    return losses[0], losses[-1]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_package_transformer_trains_in_a_fabric_loop(name: str) -> None:
    from lightning_optim.models import build_model

    torch.manual_seed(0)
    model = build_model("tiny", n_layer=2, n_embd=32, n_head=2, vocab_size=64, block_size=16)
    first, last = _lm_loop(model, 64, name, nan_step=4)
    assert last < first


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_litgpt_gpt_trains_in_a_fabric_loop(name: str) -> None:
    litgpt = pytest.importorskip("litgpt", reason="litgpt is not installed (it is not a dependency)")
    torch.manual_seed(0)
    cfg = litgpt.Config(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, padded_vocab_size=64)
    first, last = _lm_loop(litgpt.GPT(cfg), 64, name, nan_step=4)
    assert last < first


def test_two_rank_fabric_ddp_drops_the_same_steps_on_every_rank(tmp_path) -> None:
    from pathlib import Path

    from tests.dist_utils import run_distributed

    run_distributed(Path(__file__).parent / "dist_scripts" / "fabric_ddp.py", str(tmp_path), out_dir=tmp_path)
    import json

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:  # a NaN on rank 1 and a spike on rank 0: both dropped on both ranks, bit-exactly
        assert r["skipped"] == [3, 7] and all(r["unchanged"]) and r["nonfinite"] == 1 and r["spikes"] == 1
    w0, w1 = (torch.load(tmp_path / f"weights{r}.pt") for r in range(2))
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))
