"""Shampoo against the algorithm of Shi et al. 2023 (arXiv 2309.06497, Algorithm 1; the conventions of the
reference code facebookresearch/optimizers ``distributed_shampoo``) written plainly here in float64.

The trajectory tests run 36 steps with ``precondition_frequency=5`` (roots at steps 5, 10, ..., 35: seven
refreshes) and ``max_preconditioner_dim=4`` on tensors larger than that (a 6×5 matrix cut into four blocks,
a 7-vector into two, a (3, 2, 2) tensor merged to 3×4), gradients depending on the weights
(``tests/_trajectory.py``), and compare the final weights. The first four steps are Adam (the grafting method
alone), compared with ``torch.optim.AdamW``. The reference package is not on PyPI (and needs Python >= 3.12),
so it is not a test dependency; run once from its source (these shapes plus a blocked 9×3 matrix and a
scalar, 100 steps, eigh and coupled-Newton roots, float64) it agreed with this class to 1.3e-15 once its
float32 bias-correction scalars were made float64 (3e-7 as it is). Tolerances are max |Δweight|; the values
measured on CPU are in the comments.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import lightning_optim as lo
from lightning_optim.memory import estimate_memory, measure_state_bytes
from lightning_optim.optim.shampoo import (
    Shampoo,
    eigh_inverse_root,
    newton_inverse_root,
    shampoo_blocks,
    shampoo_work_shape,
)
from tests import _trajectory as trajectory
from tests._trajectory import max_diff

STEPS = 36
FREQ = 5
MAX_DIM = 4
SHAPES = [(6, 5), (7,), (3, 2, 2)]
# work shapes and block cuts, by hand: (3, 2, 2) merges its last two dims (2·2 <= 4, 4·3 > 4)
WORK = {(6, 5): (6, 5), (7,): (7,), (3, 2, 2): (3, 4)}
CUTS = {(6, 5): [[(0, 4), (4, 6)], [(0, 4), (4, 5)]], (7,): [[(0, 4), (4, 7)]], (3, 2, 2): [[(0, 3)], [(0, 4)]]}
HP = dict(lr=0.02, betas=(0.9, 0.95), epsilon=1e-12, weight_decay=0.1, max_preconditioner_dim=MAX_DIM,
          precondition_frequency=FREQ, grafting_beta2=0.99, grafting_epsilon=1e-8)


def start_weights(shapes=SHAPES, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [0.3 * torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


# ----------------------------------------------------------------------------------------------------------
# The algorithm box, plainly (one tensor, float64, a loop over explicit blocks)


def inverse_root(a: torch.Tensor, p: int, eps: float) -> torch.Tensor:
    """(A + εI)^(-1/p) by a float64 eigendecomposition."""
    lam, q = torch.linalg.eigh(a + eps * torch.eye(a.shape[0], dtype=a.dtype))
    return q @ torch.diag(lam.clamp_min(eps) ** (-1.0 / p)) @ q.T


def shampoo_box(lr, betas, epsilon, weight_decay, precondition_frequency, grafting_beta2, grafting_epsilon,
                start=None, grafting="adam", max_preconditioner_dim=MAX_DIM, use_bias_correction=True):
    b1, b2 = betas
    start = start or precondition_frequency

    def update(i, x, g, s, t):
        work = WORK[tuple(x.shape)]
        cuts = CUTS[tuple(x.shape)]
        k = len(work)
        G = g.reshape(work)
        blocks = [tuple(slice(a, b) for a, b in combo) for combo in _grid(cuts)]
        if t == 1:
            s["m"] = torch.zeros_like(G)
            s["v"] = torch.zeros_like(G)
            s["L"] = {}
            s["R"] = {}
            for j, blk in enumerate(blocks):
                for dim in range(k):
                    side = blk[dim].stop - blk[dim].start
                    s["L"][j, dim] = torch.zeros(side, side, dtype=torch.float64)
                    s["R"][j, dim] = torch.eye(side, dtype=torch.float64)
        for j, blk in enumerate(blocks):
            gb = G[blk]
            for dim in range(k):
                mat = gb.movedim(dim, 0).reshape(gb.shape[dim], -1)
                s["L"][j, dim] = b2 * s["L"][j, dim] + (1 - b2) * mat @ mat.T
                if t == start or (t > start and t % precondition_frequency == 0):
                    c2 = 1 - b2**t if use_bias_correction else 1.0
                    s["R"][j, dim] = inverse_root(s["L"][j, dim] / c2, 2 * k, epsilon)
        s["v"] = grafting_beta2 * s["v"] + (1 - grafting_beta2) * G * G
        s["m"] = b1 * s["m"] + (1 - b1) * G
        d = s["m"] / (1 - b1**t) if use_bias_correction else s["m"]
        vhat = s["v"] / (1 - grafting_beta2**t)  # the grafting Adam is bias-corrected either way
        P = torch.zeros_like(G)
        for j, blk in enumerate(blocks):
            adam = d[blk] / (vhat[blk].sqrt() + grafting_epsilon)
            graft = adam if grafting == "adam" else d[blk]
            if t < start:
                P[blk] = graft
                continue
            S = d[blk]
            if k == 1:
                S = s["R"][j, 0] @ S
            elif k == 2:
                S = s["R"][j, 0] @ S @ s["R"][j, 1]
            P[blk] = S * graft.norm() / S.norm() if grafting else S
        return x - lr * (P.reshape(x.shape) + weight_decay * x)

    return update


def _grid(cuts):
    out = [[]]
    for dim_cuts in cuts:
        out = [prev + [c] for prev in out for c in dim_cuts]
    return out


def run_shampoo(dtype=torch.float32, steps=STEPS, **hp):
    return trajectory.run_optimizer(lambda p: Shampoo(p, **{**HP, **hp}), start_weights(), steps, dtype)


def run_box(steps=STEPS, **hp):
    return trajectory.run_reference(shampoo_box(**{**HP, **hp}), start_weights(), steps)


# ----------------------------------------------------------------------------------------------------------
# shapes


def test_work_shapes_and_blocks_follow_the_reference_rules() -> None:
    for shape, work in WORK.items():
        assert shampoo_work_shape(shape, MAX_DIM) == work
    # the reference's own examples of its merge rule (distributed_shampoo merge_small_dims docstring)
    assert shampoo_work_shape((1, 2, 5, 1), 10) == (10,)
    assert shampoo_work_shape((1, 2, 5, 1), 1) == (2, 5)
    assert shampoo_work_shape((32, 3, 64, 64), 8192) == (96, 4096)
    assert shampoo_work_shape((), 1024) == (1,)
    assert shampoo_work_shape((6, 4), 1024, merge_dims=False) == (6, 4)
    blocks = shampoo_blocks((6, 5), 4)
    assert [tuple((s.start, s.stop) for s in b) for b in blocks] == [
        ((0, 4), (0, 4)), ((0, 4), (4, 5)), ((4, 6), (0, 4)), ((4, 6), (4, 5))]


# ----------------------------------------------------------------------------------------------------------
# trajectories


def test_trajectory_matches_the_algorithm_box_float64() -> None:
    """Float64 parameters and roots: the same arithmetic as the box up to round-off (measured 3e-16)."""
    ours = run_shampoo(torch.float64, root_dtype="float64")
    ref = run_box()
    assert max_diff(ours, ref) < 1e-10
    assert max_diff(ref, start_weights()) > 0.1  # the weights moved


def test_trajectory_matches_the_algorithm_box_float32() -> None:
    """Float32 parameters and float32 roots (the default precision), 36 steps (measured 6e-7)."""
    assert max_diff(run_shampoo(torch.float32), run_box()) < 1e-4


def test_newton_root_trajectory_matches_the_eigh_box() -> None:
    """The coupled Newton root (tolerance 1e-6) in float64 follows the exact-root box (measured 5e-8)."""
    ours = run_shampoo(torch.float64, root_method="newton", root_dtype="float64")
    assert max_diff(ours, run_box()) < 1e-5


@pytest.mark.parametrize("grafting", ["sgd", None])
def test_other_grafting_choices_match_the_box(grafting) -> None:
    ours = run_shampoo(torch.float64, root_dtype="float64", grafting=grafting)
    assert max_diff(ours, run_box(grafting=grafting)) < 1e-10


def test_without_bias_correction_matches_the_box() -> None:
    """use_bias_correction=False: M and the factors are not divided; the grafting Adam still is."""
    ours = run_shampoo(torch.float64, root_dtype="float64", use_bias_correction=False)
    ref = run_box(use_bias_correction=False)
    assert max_diff(ours, ref) < 1e-10
    assert max_diff(ref, run_box()) > 1e-3


def test_later_start_preconditioning_step_matches_the_box() -> None:
    """s = 12 > f = 5: Adam until step 11, first root at 12, then at 15, 20, ..."""
    ours = run_shampoo(torch.float64, root_dtype="float64", start_preconditioning_step=12)
    ref = run_box(start=12)
    assert max_diff(ours, ref) < 1e-10
    assert max_diff(ref, run_box()) > 1e-4  # the start step matters


def test_steps_before_the_start_are_adamw() -> None:
    """Before start_preconditioning_step the update is the grafting Adam: torch.optim.AdamW (measured 1.5e-8)."""
    steps = FREQ - 1
    ours = run_shampoo(torch.float32, steps=steps)
    adamw = trajectory.run_optimizer(
        lambda p: torch.optim.AdamW(p, lr=HP["lr"], betas=(HP["betas"][0], HP["grafting_beta2"]),
                                    eps=HP["grafting_epsilon"], weight_decay=HP["weight_decay"]),
        start_weights(), steps)
    assert max_diff(ours, adamw) < 1e-6


def test_each_block_step_has_the_grafting_adam_norm() -> None:
    """The grafting rule, read off one Shampoo step: per block, ‖ΔW_B‖ = lr·‖m̂_B / (sqrt(v̂_B) + εg)‖,
    while the direction is not Adam's."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 5, dtype=torch.float64))
    opt = Shampoo([w], **{**HP, "weight_decay": 0.0, "root_dtype": "float64"})
    for t in range(1, FREQ + 3):
        w.grad = trajectory.gradient(w.detach(), t, 0)
        before = w.detach().clone()
        opt.step()
    delta = (before - w.detach()) / HP["lr"]
    st = opt.state[w]
    t = int(st["step"])
    b1, bg = HP["betas"][0], HP["grafting_beta2"]
    adam = (st["exp_avg"] / (1 - b1**t)) / ((st["grafting_exp_avg_sq"] / (1 - bg**t)).sqrt() + HP["grafting_epsilon"])
    for blk in shampoo_blocks((6, 5), MAX_DIM):
        assert delta[blk].norm().item() == pytest.approx(adam[blk].norm().item(), rel=1e-12)
        cos = (delta[blk] * adam[blk]).sum() / (delta[blk].norm() * adam[blk].norm())
        assert cos < 0.9999  # preconditioned, not Adam's direction


