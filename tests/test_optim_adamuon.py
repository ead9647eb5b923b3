"""AdaMuon against the paper's algorithm box written plainly; its options, bad input, state and FSDP2.

The trajectory tests step small tensors whose gradients depend on the current weights
(``tests/_trajectory.py``: a wrong step changes every later gradient) for 40 steps and compare with the box
below in float64 — except Newton–Schulz, which both sides run in bfloat16 as the optimizer does (with
``sign=True`` its input, ±1, is exact in bf16). Tolerances are max |Δweight|; measured values in comments.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_optim import create_optimizer, optimizer_info
from lightning_optim.optim.adamuon import AdaMuon
from lightning_optim.optim.newton_schulz import JORDAN
from tests import _trajectory as trajectory
from tests._trajectory import gradient, max_diff

STEPS = 40
SHAPES = [(6, 4), (4, 7), (3, 2, 4), (5,)]  # tall, wide, a 3-D filter (viewed 3 x 8), a vector (AdamW part)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small matrices: one intra-op thread is faster and immune to a busy machine's oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def start_weights(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]


def groups(params):
    return [{"params": params[:3], "matrix": True}, {"params": params[3:], "matrix": False}]


# ----------------------------------------------------------------------------------------------------------
# the algorithm box (Si, Zhang & Shen 2025, arXiv 2507.11005), one tensor at a time


def ns_box(X: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Newton–Schulz with Keller Jordan's quintic ``X ← aX + (bA + cA²)X``, ``A = XXᵀ``, in bfloat16 on the wide
    orientation, each bracket one fused multiply-add (``addmm``: one bf16 rounding per bracket, as the kernel
    rounds); float64 result. The element-wise ``O ⊘ sqrt(V)`` magnifies the relative rounding of tiny entries
    of ``O``, so a reference that rounds differently drifts by ~1e-3 within a few steps."""
    X = X.bfloat16()
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / (X.norm() + 1e-7)
    a, b, c = JORDAN
    for _ in range(steps):
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # bA + cA²
        X = torch.addmm(X, B, X, beta=a)  # aX + BX
    return (X.T if tall else X).double()


