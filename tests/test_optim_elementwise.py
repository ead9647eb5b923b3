"""Elementwise optimizers (issue 3): agreement with plain renditions of the algorithm boxes and with the
reference packages, checkpoint round trips, bit-exact resume, no-grad parameters, bf16."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from lightning_optim import create_optimizer
from lightning_optim.registry import get_optimizer_spec
from tests import _elementwise_reference as R

METHODS = ["lion", "signum", "adopt", "ademamix", "mars", "prodigy", "sf-adamw"]
SHAPES = [(7, 5), (4, 3, 2), (6,), (1,)]
STEPS = 60


def _params(dtype=torch.float64, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def _grads(params, step, seed=1):
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    # a quadratic pull towards a target plus noise: gradients depend on the iterate, like real training
    return [(p.detach() - 0.5) + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def _run(opt, params, steps, start=0, grad_fn=_grads):
    for t in range(start, start + steps):
        for p, g in zip(params, grad_fn(params, t)):
            p.grad = g.clone()
        opt.step()


def _close(a, b, rtol=1e-6, atol=1e-9):
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=rtol, atol=atol)


# ---------------------------------------------------------------- agreement with the algorithm boxes

HP = {
    "lion": dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1),
    "signum": dict(lr=1e-2, momentum=0.95, nesterov=True, weight_decay=0.1),
    "adopt": dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1),
    "ademamix": dict(lr=1e-2, betas=(0.9, 0.999), beta3=0.999, alpha=8.0, eps=1e-8, weight_decay=0.1,
                     alpha_warmup=40, beta3_warmup=30),
    "mars": dict(lr=3e-2, betas=(0.95, 0.99), gamma=0.025, eps=1e-8, weight_decay=0.1, adamw_lr=1e-2,
                 adamw_betas=(0.9, 0.999)),
    "sf-adamw": dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, warmup_steps=10),
}
REF = {"lion": R.RefLion, "signum": R.RefSignum, "adopt": R.RefADOPT, "ademamix": R.RefAdEMAMix,
       "mars": R.RefMARS, "sf-adamw": R.RefSFAdamW}


@pytest.mark.parametrize("name", sorted(REF))
def test_matches_algorithm_box(name):
    ours_p, ref_p = _params(), _params()
    if name == "ademamix":  # the registry's range check reads beta3_warmup as a beta (reported): build directly
        from lightning_optim.optim.ademamix import AdEMAMix

        ours = AdEMAMix(ours_p, **HP[name])
    else:
        ours = create_optimizer(name, ours_p, **HP[name])
    ref = REF[name](ref_p, **HP[name])
    _run(ours, ours_p, STEPS)
    _run(ref, ref_p, STEPS)
    _close(ours_p, ref_p)
    if name == "sf-adamw":  # eval mode exposes x exactly
        ours.eval()
        _close(ours_p, [ref.x_of(p) for p in ref_p])


def test_signum_plain_momentum():
    hp = dict(lr=1e-2, momentum=0.9, nesterov=False, weight_decay=0.0)
    a, b = _params(), _params()
    _run(create_optimizer("signum", a, **hp), a, STEPS)
    _run(R.RefSignum(b, **hp), b, STEPS)
    _close(a, b)


def test_ademamix_without_warmup_and_schedules():
    from lightning_optim.optim.ademamix import beta3_schedule

    assert beta3_schedule(0, 0.9, 0.999, 100) == pytest.approx(0.9, rel=1e-6)
    assert beta3_schedule(100, 0.9, 0.999, 100) == 0.999
    hp = {**HP["ademamix"], "alpha_warmup": None, "beta3_warmup": None}
    a, b = _params(), _params()
    _run(create_optimizer("ademamix", a, **hp), a, STEPS)
    _run(R.RefAdEMAMix(b, **hp), b, STEPS)
    _close(a, b)


def test_adopt_first_step_initialises_and_first_clamp_is_one():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = create_optimizer("adopt", [p], lr=0.1, weight_decay=0.5)
    p.grad = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
    opt.step()
    assert torch.equal(p.detach(), torch.zeros(3, dtype=torch.float64))  # no update, no decay on step 1
    assert torch.equal(opt.state[p]["exp_avg_sq"], p.grad**2)
    p.grad = torch.tensor([100.0, -100.0, 0.0], dtype=torch.float64)  # normalised 100, -50 → clamped to ±1
    opt.step()
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor([0.1, -0.1, 0.0], dtype=torch.float64))


def test_mars_keeps_a_copy_of_the_previous_gradient():
    """Gradients zeroed in place (set_to_none=False) must not turn MARS into AdamW."""
    p = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
    q = torch.nn.Parameter(p.detach().clone())
    a = create_optimizer("mars", [p], gamma=0.5)
    b = create_optimizer("mars", [q], gamma=0.5)
    g1, g2 = torch.randn(4, 4, dtype=torch.float64) * 0.01, torch.randn(4, 4, dtype=torch.float64) * 0.01
    p.grad = g1.clone()
    a.step()
    p.grad.zero_().add_(g2)  # in place, same buffer
    a.step()
    q.grad = g1.clone()
    b.step()
    q.grad = g2.clone()
    b.step()
    _close([p], [q], rtol=0, atol=0)
    assert not torch.equal(a.state[p]["last_grad"], torch.zeros_like(p)) and a.state[p]["last_grad"] is not p.grad


def test_mars_routes_by_matrix_flag():
    opt = create_optimizer("mars", [{"params": [torch.nn.Parameter(torch.randn(4, 4))], "matrix": False}])
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["betas"] == (0.9, 0.999)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    opt = create_optimizer("mars", model)
    routes = {g["name"]: (g["matrix"], g["lr"]) for g in opt.param_groups}
    assert routes["matrix"] == (True, 3e-3)
    assert all(not m and lr == 1e-3 for n, (m, lr) in routes.items() if not n.startswith("matrix"))
    assert get_optimizer_spec("mars").hybrid


# ---------------------------------------------------------------- the reference packages


def test_lion_vs_lion_pytorch():
    lion_pytorch = pytest.importorskip("lion_pytorch")
    a, b = _params(), _params()
    _run(create_optimizer("lion", a, **HP["lion"]), a, STEPS)
    _run(lion_pytorch.Lion(b, **HP["lion"]), b, STEPS)
    _close(a, b)


def test_sf_adamw_vs_schedulefree():
    schedulefree = pytest.importorskip("schedulefree")
    hp = HP["sf-adamw"]
    a, b = _params(), _params()
    ours = create_optimizer("sf-adamw", a, **hp)
    ref = schedulefree.AdamWScheduleFree(b, foreach=False, **hp)
    ref.train()
    # the reference divides p.grad in place: hand it a copy so both see the same gradients
    _run(ours, a, STEPS)
    _run(ref, b, STEPS)
    _close(a, b)
    ours.eval(), ref.eval()
    _close(a, b)
    ours.eval()  # idempotent
    _close(a, b)
    ours.train(), ref.train()
    _close(a, b)


@pytest.mark.parametrize("bias_correction", [True, False])
def test_prodigy_vs_prodigyopt(bias_correction):
    prodigyopt = pytest.importorskip("prodigyopt")
    hp = dict(lr=1.0, betas=(0.9, 0.999), weight_decay=0.1, use_bias_correction=bias_correction, d0=1e-3)
    a, b = _params(), _params()
    ours = create_optimizer("prodigy", a, **hp)
    _run(ours, a, STEPS)
    _run(prodigyopt.Prodigy(b, **hp), b, STEPS)
    _close(a, b)
    assert float(ours.param_groups[0]["d"]) > 1e-3  # d grew


def test_adamw8bit_runs_and_round_trips():
    pytest.importorskip("bitsandbytes")
    p = torch.nn.Parameter(torch.randn(64, 128))
    opt = create_optimizer("adamw8bit", [p])
    before = p.detach().clone()
    for t in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    assert opt.state[p]["state1"].dtype == torch.uint8 and not torch.equal(p.detach(), before)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt.load_state_dict(torch.load(buf, weights_only=True))


def test_adamw8bit_missing_package_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"lightning-optim\[bnb\]"):
        create_optimizer("adamw8bit", [torch.nn.Parameter(torch.randn(3))])


# ---------------------------------------------------------------- checkpoints and resume


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", METHODS)
def test_resume_is_bit_exact(name):
    k = 6
    straight_p = _params(torch.float32)
    straight = create_optimizer(name, straight_p)
    _run(straight, straight_p, 2 * k)

    p1 = _params(torch.float32)
    o1 = create_optimizer(name, p1)
    _run(o1, p1, k)
    if name == "sf-adamw":
        o1.eval()  # checkpoints are saved in eval mode (x)
    weights = _roundtrip([p.detach().clone() for p in p1])
    sd = _roundtrip(o1.state_dict())

    p2 = [torch.nn.Parameter(w) for w in weights]
    o2 = create_optimizer(name, p2)
    o2.load_state_dict(sd)
    if name == "sf-adamw":
        o2.train()
    _run(o2, p2, k, start=k)
    _close(p2, straight_p, rtol=0, atol=0)


@pytest.mark.parametrize("name", METHODS)
def test_untouched_without_grad_and_bf16(name):
    ps = _params(torch.bfloat16)
    frozen = ps[0]
    before = frozen.detach().clone()
    opt = create_optimizer(name, ps)
    for t in range(3):
        for p, g in zip(ps[1:], _grads(ps[1:], t)):
            p.grad = g.clone()
        opt.step()
    assert torch.equal(frozen.detach(), before) and frozen not in opt.state
    assert all(torch.isfinite(p.float()).all() for p in ps) and all(p.dtype == torch.bfloat16 for p in ps)


@pytest.mark.parametrize("name", METHODS)
def test_distributed_checkpoint_state_dict(name):
    """get/set_optimizer_state_dict (full and sharded) in one process."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    opt = create_optimizer(name, model)
    x = torch.randn(8, 6)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    for full in (True, False):
        opts = StateDictOptions(full_state_dict=full)
        sd = get_optimizer_state_dict(model, opt, options=opts)
        model2 = copy.deepcopy(model)
        opt2 = create_optimizer(name, model2)
        set_optimizer_state_dict(model2, opt2, optim_state_dict=_roundtrip(sd), options=opts)
        for m, o in ((model, opt), (model2, opt2)):
            o.zero_grad()
            m(x).square().mean().backward()
        state_a, state_b = copy.deepcopy(opt.state_dict()), opt2.state_dict()
        assert set(state_a["state"]) == set(state_b["state"])
        for i in state_a["state"]:
            for key, val in state_a["state"][i].items():
                assert torch.equal(torch.as_tensor(val), torch.as_tensor(state_b["state"][i][key])), (i, key)
        opt2.step()
        saved = [p.detach().clone() for p in model.parameters()]
        opt.step()
        _close(list(model.parameters()), list(model2.parameters()), rtol=0, atol=0)
        with torch.no_grad():  # undo so the second pass starts from the same point
            for p, s in zip(model.parameters(), saved):
                p.copy_(s)
        opt.load_state_dict(state_a)