def test_bf16_parameters_keep_float32_state_and_follow_the_box() -> None:
    """bf16 weights: the state is float32, the update is computed in float32 and rounded once per step."""
    ours = run_shampoo(torch.bfloat16, steps=12)
    assert max_diff(ours, run_box(steps=12)) < 0.05  # bf16 weight rounding, measured 5e-3
    p = nn.Parameter(torch.zeros(6, 5, dtype=torch.bfloat16))
    opt = Shampoo([p], **HP)
    p.grad = torch.ones_like(p)
    opt.step()
    assert all(v.dtype == torch.float32 for v in opt.state[p].values())


# ----------------------------------------------------------------------------------------------------------
# roots


def _spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 2 * n, generator=g, dtype=torch.float64)
    return a @ a.T / (2 * n)


@pytest.mark.parametrize("p", [2, 4, 6])
def test_roots_match_the_float64_eigendecomposition(p: int) -> None:
    a = _spd(12)
    exact = inverse_root(a, p, 1e-12)
    assert (eigh_inverse_root(a.float(), p, 1e-12).double() - exact).abs().max() < 1e-4
    assert (newton_inverse_root(a, p, 1e-12) - exact).abs().max() < 1e-5
    # R^p·(A + εI) = I: the inverse p-th root
    r = newton_inverse_root(a, p, 1e-12)
    assert (torch.linalg.matrix_power(r, p) @ a - torch.eye(12, dtype=torch.float64)).abs().max() < 1e-5