def caution(u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Liang et al. 2024 (arXiv 2411.16085): mask where update and gradient disagree, rescale by the mask's mean."""
    phi = (u * g > 0).double()
    return u * phi / max(phi.mean().item(), 1e-3)


def adamuon_box(lr, wd, mu, beta2, eps, sign=True, nesterov=True, adamw=(1e-3, (0.9, 0.95), 1e-8, 0.0),
                cautious=False):
    a_lr, (b1, b2), a_eps, a_wd = adamw
    careful = caution if cautious else (lambda u, g: u)

    def update(i, x, g, s, t):
        if x.ndim < 2:  # the internal AdamW (torch's, decoupled decay, bias-corrected)
            s["m"] = b1 * s.get("m", torch.zeros_like(g)) + (1 - b1) * g
            s["v"] = b2 * s.get("v", torch.zeros_like(g)) + (1 - b2) * g * g
            x = x * (1 - a_lr * a_wd)
            u = (s["m"] / (1 - b1 ** t)) / ((s["v"] / (1 - b2 ** t)).sqrt() + a_eps)
            return x - a_lr * careful(u, g)
        G = g.reshape(g.shape[0], -1)
        s["M"] = mu * s.get("M", torch.zeros_like(G)) + (1 - mu) * G
        U = (1 - mu) * G + mu * s["M"] if nesterov else s["M"]
        O = ns_box(torch.sign(U) if sign else U)
        s["V"] = beta2 * s.get("V", torch.zeros_like(O)) + (1 - beta2) * O * O
        O_hat = O / (s["V"].sqrt() + eps)
        m, n = O.shape
        step = careful(0.2 * math.sqrt(m * n) / O_hat.norm() * O_hat, G)
        return x * (1 - lr * wd) - lr * step.reshape(x.shape)
    return update


def run_adamuon(steps: int = STEPS, dtype=torch.float32, **hp) -> list[torch.Tensor]:
    hp.setdefault("adamw_lr", 1e-3)
    hp.setdefault("adamw_weight_decay", 0.0)
    return trajectory.run_optimizer(lambda gs: AdaMuon(gs, **hp), start_weights(), steps, dtype, groups)


def run_box(update, steps: int = STEPS) -> list[torch.Tensor]:
    return trajectory.run_reference(update, start_weights(), steps)


@pytest.mark.parametrize("sign,nesterov,cautious", [(True, True, False), (False, True, False), (True, False, False),
                                                    (True, True, True)])
def test_matches_the_algorithm_box(sign, nesterov, cautious):
    got = run_adamuon(lr=0.02, weight_decay=0.1, momentum=0.9, beta2=0.9, eps=1e-8, sign=sign, nesterov=nesterov,
                      cautious=cautious)
    want = run_box(adamuon_box(0.02, 0.1, 0.9, 0.9, 1e-8, sign=sign, nesterov=nesterov, cautious=cautious))
    assert max_diff(got, want) < 2e-5  # measured 2.0e-6 .. 2.7e-6 (float32 state vs float64)
    assert max_diff(got, start_weights()) > 0.2  # it moved


def test_the_options_change_the_trajectory():
    """The box with the other sign / beta2 / cautious setting is far away: the comparison above can fail."""
    got = run_adamuon(lr=0.02, weight_decay=0.1, momentum=0.9, beta2=0.9, sign=True)
    assert max_diff(got, run_box(adamuon_box(0.02, 0.1, 0.9, 0.9, 1e-8, sign=False))) > 1e-2
    assert max_diff(got, run_box(adamuon_box(0.02, 0.1, 0.9, 0.99, 1e-8, sign=True))) > 1e-2
    assert max_diff(got, run_box(adamuon_box(0.02, 0.1, 0.9, 0.9, 1e-8, sign=True, cautious=True))) > 1e-2


def test_update_rms_is_point_two_lr():
    """Without weight decay every matrix moves by lr·0.2·sqrt(mn)/‖Ô‖·Ô: RMS exactly 0.2·lr, every step."""
    torch.manual_seed(0)
    ws = [nn.Parameter(torch.randn(s)) for s in [(16, 8), (8, 24)]]
    opt = AdaMuon([{"params": ws, "matrix": True}], lr=0.01, weight_decay=0.0)
    for _ in range(5):
        before = [w.detach().clone() for w in ws]
        for w in ws:
            w.grad = torch.randn_like(w)
        opt.step()
        for w, b in zip(ws, before):
            rms = (w.detach() - b).square().mean().sqrt().item()
            assert rms == pytest.approx(0.2 * 0.01, rel=1e-4)


def test_bf16_momentum_tracks_float32():
    """``state_dtype="bfloat16"`` (stochastically rounded momentum) stays near the float32 run."""
    ref = run_adamuon(lr=0.02, weight_decay=0.1)
    assert max_diff(run_adamuon(lr=0.02, weight_decay=0.1, state_dtype="bfloat16"), ref) < 0.05


def test_bf16_weights_keep_v_in_bf16_and_stay_finite():
    """V takes the parameter's dtype (what the memory estimate counts); its EMA is computed in float32."""
    ps = [nn.Parameter(w.bfloat16()) for w in start_weights()]
    opt = AdaMuon(groups(ps), lr=0.02)
    for t in range(1, 6):
        for i, p in enumerate(ps):
            p.grad = gradient(p.detach(), t, i).bfloat16()
        opt.step()
    v = opt.state[ps[0]]["exp_avg_sq"]
    assert v.dtype == torch.bfloat16 and torch.isfinite(v).all() and (v > 0).all()
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in ps)


