"""Dion against its algorithm box (Ahn, Xu et al. 2025, Algorithm 1) written plainly in float64, over 30 steps:

    B = M + G;  P = orth(B·Q);  R = Bᵀ·P;  M ← B − (1−μ)·P·Rᵀ;  Q ← R / (‖R_col‖ + ε);
    X ← (1 − lr·wd)·X − lr·sqrt(m/n)·P·Qᵀ,      r = ceil(rank_fraction · min(m, n))

plus: transposed (HF Conv1D) weights step as the equivalent nn.Linear, zero and rank-deficient gradients,
bad input, a state-dict round trip (bitwise), one-rank DTensor shards, and — in one torchrun launch each — 2-rank
FSDP2 (and DDP) and 4-rank HSDP (2 x 2) equal to one process, with 2 all-reduces per step.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_optim.optim.dion import Dion, dion_rank, initial_q
from tests._trajectory import max_diff, run_optimizer, run_reference
from tests.dist_utils import run_distributed

@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny QR / Cholesky factorisations: a second intra-op thread only adds contention (ms per call on a
    loaded 2-core box instead of µs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SHAPES = [(12, 8), (6, 10), (8, 8), (4, 3, 5)]  # tall, wide, square, a conv-like 4 x 15 view


def weights() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [0.3 * torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]


def dion_box(rank_fraction: float, lr: float = 0.01, mu: float = 0.95, weight_decay: float = 0.01,
             epsilon: float = 1e-8, power_iters: int = 1, seed: int = 0):
    """The algorithm box in float64; orth is Householder QR with R's diagonal made positive."""

    def update(i, x, g, st, t):
        X, G = x.reshape(x.shape[0], -1), g.reshape(x.shape[0], -1)
        m, n = X.shape
        if not st:
            r = min(m, n, math.ceil(rank_fraction * min(m, n)))
            st["M"], st["Q"] = torch.zeros_like(X), initial_q(n, r, seed, 0, i).double()
        B = st["M"] + G
        Q = st["Q"]
        for _ in range(power_iters):
            Qf, Rf = torch.linalg.qr(B @ Q)
            P = Qf * torch.sign(torch.diagonal(Rf))
            R = Q = B.T @ P
        st["M"] = B - (1 - mu) * P @ R.T
        st["Q"] = R / (R.norm(dim=0, keepdim=True) + epsilon)
        X = (1 - lr * weight_decay) * X - lr * math.sqrt(m / n) * P @ st["Q"].T
        return X.reshape(x.shape)

    return update


def run_dion(steps: int, dtype: torch.dtype, **hp) -> list[torch.Tensor]:
    return run_optimizer(lambda ps: Dion([{"params": ps, "matrix": True}], **hp), [w.clone() for w in weights()],
                         steps, dtype=dtype)


@pytest.mark.parametrize("rank_fraction", [1.0, 0.25])
@pytest.mark.parametrize("qr_method", ["rcqr", "qr"])
def test_trajectory_matches_the_algorithm_box(rank_fraction, qr_method):
    ref = run_reference(dion_box(rank_fraction), weights(), 30)
    assert max_diff(ref, weights()) > 0.05  # the weights moved
    got64 = run_dion(30, torch.float64, rank_fraction=rank_fraction, qr_method=qr_method)
    assert max_diff(got64, ref) < 1e-11
    got32 = run_dion(30, torch.float32, rank_fraction=rank_fraction, qr_method=qr_method)
    assert max_diff(got32, ref) < 5e-5


def test_power_iterations_and_hyperparameters_follow_the_box():
    hp = dict(lr=0.03, mu=0.8, weight_decay=0.1, epsilon=1e-6, power_iters=2, seed=7)
    ref = run_reference(dion_box(0.5, **hp), weights(), 30)
    got = run_dion(30, torch.float64, rank_fraction=0.5, **hp)
    assert max_diff(got, ref) < 1e-11