def test_rank_deficient_factor_gets_epsilon_damping() -> None:
    """A rank-1 factor: the zero eigenvalues become ε, so the root is finite (ε^(-1/p) on the null space)."""
    v = torch.tensor([[1.0], [2.0], [0.0]], dtype=torch.float64)
    r = eigh_inverse_root(v @ v.T, 2, 1e-4)
    assert torch.isfinite(r).all()
    assert r[2, 2].item() == pytest.approx(1e-4 ** -0.5, rel=1e-6)


def test_failed_root_keeps_the_previous_root_and_warns() -> None:
    w = nn.Parameter(torch.zeros(3, 3))
    opt = Shampoo([w], precondition_frequency=1, merge_dims=False)
    w.grad = torch.full((3, 3), float("inf"))
    with pytest.warns(RuntimeWarning, match=r"root of factor 0_\d of param_groups\[0\] parameter 0"):
        opt.step()
    assert torch.equal(opt.state[w]["root_0_0"], torch.eye(3))


# ----------------------------------------------------------------------------------------------------------
# 1-D and scalar parameters


def test_vectors_without_1d_preconditioning_are_adamw() -> None:
    """precondition_1d=False: a vector (and a scalar) is stepped by the grafting Adam alone, at every step."""
    shapes = [(7,), ()]
    ours = trajectory.run_optimizer(lambda p: Shampoo(p, **{**HP, "precondition_1d": False}),
                                    start_weights(shapes), 20)
    adamw = trajectory.run_optimizer(
        lambda p: torch.optim.AdamW(p, lr=HP["lr"], betas=(HP["betas"][0], HP["grafting_beta2"]),
                                    eps=HP["grafting_epsilon"], weight_decay=HP["weight_decay"]),
        start_weights(shapes), 20)
    assert max_diff(ours, adamw) < 1e-6