def test_transposed_conv1d_weight_steps_like_the_equivalent_linear():
    """Element-wise V and the symmetric 0.2·sqrt(mn): an (in, out) weight flagged transposed steps as W.T."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 8, generator=g)
    grads = [torch.randn(24, 8, generator=g) for _ in range(4)]
    linear, conv = nn.Parameter(w.clone()), nn.Parameter(w.t().contiguous())
    opt_l = AdaMuon([{"params": [linear], "matrix": True}], lr=0.01)
    opt_c = AdaMuon([{"params": [conv], "matrix": True, "transposed": [True]}], lr=0.01)
    for grad in grads:
        linear.grad, conv.grad = grad.clone(), grad.t().contiguous()
        opt_l.step()
        opt_c.step()
    torch.testing.assert_close(conv.detach().t(), linear.detach(), atol=1e-6, rtol=1e-5)
    assert (linear.detach() - w).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------
# registry, bad input, state


def test_registry_record():
    spec = optimizer_info("adamuon")
    assert spec.hybrid and spec.family == "matrix" and spec.supports_dtensor
    assert spec.defaults["lr"] == 6e-4 and spec.defaults["beta2"] == spec.defaults["momentum"] == 0.95
    assert spec.defaults["sign"] is True and spec.defaults["adamw_betas"] == (0.9, 0.95)
    assert spec.defaults["cautious"] is False
    assert spec.state.numel((8, 4)) == 2 * 32 and spec.other_state.numel((5,)) == 10
    assert "2507.11005" in spec.paper


@pytest.mark.parametrize("hp,match", [
    ({"momentum": 1.0}, "momentum"),
    ({"beta2": 1.0}, "beta2"),
    ({"beta2": -0.1}, "beta2"),
    ({"eps": 0.0}, "eps"),
    ({"eps": float("nan")}, "eps"),
    ({"sign": "yes"}, "sign"),
    ({"cautious": "true"}, "cautious"),
])
def test_bad_hyperparameters_are_refused_naming_them(hp, match):
    with pytest.raises((ValueError, TypeError), match=match):
        AdaMuon([nn.Parameter(torch.zeros(4, 4))], **hp)
    with pytest.raises((ValueError, TypeError), match=match):
        create_optimizer("adamuon", [nn.Parameter(torch.zeros(4, 4))], **hp)


def test_state_layout_and_bitwise_resume():
    """V is parameter-shaped; state_dict → torch.save → a fresh optimizer → continue equals straight through."""
    def fresh():
        return [nn.Parameter(w.float()) for w in start_weights()]

    def feed(ps, t):
        for i, p in enumerate(ps):
            p.grad = gradient(p.detach(), t, i).float()

    straight = fresh()
    opt = AdaMuon(groups(straight), lr=0.02, state_dtype="bfloat16")
    for t in range(1, 9):
        feed(straight, t)
        opt.step()

    first = fresh()
    opt1 = AdaMuon(groups(first), lr=0.02, state_dtype="bfloat16")
    for t in range(1, 5):
        feed(first, t)
        opt1.step()
    st = opt1.state[first[0]]
    assert st["exp_avg_sq"].shape == first[0].shape and st["exp_avg_sq"].dtype == torch.float32
    assert st["momentum_buffer"].dtype == torch.bfloat16 and (st["exp_avg_sq"] > 0).all()
    buf = io.BytesIO()
    torch.save({"w": [p.detach() for p in first], "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = [nn.Parameter(w.clone()) for w in saved["w"]]
    opt2 = AdaMuon(groups(resumed), lr=0.02, state_dtype="bfloat16")
    opt2.load_state_dict(saved["opt"])
    assert opt2.state[resumed[0]]["momentum_buffer"].dtype == torch.bfloat16
    for t in range(5, 9):
        feed(resumed, t)
        opt2.step()
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_one_rank_dtensor_shards_step_like_plain_tensors(one_rank_mesh):
    """FSDP2-style Shard(0) DTensors: V is a DTensor laid out like the parameter, and the step is the plain one."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    plain = [nn.Parameter(w.float()) for w in start_weights()[:2]]
    sharded = [nn.Parameter(distribute_tensor(w.float(), one_rank_mesh, [Shard(0)])) for w in start_weights()[:2]]
    opt_p = AdaMuon([{"params": plain, "matrix": True}], lr=0.02)
    opt_s = AdaMuon([{"params": sharded, "matrix": True}], lr=0.02)
    for t in range(1, 6):
        for i, (p, s) in enumerate(zip(plain, sharded)):
            g = gradient(p.detach(), t, i).float()
            p.grad = g
            s.grad = distribute_tensor(g, one_rank_mesh, [Shard(0)])
        opt_p.step()
        opt_s.step()
    for p, s in zip(plain, sharded):
        assert isinstance(opt_s.state[s]["exp_avg_sq"], DTensor)
        torch.testing.assert_close(s.full_tensor(), p.detach(), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# 2 processes: DDP replicas agree; Lightning FSDP2 equals one process


@pytest.mark.slow
def test_ddp_and_fsdp2_two_processes_equal_one(tmp_path):
    from tests.dist_utils import run_distributed
    from tests.test_optim_muon_dist import test_ddp_and_fsdp2

    script = Path(__file__).parent / "dist_scripts" / "adamuon_dist.py"
    run_distributed(script, str(tmp_path), timeout=300, out_dir=tmp_path)
    test_ddp_and_fsdp2(tmp_path, "adamuon")  # the Muon family's assertions, on AdaMuon's files