def test_registry_defaults_and_bad_values():
    for name in METHODS + ["adamw8bit"]:
        spec = get_optimizer_spec(name)
        assert spec.state.names and len(spec.state.names) == spec.state.tensors
    assert get_optimizer_spec("sf-adamw").schedule_free and get_optimizer_spec("sf-adamw").callbacks
    assert get_optimizer_spec("ademamix").defaults["alpha"] == 8.0
    with pytest.raises(ValueError, match="gamma"):
        create_optimizer("mars", [torch.nn.Parameter(torch.randn(2, 2))], gamma=-1)
    with pytest.raises(ValueError, match="betas"):
        create_optimizer("lion", [torch.nn.Parameter(torch.randn(2))], betas=(0.9, 1.5))
    p = torch.nn.Parameter(torch.randn(3))
    opt = create_optimizer("sf-adamw", [p])
    opt.eval()
    p.grad = torch.randn(3)
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()
    assert math.isfinite(float(p.sum()))


def test_prodigy_device_scalar_path_equals_host_scalar_path() -> None:
    """On CPU Prodigy reads d as a Python float (no sync there); elsewhere it keeps d on the device. Both
    branches run here (the device one forced) and must agree."""
    from lightning_optim.optim.prodigy import Prodigy

    def run(host: bool) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in [(16, 8), (8,)]]
        opt = Prodigy(ps, weight_decay=0.1)
        opt._host_scalars = host
        for step in range(30):
            for p in ps:  # a quadratic pulling every weight towards 3, plus noise: d has to grow
                p.grad = p.detach() - 3.0 + 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype)
            opt.step()
        return [p.detach().clone() for p in ps] + [opt.param_groups[0]["d"].clone()]

    host, device = run(True), run(False)
    assert host[-1] > 1e-6  # d grew from d0: the estimate is exercised
    for a, b in zip(host, device):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