def test_no_state_for_gradient_less_or_empty_parameters() -> None:
    a, b, c = nn.Parameter(torch.ones(3, 3)), nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(0, 4))
    opt = Shampoo([a, b, c])
    a.grad, c.grad = torch.ones(3, 3), torch.ones(0, 4)
    opt.step()
    assert b not in opt.state and c not in opt.state and "factor_0_0" in opt.state[a]
    b.grad = torch.ones(2).to_sparse()
    with pytest.raises(RuntimeError, match=r"sparse gradients \(param_groups\[0\] parameter 1\)"):
        opt.step()


# ----------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("kwargs, match", [
    ({"lr": -1.0}, "lr must be >= 0"),
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"betas": (0.9,)}, "betas must be two numbers"),
    ({"betas": (1.0, 0.99)}, r"betas\[0\] must be in \[0, 1\)"),
    ({"betas": (0.9, 0.0)}, r"betas\[1\] \(the factors' EMA\) must be in \(0, 1\]"),
    ({"epsilon": 0.0}, "epsilon must be > 0"),
    ({"grafting_epsilon": -1e-8}, "grafting_epsilon must be > 0"),
    ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
    ({"grafting_beta2": 1.5}, r"grafting_beta2 must be in \(0, 1\]"),
    ({"max_preconditioner_dim": 0}, "max_preconditioner_dim must be an integer >= 1"),
    ({"precondition_frequency": 2.5}, "precondition_frequency must be an integer >= 1"),
    ({"precondition_frequency": True}, "precondition_frequency must be an integer >= 1"),
    ({"precondition_frequency": 10, "start_preconditioning_step": 5},
     r"start_preconditioning_step \(5\) must be >= precondition_frequency \(10\)"),
    ({"grafting": "adagrad"}, "grafting must be 'adam', 'sgd' or None"),
    ({"root_method": "svd"}, "root_method must be one of"),
    ({"root_dtype": "bfloat16"}, "root_dtype must be 'float32' or 'float64'"),
    ({"lr": "1e-3"}, "lr must be a finite number"),
])
def test_bad_hyperparameters_are_refused_naming_the_field(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        Shampoo([nn.Parameter(torch.zeros(2, 2))], **kwargs)


def test_a_bad_group_override_is_refused_and_none_start_is_normalised() -> None:
    a, b = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="root_method must be one of"):
        Shampoo([{"params": [a]}, {"params": [b], "root_method": "qr"}])
    opt = Shampoo([{"params": [a]}, {"params": [b], "precondition_frequency": 7, "start_preconditioning_step": -1}])
    assert [g["start_preconditioning_step"] for g in opt.param_groups] == [100, 7]