def test_rank_and_state_shapes():
    cases = [(12, 8, 1.0), (12, 8, 0.25), (6, 10, 0.25), (5, 5, 0.01)]
    assert [dion_rank(m, n, f) for m, n, f in cases] == [8, 2, 2, 1]
    ps = [nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = Dion([{"params": ps, "matrix": True}], rank_fraction=0.25)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in ps:
        m, n = p.shape[0], math.prod(p.shape[1:])
        st = opt.state[p]
        assert st["momentum"].shape == p.shape and st["Q"].shape == (n, dion_rank(m, n, 0.25))
        assert int(st["step"]) == 1


def test_transposed_conv1d_weight_steps_like_the_equivalent_linear():
    """A weight stored (in, out) and flagged ``transposed`` runs the box on its (out, in) view."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(10, 6, generator=g)  # (out, in)
    grads = [torch.randn(10, 6, generator=g) for _ in range(5)]
    linear, conv = nn.Parameter(w.clone()), nn.Parameter(w.t().contiguous())
    opt_l = Dion([{"params": [linear], "matrix": True}], lr=0.05, rank_fraction=0.5)
    opt_c = Dion([{"params": [conv], "matrix": True, "transposed": [True]}], lr=0.05, rank_fraction=0.5)
    for grad in grads:
        linear.grad, conv.grad = grad.clone(), grad.t().contiguous()
        opt_l.step()
        opt_c.step()
    assert (linear - w).abs().max() > 1e-3
    torch.testing.assert_close(conv.detach().t(), linear.detach(), atol=1e-6, rtol=1e-6)
    assert opt_c.state[conv]["Q"].shape == (6, 3)


def test_zero_gradient_only_decays_and_keeps_q():
    p = nn.Parameter(torch.randn(8, 6))
    before = p.detach().clone()
    opt = Dion([{"params": [p], "matrix": True}], lr=0.1, weight_decay=0.5)
    p.grad = torch.zeros_like(p)
    opt.step()
    q0 = initial_q(6, 6, 0, 0, 0)
    torch.testing.assert_close(opt.state[p]["Q"], q0)
    torch.testing.assert_close(p.detach(), before * (1 - 0.1 * 0.5))
    assert torch.count_nonzero(opt.state[p]["momentum"]) == 0
    p.grad = torch.randn(8, 6)  # the next, real gradient steps normally
    opt.step()
    assert torch.isfinite(p).all() and not torch.equal(opt.state[p]["Q"], q0)


@pytest.mark.parametrize("qr_method", ["rcqr", "qr"])
def test_rank_deficient_gradient_stays_finite_and_bounded(qr_method):
    """A rank-1 gradient with r = 6: the dependent columns of P are dropped, not turned into NaN or noise."""
    g = torch.Generator().manual_seed(1)
    p = nn.Parameter(torch.zeros(8, 6))
    opt = Dion([{"params": [p], "matrix": True}], lr=0.1, weight_decay=0.0, qr_method=qr_method)
    u, v = torch.randn(8, 1, generator=g), torch.randn(6, 1, generator=g)
    p.grad = u @ v.T
    opt.step()
    assert torch.isfinite(p).all() and torch.isfinite(opt.state[p]["Q"]).all()
    step = -p.detach() / (0.1 * math.sqrt(8 / 6))
    # one direction: the update is rank 1 and aligned with u vᵀ, of spectral norm <= 1
    s = torch.linalg.svdvals(step)
    assert s[0] <= 1 + 1e-5 and s[1] < 1e-4 * s[0]
    cos = (step * p.grad).sum() / (step.norm() * p.grad.norm())
    assert cos > 0.99


def test_bad_input_is_refused_naming_the_hyperparameter():
    p = [nn.Parameter(torch.randn(4, 4))]
    for kw, match in [({"rank_fraction": 0.0}, "rank_fraction"), ({"rank_fraction": 1.5}, "rank_fraction"),
                      ({"rank_fraction": float("nan")}, "rank_fraction"), ({"rank_fraction": "0.5"}, "rank_fraction"),
                      ({"mu": 1.0}, "mu"), ({"mu": -0.1}, "mu"), ({"power_iters": 0}, "power_iters"),
                      ({"power_iters": 1.5}, "power_iters"), ({"qr_method": "svd"}, "qr_method"),
                      ({"epsilon": 0.0}, "epsilon"), ({"seed": 1.5}, "seed"), ({"lr": -1.0}, "lr"),
                      ({"weight_decay": float("inf")}, "weight_decay")]:
        with pytest.raises(ValueError, match=match):
            Dion(p, **kw)
    with pytest.raises(ValueError, match=r"param group 'attn'.*rank_fraction"):
        Dion([{"params": p, "matrix": True, "name": "attn", "rank_fraction": 2.0}])


def test_state_dict_round_trip_resumes_bit_for_bit():
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4))

    def steps(m, opt, start, n):
        for t in range(start, start + n):
            g = torch.Generator().manual_seed(t)
            x = torch.randn(16, 6, generator=g)
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()

    from lightning_optim import create_optimizer

    straight = model()
    opt = create_optimizer("dion", straight, rank_fraction=0.5)
    steps(straight, opt, 0, 10)

    first = model()
    opt1 = create_optimizer("dion", first, rank_fraction=0.5)
    steps(first, opt1, 0, 5)
    saved = {"model": first.state_dict(), "optim": opt1.state_dict()}
    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    resumed = model()
    resumed.load_state_dict(loaded["model"])
    opt2 = create_optimizer("dion", resumed, rank_fraction=0.5)
    opt2.load_state_dict(loaded["optim"])
    steps(resumed, opt2, 5, 5)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    q_keys = [k for st in opt2.state.values() for k in st if k == "Q"]
    assert len(q_keys) == 2  # both Linear weights follow Dion; biases the AdamW part


def test_one_rank_dtensor_shard_equals_a_plain_tensor(one_rank_mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    g = torch.Generator().manual_seed(5)
    w = torch.randn(9, 5, generator=g)
    grads = [torch.randn(9, 5, generator=g) for _ in range(4)]
    plain = nn.Parameter(w.clone())
    shard = nn.Parameter(distribute_tensor(w.clone(), one_rank_mesh, [Shard(0)]))
    opts = [Dion([{"params": [q], "matrix": True}], lr=0.05) for q in (plain, shard)]
    for grad in grads:
        plain.grad = grad.clone()
        shard.grad = distribute_tensor(grad.clone(), one_rank_mesh, [Shard(0)])
        for o in opts:
            o.step()
    torch.testing.assert_close(shard.full_tensor(), plain.detach(), atol=1e-6, rtol=1e-6)
    assert tuple(opts[1].state[shard]["momentum"].placements) == (Shard(0),)


# ----------------------------------------------------------------------------------------------------------
# Distributed: one launch per layout (tests/dist_scripts/dion_dist.py)

SCRIPT = Path(__file__).parent / "dist_scripts" / "dion_dist.py"


@pytest.fixture(scope="module", params=[("fsdp2", 2), ("hsdp", 4)], ids=["fsdp2-2ranks", "hsdp-2x2"])
def launch(request, tmp_path_factory):
    layout, nprocs = request.param
    out = tmp_path_factory.mktemp(f"dion_{layout}")
    run_distributed(SCRIPT, str(out), layout, nprocs=nprocs, timeout=400, out_dir=out)
    return layout, nprocs, out


@pytest.mark.slow
def test_sharded_runs_equal_one_process_with_two_all_reduces_per_step(launch):
    from tests.dist_scripts.dion_dist import FRACTIONS, make_model
    from tests.dist_scripts.muon_dist import K

    layout, nprocs, out = launch
    init = make_model().state_dict()
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nprocs)]
    placement = "(Shard(dim=0),)" if layout == "fsdp2" else "(Replicate(), Shard(dim=0))"
    for fraction in FRACTIONS:
        run = f"{layout}_{fraction}"
        rec = [r[run] for r in ranks]
        got = torch.load(out / f"{run}.pt", weights_only=True)
        single = torch.load(out / f"single_{fraction}.pt", weights_only=True)
        assert any((single[k] - init[k]).abs().max() > 1e-3 for k in init if "blocks" in k)
        for k in single:
            torch.testing.assert_close(got[k], single[k], atol=2e-4, rtol=2e-4, msg=lambda m: f"{run} {k}: {m}")
        for r in rec:
            assert r["placements"] == [placement] and r["momentum"] == [placement], r
            assert r["q_types"] == ["Tensor"]  # Q (n x r) replicated as a plain tensor on every rank
            assert all(q == [math.prod(s[1:]), dion_rank(s[0], math.prod(s[1:]), fraction)]
                       for q, s in zip(r["q_shapes"], r["shapes"]))
            # the sketch sums, then the Gram matrices with B^T P: one packed all-reduce each per step
            assert r["collectives"] == {"all_reduce": 2 * K}, r["collectives"]
    if layout == "fsdp2":
        a, b = (torch.load(out / f"ddp_rank{r}.pt", weights_only=True) for r in (0, 1))
        single = torch.load(out / "single_1.0.pt", weights_only=True)
        for k in a:  # DDP replicas: every rank computes the same step, bit for bit, as one process
            assert torch.equal(a[k], b[k]) and torch.equal(a[k], single[k]), k
        msg = ranks[0]["refusal"]
        assert "qr_method='qr'" in msg and "blocks.0.mlp.up.weight" in msg, msg
