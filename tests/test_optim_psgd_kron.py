"""PSGD-Kron against the algorithm written plainly here with full Kronecker products, and against kron-torch.

The reference (float64) builds ``Q = Q_1 ⊗ ... ⊗ Q_k`` as one matrix and works on the flattened tensor:
``A = Q·vec(h + damping·v)``, ``B = Q⁻ᵀ·vec(v)`` (a dense solve), each factor's whitening step from the
unfoldings of A and B, ``u = QᵀQ·vec(m̂)`` — nothing of the optimizer's mode products, triangular solves or
einsum-free kernels is reused. The probe ``v`` comes from a ``torch.Generator`` whose seed the reference
computes itself (SplitMix64 over seed, group, position, step, as the module docstring states), so both sides
see the same draws. Li 2018 (arXiv 1809.10232) gives the whitening update; kron_torch (PyPI ``kron-torch``
0.3.3, test-only) the defaults, the deterministic update schedule, the spectral-norm lower bound and the clip.

kron-torch is compared step for step with the same random vectors (its ``torch.randn_like`` fed ours): equal
to float32 round-off once its in-place damping of the momentum (the documented difference) is undone, and
within the size of that damping term as published. Measured values are in the comments.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import lightning_optim as lo
from lightning_optim.optim import psgd_kron
from lightning_optim.optim.psgd_kron import PSGDKron, factor_numel, kron_work_shape, triangular_dims
from tests import _trajectory as trajectory
from tests._trajectory import gradient, max_diff

STEPS = 40
SHAPES = [(6, 4), (4, 7), (5,), (3, 2, 2), ()]  # tall, wide, a vector, a 3-D tensor, a scalar
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add contention on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def start_weights(shapes=SHAPES, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [0.3 * torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


# ----------------------------------------------------------------------------------------------------------
# The algorithm, plainly


def splitmix64(x: int) -> int:
    m = 2**64 - 1
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def probe(shape, seed: int, group: int, position: int, step: int, dtype=torch.float64) -> torch.Tensor:
    s = splitmix64(seed)
    for part in (group, position, step):
        s = splitmix64(s ^ part)
    return torch.randn(shape, generator=torch.Generator().manual_seed(s), dtype=dtype)


def schedule(steps: int, fixed=None, pmax=1.0, pmin=0.03, decay=0.001, flat=500) -> list[bool]:
    """Whether step t (1-based) updates the preconditioner: counter += 1, update iff counter >= 1/p (float32)."""
    out, counter = [False], 0
    f32 = torch.float32
    for n in range(steps):
        if fixed is None:
            p = torch.tensor(pmax, dtype=f32) * torch.exp(
                -torch.tensor(decay, dtype=f32) * (torch.tensor(float(n), dtype=f32) - torch.tensor(flat, dtype=f32)))
            p = p.clamp(torch.tensor(pmin, dtype=f32), torch.tensor(pmax, dtype=f32))
        else:
            p = torch.tensor(fixed, dtype=f32)
        counter += 1
        update = bool(torch.tensor(counter, dtype=f32) >= 1 / p)
        counter = 0 if update else counter
        out.append(update)
    return out


def full_kron(qs: list[torch.Tensor]) -> torch.Tensor:
    out = torch.ones(1, 1, dtype=torch.float64)
    for q in qs:
        out = torch.kron(out, q if q.dim() == 2 else torch.diag(q))
    return out


def unfold(x: torch.Tensor, i: int) -> torch.Tensor:
    return x.movedim(i, 0).reshape(x.shape[i], -1)


def norm_lower_bound(s: torch.Tensor) -> torch.Tensor:
    n = s.abs().max()
    if n == 0:
        return n
    a = s / n
    c = a[:, int(torch.argmax((a * a).sum(0)))]
    w = a.T @ c
    w = w / w.norm()
    return (a @ w).norm() * n


def kron_box(work_shapes, triangular, *, lr, momentum=0.9, wd=0.0, updates, into_momentum=True, precond_lr=0.1,
             init_scale=1.0, clip=1.1, seed=0, balance_every=100, probe_dtype=torch.float64):
    """The per-tensor update of the module docstring; ``triangular[i]``: which work dims of tensor i are dense."""
    tiny = torch.finfo(torch.float64).tiny

    def update(i, x, g, s, t):
        work, tri = work_shapes[i], triangular[i]
        k = len(work)
        g = g.reshape(work)
        if not s:
            scale = init_scale ** (1 / k)
            s["m"] = torch.zeros(work, dtype=torch.float64)
            s["q"] = [scale * (torch.eye(d, dtype=torch.float64) if dense else torch.ones(d, dtype=torch.float64))
                      for d, dense in zip(work, tri)]
            s["updates"] = 0
        s["m"] = momentum * s["m"] + (1 - momentum) * g
        m_hat = s["m"] / (1 - momentum ** t)
        qs = s["q"]
        if updates[t]:
            if k > 1 and s["updates"] > 0 and s["updates"] % balance_every == 0:
                norms = [q.abs().max() for q in qs]
                mean = math.prod(norms) ** (1 / k)
                qs = [q * mean / n for q, n in zip(qs, norms)]
            h = m_hat if into_momentum else g
            v = probe(work, seed, 0, i, t, probe_dtype).double()  # the optimizer draws in its state dtype
            big_q = full_kron(qs)
            a = (big_q @ (h + math.sqrt(EPS32) * h.abs().mean() * v).reshape(-1)).reshape(work)
            b = torch.linalg.solve(big_q.T, v.reshape(-1)).reshape(work)
            new = []
            for j, q in enumerate(qs):
                aa, bb = unfold(a, j) @ unfold(a, j).T, unfold(b, j) @ unfold(b, j).T
                if q.dim() == 2:
                    new.append(q - precond_lr * torch.triu(aa - bb) @ q / max(norm_lower_bound(aa + bb), tiny))
                else:
                    new.append(q - precond_lr * torch.diag(aa - bb) * q / max(torch.diag(aa + bb).abs().max(), tiny))
            qs = new
            s["updates"] += 1
        s["q"] = qs
        big_q = full_kron(qs)
        u = (big_q.T @ big_q @ m_hat.reshape(-1)).reshape(work)
        if clip is not None:
            u = u * min(1.0, clip / (u.square().mean().sqrt().item() + 1e-12))
        return x - lr * (u.reshape(x.shape) + wd * x)

    return update


# Two settings: (a) kron_torch's defaults with a schedule that drops below 1 inside the run (updates every
# 1, 2, 3, 4 steps), weight decay, rebalancing every 4 updates; (b) the other switches: fit to the gradient,
# one_diag, dims above 5 diagonal, vectors triangular, no merging (3 factors for the 3-D tensor), init scale 2,
# no clip, another seed.
CONFIGS = {
    "schedule-wd-balance": dict(
        opt=dict(lr=0.02, weight_decay=0.1, prob_flat_start=5, prob_decay=0.12, prob_min=0.25),
        box=dict(lr=0.02, wd=0.1, updates=schedule(STEPS, pmin=0.25, decay=0.12, flat=5)),
        layout=dict(), balance_every=4),
    "gradient-fit-one-diag": dict(
        opt=dict(lr=0.01, momentum=0.8, momentum_into_precond_update=False, memory_save_mode="one_diag",
                 max_size_triangular=5, min_ndim_triangular=1, merge_dims=False, precond_init_scale=2.0,
                 precond_lr=0.2, update_clip_rms=None, seed=7, preconditioner_update_probability=0.5),
        box=dict(lr=0.01, momentum=0.8, into_momentum=False, precond_lr=0.2, init_scale=2.0, clip=None, seed=7,
                 updates=schedule(STEPS, fixed=0.5)),
        layout=dict(memory_save_mode="one_diag", max_size_triangular=5, min_ndim_triangular=1, merge_dims=False),
        balance_every=100),
}

# the work shapes and dense dims written out by hand, per layout
EXPECTED_LAYOUT = {
    "schedule-wd-balance": ([(6, 4), (4, 7), (5,), (6, 2), (1,)],
                            [(True, True), (True, True), (False,), (True, True), (False,)]),
    # one_diag: the largest dim diagonal; > 5 diagonal; vectors dense (min_ndim 1) unless largest or size 1
    "gradient-fit-one-diag": ([(6, 4), (4, 7), (5,), (3, 2, 2), (1,)],
                              [(False, True), (True, False), (False,), (False, True, True), (False,)]),
}


def test_layout_matches_the_hand_derived_work_shapes_and_factor_kinds():
    for name, cfg in CONFIGS.items():
        merge = cfg["layout"].get("merge_dims", True)
        kinds = {k: v for k, v in cfg["layout"].items() if k != "merge_dims"}
        works = [kron_work_shape(s, merge) for s in SHAPES]
        assert (works, [triangular_dims(w, **kinds) for w in works]) == EXPECTED_LAYOUT[name], name
    assert kron_work_shape((2, 3, 2, 5)) == (12, 5)
    assert triangular_dims((9000, 8)) == (False, True)  # above max_size_triangular 8192: diagonal
    assert triangular_dims((4, 6), memory_save_mode="smart_one_diag") == (True, False)
    assert triangular_dims((6, 6), memory_save_mode="smart_one_diag") == (True, True)  # no strictly largest
    assert triangular_dims((6, 6), memory_save_mode="one_diag") == (True, False)  # ties: the last
    assert triangular_dims((6, 6), memory_save_mode="all_diag") == (False, False)
    assert factor_numel((9000, 8)) == 9000 + 64 and factor_numel((7,)) == 7 and factor_numel(()) == 1


def _run(name: str, dtype, monkeypatch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    cfg = CONFIGS[name]
    monkeypatch.setattr(psgd_kron, "BALANCE_EVERY", cfg["balance_every"])
    works, tri = EXPECTED_LAYOUT[name]
    ours = trajectory.run_optimizer(lambda ps: PSGDKron(ps, **cfg["opt"]), start_weights(), STEPS, dtype)
    box = kron_box(works, tri, balance_every=cfg["balance_every"], probe_dtype=dtype, **cfg["box"])
    ref = trajectory.run_reference(box, start_weights(), STEPS)
    return ours, ref


@pytest.mark.parametrize("name", list(CONFIGS))
def test_trajectory_float64_equals_the_plain_kronecker_algorithm(name, monkeypatch):
    updates = CONFIGS[name]["box"]["updates"]
    assert 0 < sum(updates) < STEPS  # the schedule skips steps: its counter is exercised
    if name == "schedule-wd-balance":
        assert sum(updates) > 2 * CONFIGS[name]["balance_every"]  # rebalanced at least twice
    ours, ref = _run(name, torch.float64, monkeypatch)
    moved = max_diff(ref, start_weights())
    assert moved > 0.3, f"{name}: the weights barely moved ({moved})"  # measured 0.82 / 0.53
    assert max_diff(ours, ref) < 1e-12, f"{name}: {max_diff(ours, ref):.3g}"  # measured 4e-16 / 2e-16


@pytest.mark.parametrize("name", list(CONFIGS))
def test_trajectory_float32_stays_on_the_float64_reference(name, monkeypatch):
    ours, ref = _run(name, torch.float32, monkeypatch)
    assert max_diff(ours, ref) < 1e-5, f"{name}: {max_diff(ours, ref):.3g}"  # measured 2.7e-7 / 1.0e-7


def test_rebalancing_leaves_the_preconditioner_unchanged():
    g = torch.Generator().manual_seed(0)
    qs = [torch.triu(torch.randn(3, 3, generator=g, dtype=torch.float64)) * 50, torch.rand(4, generator=g,
          dtype=torch.float64) * 0.01 + 0.001]
    before = full_kron(qs)
    psgd_kron.balance_factors(qs)
    assert torch.allclose(full_kron(qs), before, rtol=1e-12, atol=0)
    assert math.isclose(qs[0].abs().max().item(), qs[1].abs().max().item(), rel_tol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# kron-torch, with our random vectors


def _kron_torch_run(monkeypatch, undo_damping_leak: bool, shapes, steps: int = STEPS):
    """kron-torch's kernels are ``@torch.compile``d: run them eagerly, through torch's own config patch (pytest's
    monkeypatch deletes the key on undo from torch's config module, which keeps its values outside ``__dict__``)."""
    with torch._dynamo.config.patch(disable=True):
        return _kron_torch_steps(monkeypatch, undo_damping_leak, shapes, steps)


def _kron_torch_steps(monkeypatch, undo_damping_leak: bool, shapes, steps: int):
    kron = pytest.importorskip("kron_torch.kron", reason="kron-torch (test-only reference) is not installed")
    if undo_damping_leak:
        calc = kron._calc_A_and_conjB
        monkeypatch.setattr(kron, "_calc_A_and_conjB", lambda expr, G, Q: calc(expr, G.clone(), Q))
    params = [nn.Parameter(w.float()) for w in start_weights(shapes)]
    opt = kron.Kron(params, lr=0.01, b1=0.9, weight_decay=0.0)
    opt.rng.random = lambda: 1.0  # never its random 1% rebalancing (ours comes after 100 updates)
    randn_like = torch.randn_like
    for t in range(1, steps + 1):
        for i, p in enumerate(params):
            p.grad = gradient(p.detach(), t, i).float()
        draws = iter([probe(kron_work_shape(p.shape), 0, 0, i, t, torch.float32) for i, p in enumerate(params)])
        monkeypatch.setattr(torch, "randn_like", lambda G, *a, **k: next(draws).view(G.shape))
        opt.step()
        monkeypatch.setattr(torch, "randn_like", randn_like)
    return [p.detach().double() for p in params]


KRON_SHAPES = SHAPES[:4]  # kron_torch keeps a 0-d tensor 0-d (",->"); ours views it as (1,): same math


@pytest.mark.parametrize("undo_damping_leak", [True, False], ids=["leak-undone", "as-published"])
def test_against_kron_torch_with_the_same_random_vectors(monkeypatch, undo_damping_leak):
    theirs = _kron_torch_run(monkeypatch, undo_damping_leak, KRON_SHAPES)
    ours = trajectory.run_optimizer(lambda ps: PSGDKron(ps, lr=0.01), start_weights(KRON_SHAPES), STEPS)
    moved = max_diff(ours, start_weights(KRON_SHAPES))
    assert moved > 0.1
    if undo_damping_leak:
        assert max_diff(ours, theirs) < 1e-6, max_diff(ours, theirs)  # measured 6e-8: float32 round-off
    else:
        # kron_torch's update carries sqrt(eps32)·mean|m̂|·P·v (~3.5e-4 relative) every step: measured 6e-5
        assert 1e-6 < max_diff(ours, theirs) < 1e-3, max_diff(ours, theirs)


# ----------------------------------------------------------------------------------------------------------
# State: determinism, resume, dtypes, layout


def _train(opt, params, start: int, steps: int) -> None:
    for t in range(start, start + steps):
        for i, p in enumerate(params):
            p.grad = gradient(p.detach(), t, i).to(p.dtype)
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_through_torch_save_is_bit_exact_and_keeps_float32_state(dtype):
    """bf16 parameters keep float32 momentum and factors; torch's load would cast them to bf16."""
    hp = dict(lr=0.01, prob_flat_start=2, prob_decay=0.3, prob_min=0.3)
    straight = [nn.Parameter(w.to(dtype)) for w in start_weights()]
    o1 = PSGDKron(straight, **hp)
    _train(o1, straight, 1, 12)

    first = [nn.Parameter(w.to(dtype)) for w in start_weights()]
    o2 = PSGDKron(first, **hp)
    _train(o2, first, 1, 6)
    buf = io.BytesIO()
    torch.save({"w": [p.detach() for p in first], "opt": o2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = [nn.Parameter(w.clone()) for w in ckpt["w"]]
    o3 = PSGDKron(resumed, **hp)
    o3.load_state_dict(ckpt["opt"])
    assert o3.param_groups[0]["prob_step"] == 6 and "update_counter" in o3.param_groups[0]
    state = o3.state[resumed[0]]
    assert state["momentum_buffer"].dtype == torch.float32 and state["Q0"].dtype == torch.float32
    assert state["step"].device.type == "cpu" and float(state["step"]) == 6
    _train(o3, resumed, 7, 6)
    for a, b in zip(straight, resumed):
        assert torch.equal(a.detach(), b.detach())
    for p1, p3 in zip(straight, resumed):
        for key, value in o1.state[p1].items():
            assert torch.equal(value, o3.state[p3][key]), key


def test_probe_draws_leave_the_global_generator_alone_and_follow_the_seed():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    runs = {}
    for seed in (0, 0, 1):
        params = [nn.Parameter(w.float()) for w in start_weights()]
        _train(PSGDKron(params, lr=0.01, seed=seed), params, 1, 5)
        runs.setdefault(seed, []).append([p.detach().clone() for p in params])
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(a, b) for a, b in zip(*runs[0]))
    assert max_diff([p.double() for p in runs[0][0]], [p.double() for p in runs[1][0]]) > 0


def test_state_is_the_momentum_and_the_factors_the_estimator_counts():
    params = [nn.Parameter(torch.zeros(s)) for s in [(6, 4), (5,), (3, 2, 2), (10, 3)]]
    opt = PSGDKron(params, max_size_triangular=8)
    _train(opt, params, 1, 1)
    for p in params:
        st = opt.state[p]
        counted = sum(v.numel() for v in st.values() if v.dim() > 0)
        assert counted == p.numel() + factor_numel(p.shape, max_size_triangular=8)
    assert opt.state[params[3]]["Q0"].shape == (10,) and opt.state[params[3]]["Q1"].shape == (3, 3)
    spec = lo.optimizer_info("psgd-kron")
    assert spec.state.numel((6, 4)) == 24 + 36 + 16 and spec.defaults["lr"] == 3e-4


def test_a_dtensor_parameter_steps_like_a_plain_one(one_rank_mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    plain = [nn.Parameter(w.float()) for w in start_weights(SHAPES[:2])]
    dist = [nn.Parameter(distribute_tensor(w.float(), one_rank_mesh, [Shard(0)])) for w in start_weights(SHAPES[:2])]
    o_plain, o_dist = PSGDKron(plain, lr=0.01), PSGDKron(dist, lr=0.01)
    for t in range(1, 6):
        for i, (a, b) in enumerate(zip(plain, dist)):
            g = gradient(a.detach(), t, i).float()
            a.grad = g
            b.grad = distribute_tensor(g, one_rank_mesh, [Shard(0)])
        o_plain.step()
        o_dist.step()
    for a, b in zip(plain, dist):
        assert torch.equal(a.detach(), b.detach().full_tensor())


# ----------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("kwargs, field", [
    ({"lr": -1.0}, "lr"),
    ({"momentum": 1.0}, "momentum"),
    ({"weight_decay": float("nan")}, "weight_decay"),
    ({"preconditioner_update_probability": 0.0}, "preconditioner_update_probability"),
    ({"preconditioner_update_probability": 1.5}, "preconditioner_update_probability"),
    ({"prob_min": 0.5, "prob_max": 0.4}, "prob_min"),
    ({"max_size_triangular": 0}, "max_size_triangular"),
    ({"min_ndim_triangular": 1.5}, "min_ndim_triangular"),
    ({"memory_save_mode": "half_diag"}, "memory_save_mode"),
    ({"merge_dims": "yes"}, "merge_dims"),
    ({"precond_lr": -0.1}, "precond_lr"),
    ({"precond_init_scale": 0.0}, "precond_init_scale"),
    ({"update_clip_rms": -1.0}, "update_clip_rms"),
    ({"seed": 1.5}, "seed"),
])
def test_bad_hyperparameters_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PSGDKron([nn.Parameter(torch.zeros(2, 2))], **kwargs)


def test_registry_refuses_unknown_names_and_sparse_gradients_are_refused():
    with pytest.raises(ValueError, match="precond_lr"):
        lo.create_optimizer("psgd-kron", nn.Linear(3, 3), precond_lrr=0.1)
    p = nn.Parameter(torch.zeros(4, 3))
    p.grad = torch.zeros(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        PSGDKron([p]).step()
