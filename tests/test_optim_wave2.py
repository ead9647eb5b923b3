"""Wave-2 optimizers (LAMB, StableAdamW, Adam-mini, GaLore, APOLLO) against independent references.

Each trajectory test runs the optimizer for 30 steps on small tensors whose gradients depend on the current
weights (``g = 0.5·(x - target) + noise_t``, so a wrong step changes every later gradient) and compares
with the paper's algorithm box written plainly below, one tensor at a time in float64, and with
pytorch-optimizer where its semantics match the paper (the module docstrings say where they do not).
Tolerances are max |Δweight| after 30 steps; the values measured on CPU are in the comments.
"""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

from lightning_optim.optim._low_rank import effective_rank
from lightning_optim.optim.adam_mini import AdamMini, block_segments
from lightning_optim.optim.apollo import APOLLO, projection_seed
from lightning_optim.optim.galore import GaLore
from lightning_optim.optim.lamb import LAMB
from lightning_optim.optim.stable_adamw import StableAdamW
from tests import _trajectory as trajectory
from tests._trajectory import gradient, max_diff

STEPS = 30
SHAPES = [(6, 4), (4, 7), (5,), (3,)]  # tall and wide matrices, a vector, a zero vector (bias)


def start_weights(shapes=SHAPES, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    ws[-1].zero_()  # a zero-initialised bias: LAMB's trust ratio falls back to 1
    return ws


def run_optimizer(make, shapes=SHAPES, steps: int = STEPS, dtype=torch.float32, groups=None) -> list[torch.Tensor]:
    return trajectory.run_optimizer(make, start_weights(shapes), steps, dtype, groups)


def run_reference(update, shapes=SHAPES, steps: int = STEPS) -> list[torch.Tensor]:
    """``update(i, x, g, state, t)`` returns the new ``x`` (float64); ``state`` is a dict per tensor."""
    return trajectory.run_reference(update, start_weights(shapes), steps)


def adam_moments(s: dict, g: torch.Tensor, b1: float, b2: float) -> tuple[torch.Tensor, torch.Tensor]:
    s["m"] = b1 * s.get("m", torch.zeros_like(g)) + (1 - b1) * g
    s["v"] = b2 * s.get("v", torch.zeros_like(g)) + (1 - b2) * g * g
    return s["m"], s["v"]


# ----------------------------------------------------------------------------------------------------------
# LAMB


def lamb_box(lr, b1, b2, eps, wd, bias_correction=True, clip=None):
    def update(i, x, g, s, t):
        m, v = adam_moments(s, g, b1, b2)
        bc1, bc2 = (1 - b1 ** t, 1 - b2 ** t) if bias_correction else (1, 1)
        r = (m / bc1) / ((v / bc2).sqrt() + eps) + wd * x
        w_norm, r_norm = x.norm().item(), r.norm().item()
        phi = w_norm if clip is None else min(w_norm, clip)
        trust = phi / r_norm if w_norm > 0 and r_norm > 0 else 1.0
        return x - lr * trust * r
    return update


def test_lamb_matches_the_algorithm_box():
    got = run_optimizer(lambda ps: LAMB(ps, lr=0.02, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05))
    want = run_reference(lamb_box(0.02, 0.9, 0.99, 1e-6, 0.05))
    assert max_diff(got, want) < 2e-6  # measured 3.6e-7 (float32 vs float64)
    assert max_diff(got, start_weights()) > 0.1  # it moved


def test_lamb_matches_pytorch_optimizer_without_bias_correction():
    po = pytest.importorskip("pytorch_optimizer")
    # pytorch-optimizer: adam_debias=True for no bias correction (its default corrects m only),
    # φ(‖x‖) = min(‖x‖, 10), trust = ‖x‖ / (‖r‖ + eps); weight decay 0 because it decays decoupled while the
    # paper puts λx into r
    ours = run_optimizer(lambda ps: LAMB(ps, lr=0.02, weight_decay=0.0, bias_correction=False, weight_norm_clip=10.0))
    theirs = run_optimizer(lambda ps: po.Lamb(ps, lr=0.02, weight_decay=0.0, adam_debias=True, foreach=False))
    assert max_diff(ours, theirs) < 1e-5  # measured 0 (the same float32 operations) (their eps in the trust ratio)


def test_lamb_layer_adaptation_off_is_adamw_with_l2_in_the_update():
    def adam_l2(i, x, g, s, t):
        m, v = adam_moments(s, g, 0.9, 0.999)
        return x - 0.01 * ((m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-6) + 0.1 * x)

    got = run_optimizer(lambda ps: LAMB(ps, lr=0.01, weight_decay=0.1, layer_adaptation=False))
    assert max_diff(got, run_reference(adam_l2)) < 2e-6
    adapted = run_optimizer(lambda ps: LAMB(ps, lr=0.01, weight_decay=0.1))
    assert max_diff(adapted, got) > 1e-3  # the trust ratio does change the steps


# ----------------------------------------------------------------------------------------------------------
# StableAdamW


def stable_adamw_box(lr, b1, b2, eps, wd):
    def update(i, x, g, s, t):
        hb1 = b1 * (1 - b1 ** (t - 1)) / (1 - b1 ** t)
        hb2 = b2 * (1 - b2 ** (t - 1)) / (1 - b2 ** t)
        s["m"] = hb1 * s.get("m", torch.zeros_like(g)) + (1 - hb1) * g
        s["v"] = hb2 * s.get("v", torch.zeros_like(g)) + (1 - hb2) * g * g
        rms = math.sqrt((g * g / s["v"].clamp_min(eps ** 2)).mean().item())
        eta = lr / max(1.0, rms)
        return x - eta * wd * x - eta * s["m"] / (s["v"].sqrt() + eps)
    return update


def test_stable_adamw_matches_the_algorithm_box_and_pytorch_optimizer():
    po = pytest.importorskip("pytorch_optimizer")
    got = run_optimizer(lambda ps: StableAdamW(ps, lr=0.02, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1))
    want = run_reference(stable_adamw_box(0.02, 0.9, 0.99, 1e-6, 0.1))
    assert max_diff(got, want) < 2e-6  # measured 7.2e-7
    theirs = run_optimizer(lambda ps: po.StableAdamW(ps, lr=0.02, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1,
                                                      foreach=False))
    assert max_diff(got, theirs) < 2e-6  # measured 2.4e-7


def test_stable_adamw_matches_torch_optimi():
    optimi = pytest.importorskip("optimi")
    got = run_optimizer(lambda ps: StableAdamW(ps, lr=0.02, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1))
    theirs = run_optimizer(lambda ps: optimi.StableAdamW(ps, lr=0.02, betas=(0.9, 0.99), eps=1e-6,
                                                         weight_decay=0.1, foreach=False))
    assert max_diff(got, theirs) < 2e-6  # measured 2.4e-7


def test_stable_adamw_clips_a_gradient_far_above_its_second_moment():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    opt = StableAdamW([p], lr=0.1, weight_decay=0.0)
    for _ in range(5):
        p.grad = torch.full((4, 4), 1e-3)
        opt.step()
    before = p.detach().clone()
    p.grad = torch.full((4, 4), 10.0)  # g²/v ≈ 1e8 / (1e-6·0.99 + 0.01·100): RMS ≫ 1
    opt.step()
    step = (before - p.detach()).abs().max().item()
    state = opt.state[p]
    rms = math.sqrt((100.0 / state["exp_avg_sq"]).mean().item())
    adam_step = 0.1 * (state["exp_avg"] / (state["exp_avg_sq"].sqrt() + 1e-6)).abs().max().item()
    assert rms > 1 and step == pytest.approx(adam_step / rms, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Adam-mini

MINI_NAMES = ["blocks.0.attn.qkv.weight", "blocks.0.mlp.up.weight", "blocks.0.attn_norm.weight", "tok_emb.weight"]
MINI_SHAPES = [(12, 4), (6, 4), (4,), (5, 4)]  # qkv: 3 × (2 heads × head_dim 2) rows


def mini_blocks(name: str, shape: tuple[int, ...]) -> list[list[int]]:
    """The rule of the paper written out as lists of flat element indices (n_heads = 2, head_dim = 2)."""
    if len(shape) < 2:
        return [list(range(shape[0]))]
    cols = shape[1]
    rows_of = [[r] for r in range(shape[0])]
    if name.endswith("qkv.weight"):
        rows_of = [[0, 1], [2, 3], [4, 5], [6, 7]] + [[r] for r in range(8, 12)]  # q heads, k heads, v rows
    return [[r * cols + c for r in rows for c in range(cols)] for rows in rows_of]


def adam_mini_box(lr, b1, b2, eps, wd):
    def update(i, x, g, s, t):
        blocks = mini_blocks(MINI_NAMES[i], tuple(x.shape))
        s["m"] = b1 * s.get("m", torch.zeros_like(g)) + (1 - b1) * g
        s.setdefault("v", [0.0] * len(blocks))
        flat_g, new = g.reshape(-1), (x * (1 - lr * wd)).reshape(-1).clone()
        m_hat = (s["m"] / (1 - b1 ** t)).reshape(-1)
        for k, idx in enumerate(blocks):
            s["v"][k] = b2 * s["v"][k] + (1 - b2) * (flat_g[idx] ** 2).mean().item()
            new[idx] -= lr * m_hat[idx] / (math.sqrt(s["v"][k] / (1 - b2 ** t)) + eps)
        return new.reshape(x.shape)
    return update


def test_adam_mini_matches_the_algorithm_box_with_head_blocks():
    def groups(ps):
        return [{"params": ps, "param_names": MINI_NAMES}]
    got = run_optimizer(lambda gs: AdamMini(gs, lr=0.02, betas=(0.9, 0.95), weight_decay=0.1, n_heads=2),
                        shapes=MINI_SHAPES, groups=groups)
    want = run_reference(adam_mini_box(0.02, 0.9, 0.95, 1e-8, 0.1), shapes=MINI_SHAPES)
    assert max_diff(got, want) < 1e-5  # measured 2.5e-6


def test_adam_mini_block_rule_and_its_refusals():
    assert block_segments("blocks.3.attn.qkv.weight", (36, 12), 3, None) == [(3, 4), (3, 4), (12, 1)]
    assert block_segments("layers.0.self_attn.k_proj.weight", (8, 32), 8, 2) == [(2, 4)]  # GQA: kv heads
    assert block_segments("layers.0.self_attn.q_proj.weight", (32, 32), 8, 2) == [(8, 4)]
    assert block_segments("lm_head.weight", (50, 8), 2, None) == [(50, 1)]  # one block per token
    assert block_segments("blocks.0.attn.qkv.bias", (36,), 3, None) == [(1, 1)]
    assert block_segments("blocks.0.attn.qkv.weight", (36, 12), None, None) == [(36, 1)]  # no heads given
    with pytest.raises(ValueError, match=r"'blocks.0.attn.qkv.weight' has 10 rows"):
        AdamMini([{"params": [torch.nn.Parameter(torch.zeros(10, 4))], "param_names": ["blocks.0.attn.qkv.weight"]}],
                 n_heads=2)
    with pytest.raises(ValueError, match="n_heads"):
        AdamMini([torch.nn.Parameter(torch.zeros(2, 2))], n_heads=0)
    with pytest.raises(ValueError, match="n_kv_heads"):
        AdamMini([torch.nn.Parameter(torch.zeros(2, 2))], n_kv_heads=2)


def test_adam_mini_on_the_recipe_model_keeps_one_moment_per_block():
    from lightning_optim.models.gpt import Transformer, model_config

    cfg = model_config("tiny", vocab_size=32, n_layer=1, n_embd=16, n_head=4)
    model = Transformer(cfg)
    opt = AdamMini([{"params": [p for _, p in model.named_parameters()],
                     "param_names": [n for n, _ in model.named_parameters()]}], n_heads=cfg.n_head)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    sizes = {n: opt.state[p]["v_block"].numel() for n, p in model.named_parameters()}
    assert sizes["blocks.0.attn.qkv.weight"] == 4 + 4 + 16  # q heads, k heads, v rows
    assert sizes["blocks.0.mlp.up.weight"] == cfg.mlp_hidden and sizes["tok_emb.weight"] == 32
    assert sizes["blocks.0.attn_norm.weight"] == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        AdamMini([{"params": [p for _, p in model.named_parameters()],
                   "param_names": [n for n, _ in model.named_parameters()]}])
    assert any("n_heads is not set" in str(w.message) and "qkv" in str(w.message) for w in caught)


# ----------------------------------------------------------------------------------------------------------
# GaLore and APOLLO: the shared low-rank loop, written plainly

LOW_RANK = dict(lr=0.02, b1=0.9, b2=0.999, eps=1e-6, wd=0.05)


def low_rank_box(kind: str, rank: int, gap: int, scale: float, scale_type: str = "channel", limit=1.01, seed=0):
    c = LOW_RANK

    def update(i, x, g, s, t):
        step = c["lr"] * math.sqrt(1 - c["b2"] ** t) / (1 - c["b1"] ** t)
        if x.ndim < 2:  # AdamW on the full gradient, decay after the update
            m, v = adam_moments(s, g, c["b1"], c["b2"])
            x = x - step * m / (v.sqrt() + c["eps"])
            return x - c["lr"] * c["wd"] * x
        m_rows, n_cols = x.shape
        r = min(rank, m_rows, n_cols)
        right = m_rows >= n_cols
        if (t - 1) % gap == 0:
            if kind == "galore":
                u, _, vh = torch.linalg.svd(g.float(), full_matrices=False)
                s["P"] = (vh[:r] if right else u[:, :r]).double()
            else:
                gen = torch.Generator().manual_seed(projection_seed(seed, i, (t - 1) // gap))
                shape = (r, n_cols) if right else (m_rows, r)
                s["P"] = (torch.randn(shape, generator=gen) / math.sqrt(r)).double()
        P = s["P"]
        R = g @ P.T if right else P.T @ g
        m, v = adam_moments(s, R, c["b1"], c["b2"])
        N = m / (v.sqrt() + c["eps"])
        if kind == "galore":
            upd = scale * (N @ P if right else P @ N)
        else:
            if scale_type == "channel":
                d = 1 if right else 0
                factor = N.norm(dim=d, keepdim=True) / (R.norm(dim=d, keepdim=True) + 1e-8)
            else:
                factor = N.norm() / (R.norm() + 1e-8)
            upd = g * factor
            norm = upd.norm().item()
            if limit is not None and "prev" in s and norm > limit * s["prev"]:
                upd = upd * (limit * s["prev"] / norm)
                norm = limit * s["prev"]
            s["prev"] = norm
            upd = upd * math.sqrt(scale)
        x = x - step * upd
        return x - c["lr"] * c["wd"] * x
    return update


def _low_rank_kw():
    c = LOW_RANK
    return dict(lr=c["lr"], betas=(c["b1"], c["b2"]), eps=c["eps"], weight_decay=c["wd"])


def test_galore_matches_the_algorithm_box_across_svd_refreshes():
    got = run_optimizer(lambda ps: GaLore(ps, rank=2, update_proj_gap=5, scale=0.25, **_low_rank_kw()))
    want = run_reference(low_rank_box("galore", rank=2, gap=5, scale=0.25))
    assert max_diff(got, want) < 1e-5  # measured 8.4e-7; 6 refreshes in 30 steps


def test_galore_matches_pytorch_optimizer_between_refreshes():
    po = pytest.importorskip("pytorch_optimizer")
    # pytorch-optimizer refreshes at steps T, 2T, ... where the official code refreshes at 1, T+1, 2T+1: with
    # a gap longer than the run both take the one SVD of step 1, and the projected Adam must then agree
    ours = run_optimizer(lambda ps: GaLore(ps, rank=2, update_proj_gap=1000, scale=0.25, **_low_rank_kw()))
    theirs = run_optimizer(lambda ps: po.GaLore(
        [{"params": ps[:2], "rank": 2, "update_proj_gap": 1000, "scale": 0.25, "projection_type": "std"},
         {"params": ps[2:]}], foreach=False, **_low_rank_kw()))
    assert max_diff(ours, theirs) < 1e-5  # measured 0 (the same float32 operations)


@pytest.mark.parametrize("scale_type,rank,scale,limit", [("channel", 2, 1.0, 1.01), ("tensor", 1, 128.0, 1.01),
                                                         ("channel", 3, 1.0, None)])
def test_apollo_matches_the_algorithm_box(scale_type, rank, scale, limit):
    got = run_optimizer(lambda ps: APOLLO(ps, rank=rank, update_proj_gap=7, scale=scale, scale_type=scale_type,
                                          norm_growth_limit=limit, **_low_rank_kw()))
    want = run_reference(low_rank_box("apollo", rank=rank, gap=7, scale=scale, scale_type=scale_type, limit=limit))
    assert max_diff(got, want) < 1e-5  # measured 1.1e-6, 4.4e-7, 5.8e-7


def test_apollo_update_is_the_scaled_full_rank_gradient():
    """The paper's G·s, not pytorch-optimizer's Pᵀ(s·R): the update of a rank-1 APOLLO on a 6×6 matrix with
    channel scaling has full rank whenever the gradient does."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(6, 6))
    opt = APOLLO([p], lr=0.1, rank=1, norm_growth_limit=None)
    p.grad = torch.randn(6, 6)
    opt.step()
    assert torch.linalg.matrix_rank(p.detach()).item() == 6


def test_low_rank_state_shapes_and_rank_cap():
    p, q = torch.nn.Parameter(torch.randn(8, 3)), torch.nn.Parameter(torch.randn(3, 8))
    opt = GaLore([p, q], rank=5)
    p.grad, q.grad = torch.randn(8, 3), torch.randn(3, 8)
    opt.step()
    assert effective_rank(5, (8, 3)) == 3
    assert opt.state[p]["exp_avg"].shape == (8, 3) and opt.state[p]["projector"].shape == (3, 3)
    assert opt.state[q]["exp_avg"].shape == (3, 8) and opt.state[q]["projector"].shape == (3, 3)
    opt = APOLLO([p, q], rank=2)
    opt.step()
    assert opt.state[p]["exp_avg"].shape == (8, 2) and opt.state[p]["projector"].shape == (2, 3)
    assert opt.state[q]["exp_avg"].shape == (2, 8) and opt.state[q]["projector"].shape == (3, 2)


# ----------------------------------------------------------------------------------------------------------
# every optimizer: bf16 weights, state round trip, bad hyperparameters

MAKERS = {
    "lamb": lambda ps: LAMB(ps, lr=0.01),
    "stable-adamw": lambda ps: StableAdamW(ps, lr=0.01),
    "adam-mini": lambda ps: AdamMini(ps, lr=0.01),
    "galore": lambda ps: GaLore(ps, rank=2, update_proj_gap=4),
    "apollo": lambda ps: APOLLO(ps, rank=2, update_proj_gap=4),
}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_bf16_weights_track_float32(name):
    """bf16 weights stay finite and move the way the float32 run does (each step rounds
    to bf16's 8-bit mantissa, so only the direction of the whole move is compared)."""
    start = start_weights()
    fp32 = run_optimizer(MAKERS[name], steps=10)
    bf16 = run_optimizer(MAKERS[name], steps=10, dtype=torch.bfloat16)
    move32 = torch.cat([(a - s).reshape(-1) for a, s in zip(fp32, start)])
    move16 = torch.cat([(b - s.bfloat16().double()).reshape(-1) for b, s in zip(bf16, start)])
    assert torch.isfinite(move16).all() and move32.norm() > 0.1
    assert torch.nn.functional.cosine_similarity(move32, move16, dim=0) > 0.95


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_state_round_trips_with_weights_only_and_resumes_exactly(name):
    def fresh():
        ps = [torch.nn.Parameter(w.float()) for w in start_weights()]
        return ps, MAKERS[name](ps)

    def steps(ps, opt, t0, n):
        for t in range(t0, t0 + n):
            for i, p in enumerate(ps):
                p.grad = gradient(p.detach(), t, i).float()
            opt.step()

    ps, opt = fresh()
    steps(ps, opt, 1, 6)
    buf = io.BytesIO()
    torch.save({"w": [p.detach().clone() for p in ps], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    steps(ps, opt, 7, 6)
    qs, opt2 = fresh()
    with torch.no_grad():
        for q, w in zip(qs, saved["w"]):
            q.copy_(w)
    opt2.load_state_dict(saved["opt"])
    steps(qs, opt2, 7, 6)
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))


@pytest.mark.parametrize("make,field", [
    (lambda p: LAMB(p, weight_norm_clip=0.0), "weight_norm_clip"),
    (lambda p: LAMB(p, eps=0.0), "eps"),
    (lambda p: StableAdamW(p, betas=(0.9, 1.0)), r"betas\[1\]"),
    (lambda p: StableAdamW(p, lr=float("nan")), "lr"),
    (lambda p: AdamMini(p, q_names="q_proj"), "q_names"),
    (lambda p: GaLore(p, rank=0), "rank"),
    (lambda p: GaLore(p, update_proj_gap=2.5), "update_proj_gap"),
    (lambda p: GaLore(p, scale=-1.0), "scale"),
    (lambda p: APOLLO(p, scale_type="row"), "scale_type"),
    (lambda p: APOLLO(p, norm_growth_limit=0.5), "norm_growth_limit"),
    (lambda p: APOLLO(p, seed=-1), "seed"),
])
def test_bad_hyperparameters_are_refused_naming_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make([torch.nn.Parameter(torch.zeros(3, 3))])


# ----------------------------------------------------------------------------------------------------------
# DTensor code paths (one-process gloo mesh; the 2-process FSDP2 runs are in tests/conformance)


@pytest.mark.parametrize("name", ["lamb", "stable-adamw", "adam-mini"])
def test_row_sharded_dtensors_take_the_plain_steps(name, one_rank_mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    make = {"lamb": lambda gs: LAMB(gs, lr=0.02), "stable-adamw": lambda gs: StableAdamW(gs, lr=0.02),
            "adam-mini": lambda gs: AdamMini(gs, lr=0.02, n_heads=2)}[name]

    def run(as_dtensor: bool) -> list[torch.Tensor]:
        ws = [w.float() for w in start_weights(MINI_SHAPES)]
        wrap = (lambda t: distribute_tensor(t, one_rank_mesh, [Shard(0)])) if as_dtensor else (lambda t: t)
        ps = [torch.nn.Parameter(wrap(w)) for w in ws]
        opt = make([{"params": ps, "param_names": MINI_NAMES}])
        for t in range(1, 11):
            for i, p in enumerate(ps):
                local = p.to_local() if as_dtensor else p
                p.grad = wrap(gradient(local.detach(), t, i).float())
            opt.step()
        if as_dtensor:
            assert all(type(v).__name__ == "DTensor" for v in opt.state[ps[0]].values() if v.ndim > 0)
        return [(p.to_local() if as_dtensor else p).detach().double() for p in ps]

    assert max_diff(run(True), run(False)) == 0.0


@pytest.mark.parametrize("cls", [GaLore, APOLLO])
def test_low_rank_optimizers_refuse_dtensors_naming_the_parameter(cls, one_rank_mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    w = torch.nn.Parameter(distribute_tensor(torch.zeros(6, 4), one_rank_mesh, [Shard(0)]))
    with pytest.raises(ValueError, match=r"'blocks.0.mlp.up.weight' is a DTensor"):
        cls([{"params": [w], "param_names": ["blocks.0.mlp.up.weight"]}])


def test_adam_mini_refuses_column_sharded_dtensors_naming_the_parameter(one_rank_mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    w = torch.nn.Parameter(distribute_tensor(torch.zeros(12, 4), one_rank_mesh, [Shard(1)]))
    with pytest.raises(ValueError, match=r"'blocks.0.attn.qkv.weight' has DTensor placements"):
        AdamMini([{"params": [w], "param_names": ["blocks.0.attn.qkv.weight"]}], n_heads=2)