def test_registry_builds_it_with_the_published_defaults() -> None:
    opt = lo.create_optimizer("shampoo", nn.Linear(4, 3))
    group = opt.param_groups[0]
    assert isinstance(opt, Shampoo)
    assert (group["epsilon"], group["precondition_frequency"], group["start_preconditioning_step"]) == (1e-12, 100, 100)
    assert (group["grafting"], group["grafting_beta2"], group["grafting_epsilon"]) == ("adam", 0.999, 1e-8)
    assert group["max_preconditioner_dim"] == 1024 and group["root_method"] == "eigh"
    with pytest.raises(ValueError, match="grafting_beta2"):
        lo.create_optimizer("shampoo", nn.Linear(4, 3), grafting_beta2="0.9")


# ----------------------------------------------------------------------------------------------------------
# checkpoints, memory, DTensor


def test_state_dict_round_trip_continues_bit_for_bit() -> None:
    """k = 7 steps → state_dict → torch.save → weights_only load into a fresh optimizer → 7 more steps (roots
    refreshed at 5, 10, 15 on both sides) == 14 steps straight."""
    hp = {**HP, "precondition_frequency": 5}
    straight = trajectory.run_optimizer(lambda p: Shampoo(p, **hp), start_weights(), 14)

    params = [nn.Parameter(w.float()) for w in start_weights()]
    opt = Shampoo(params, **hp)
    for t in range(1, 8):
        for i, p in enumerate(params):
            p.grad = trajectory.gradient(p.detach(), t, i).float()
        opt.step()
    buf = io.BytesIO()
    torch.save({"w": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    params2 = [nn.Parameter(w.clone()) for w in saved["w"]]
    opt2 = Shampoo(params2, **hp)
    opt2.load_state_dict(saved["opt"])
    for t in range(8, 15):
        for i, p in enumerate(params2):
            p.grad = trajectory.gradient(p.detach(), t, i).float()
        opt2.step()
    assert all(torch.equal(a, p.detach().double()) for a, p in zip(straight, params2))


def test_memory_estimate_equals_the_allocated_state_on_a_recipe_model() -> None:
    """The tiny Llama preset (vocabulary 1536: the embedding and head are cut into blocks of 1024 and 512
    rows), one step: the estimator's bytes == the bytes the optimizer allocated, exactly."""
    from lightning_optim.models.gpt import build_model

    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=1536, n_layer=1)
    opt = lo.create_optimizer("shampoo", model)
    idx = torch.randint(0, 1536, (2, 16))
    model(idx).float().logsumexp(-1).mean().backward()
    opt.step()
    measured = measure_state_bytes(opt)
    assert measured == estimate_memory("shampoo", module=model).state_total
    assert any(k == "factor_1_0" for s in opt.state.values() for k in s)  # the blocked embedding


def test_dtensor_parameters_step_like_plain_ones(one_rank_mesh) -> None:
    """A Shard(0) DTensor (one rank) takes the gather / local-slice path and ends bit-identical to a plain
    tensor (roots refreshed twice)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    w0 = start_weights([(6, 5)])[0].float()
    plain = nn.Parameter(w0.clone())
    dt = nn.Parameter(distribute_tensor(w0.clone(), one_rank_mesh, [Shard(0)]))
    opts = [Shampoo([plain], **HP), Shampoo([dt], **HP)]
    for t in range(1, 12):
        plain.grad = trajectory.gradient(plain.detach(), t, 0).float()
        dt.grad = distribute_tensor(plain.grad.clone(), one_rank_mesh, [Shard(0)])
        for o in opts:
            o.step()
    assert torch.equal(dt.detach().full_tensor(), plain.detach())
    assert not math.isclose(plain.detach().sub(w0).abs().max().item(), 0.0)
