"""Muon family (muon, d-muon, normuon, sf-normuon): references, routing, state round trips."""

import copy
import math

import pytest
import torch
from torch import nn

from lightning_optim import create_optimizer, optimizer_info, param_groups
from lightning_optim.optim.newton_schulz import JORDAN

STEPS = 50


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small matrices: one intra-op thread is faster and immune to a busy machine's oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
NAMES = ["muon", "d-muon", "normuon", "sf-normuon"]


# ---------------------------------------------------------------- plain single-tensor renditions of the boxes

def ns_ref(G, steps=5):
    X = G.reshape(G.shape[0], -1).bfloat16()
    tall = X.size(0) > X.size(1)
    if tall:
        X = X.T
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        a, b, c = JORDAN
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if tall else X).float()


def adamw_ref(p, g, st, lr, betas, eps, wd):
    st["t"] = st.get("t", 0) + 1
    m = st["m"] = betas[0] * st.get("m", torch.zeros_like(p)) + (1 - betas[0]) * g
    v = st["v"] = betas[1] * st.get("v", torch.zeros_like(p)) + (1 - betas[1]) * g * g
    p.mul_(1 - lr * wd)
    p.sub_(lr * (m / (1 - betas[0] ** st["t"])) / ((v / (1 - betas[1] ** st["t"])).sqrt() + eps))


def muon_ref(p, g, st, lr, wd, mu, scale):
    buf = st["buf"] = mu * st.get("buf", torch.zeros_like(p)) + (1 - mu) * g
    O = ns_ref((1 - mu) * g + mu * buf)
    rows, cols = p.shape[0], p[0].numel()
    s = math.sqrt(max(1, rows / cols)) if scale == "original" else 0.2 * math.sqrt(max(rows, cols))
    p.mul_(1 - lr * wd)
    p.sub_(lr * s * O.view_as(p))


def normuon_ref(p, g, st, lr, wd, mu, beta2, eps, adjust):
    buf = st["buf"] = mu * st.get("buf", torch.zeros_like(p)) + (1 - mu) * g
    O = ns_ref((1 - mu) * g + mu * buf)
    rows, cols = O.shape
    v = st["v"] = beta2 * st.get("v", torch.zeros(rows, 1)) + (1 - beta2) * (O * O).mean(-1, keepdim=True)
    Oh = O / (v.sqrt() + eps)
    if adjust == "paper":
        U = Oh * 0.2 * math.sqrt(rows * cols) / Oh.norm()
    else:
        U = Oh * O.norm() / Oh.norm() * math.sqrt(max(1, rows / cols))
    p.mul_(1 - lr * wd)
    p.sub_(lr * U.view_as(p))


def sf_clock(st, lr, warmup):
    t = st["t"] = st.get("t", 0) + 1
    lr_t = lr * min(1.0, t / warmup)
    st["wsum"] = st.get("wsum", 0.0) + lr_t ** 2
    return t, lr_t, lr_t ** 2 / st["wsum"]


def sf_normuon_ref(p, g, st, lr, wd, beta1, beta2, mu, eps, warmup):
    """x, z explicit; p holds y = (1-β1) z + β1 x."""
    if "z" not in st:
        st["z"], st["x"] = p.clone(), p.clone()
    t, lr_t, c = sf_clock(st, lr, warmup)
    m = st["m"] = mu * st.get("m", torch.zeros_like(p)) + (1 - mu) * g
    P = ns_ref(m)
    rows, cols = P.shape
    v = st["v"] = beta2 * st.get("v", torch.zeros(rows, 1)) + (1 - beta2) * (P * P).mean(-1, keepdim=True)
    Ph = P / (v.sqrt() + eps)
    st["z"] = st["z"] - lr_t * wd * st["z"] - lr_t * (0.2 * math.sqrt(rows * cols) / Ph.norm() * Ph).view_as(p)
    st["x"] = (1 - c) * st["x"] + c * st["z"]
    p.copy_((1 - beta1) * st["z"] + beta1 * st["x"])


def sf_adamw_ref(p, g, st, lr, wd, betas, eps, warmup):
    if "z" not in st:
        st["z"], st["x"] = p.clone(), p.clone()
    t, lr_t, c = sf_clock(st, lr, warmup)
    v = st["v"] = betas[1] * st.get("v", torch.zeros_like(p)) + (1 - betas[1]) * g * g
    u = g / ((v / (1 - betas[1] ** t)).sqrt() + eps) + wd * st["z"]
    st["z"] = st["z"] - lr_t * u
    st["x"] = (1 - c) * st["x"] + c * st["z"]
    p.copy_((1 - betas[0]) * st["z"] + betas[0] * st["x"])


# ---------------------------------------------------------------- a small hybrid model

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.q = nn.Linear(32, 32, bias=False)
        self.k = nn.Linear(32, 32, bias=False)
        self.up = nn.Linear(32, 80)
        self.down = nn.Linear(80, 32, bias=False)
        self.conv = nn.Conv1d(32, 16, 3, bias=False)  # 3-D: flattened to 16 x 96
        self.norm = nn.LayerNorm(32)
        self.lm_head = nn.Linear(32, 50, bias=False)


def build(name, params, **hp):
    """create_optimizer, except that ``adjust_lr`` (a string) is passed straight to the factory: the registry's
    name-based check treats every ``*_lr`` as a number (reported to the foundation owner)."""
    from lightning_optim.registry import _as_param_groups, get_optimizer_spec

    adjust = hp.pop("adjust_lr", None)
    if adjust is None:
        return create_optimizer(name, params, **hp)
    spec = get_optimizer_spec(name)
    return spec.factory(_as_param_groups(params, spec), **{**spec.defaults, **hp, "adjust_lr": adjust})


def make_model(seed=0):
    torch.manual_seed(seed)
    return Tiny()


def grads_for(model, step):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen) * 0.1 for p in model.parameters()]


def run(model, opt, steps, start=0):
    for s in range(start, start + steps):
        for p, g in zip(model.parameters(), grads_for(model, s)):
            p.grad = g.clone()
        opt.step()


def test_registry_specs():
    for name in NAMES:
        spec = optimizer_info(name)
        assert spec.hybrid and spec.family == "matrix" and spec.other_state.tensors == 2
        assert "matrix rule" in spec.routing
        for key in ("ns_steps", "ns_coefficients", "adamw_lr", "adamw_betas", "adamw_eps", "adamw_weight_decay"):
            assert key in spec.defaults, (name, key)
    assert optimizer_info("sf-normuon").schedule_free
    assert optimizer_info("sf-normuon").callbacks == ("lightning_optim.callbacks.schedule_free:ScheduleFreeSwitch",)
    assert optimizer_info("normuon").state.numel((8, 4)) == 32 + 8


def test_muon_equals_torch_muon():
    torch.manual_seed(0)
    shapes = [(64, 32), (32, 96), (64, 32), (48, 48)]
    a = [torch.randn(s, requires_grad=True) for s in shapes]
    b = [x.detach().clone().requires_grad_() for x in a]
    for adjust in ("original", "match_rms_adamw"):
        ours = build("muon", [{"params": a, "matrix": True}], lr=0.02, weight_decay=0.1, adjust_lr=adjust)
        ref = torch.optim.Muon(b, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn=adjust)
        for s in range(STEPS):
            for x, y in zip(a, b):
                g = torch.randn_like(x)
                x.grad, y.grad = g.clone(), g.clone()
            ours.step()
            ref.step()
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def _reference_run(name, model, hp, steps):
    groups = param_groups(model, split_matrices=True)
    states = {id(p): {} for p in model.parameters()}
    for s in range(steps):
        gs = dict(zip(map(id, model.parameters()), grads_for(model, s)))
        with torch.no_grad():
            for g in groups:
                for p in g["params"]:
                    st, grad = states[id(p)], gs[id(p)]
                    if g["matrix"]:
                        wd = g.get("weight_decay", hp["weight_decay"])
                        if name in ("muon", "d-muon"):
                            muon_ref(p, grad, st, hp["lr"], wd, 0.95, hp["adjust_lr"])
                        elif name == "normuon":
                            normuon_ref(p, grad, st, hp["lr"], wd, 0.95, 0.95, 1e-10, hp["adjust_lr"])
                        else:
                            sf_normuon_ref(p, grad, st, hp["lr"], wd, 0.9, 0.95, 0.8, 1e-10, hp["warmup_steps"])
                    else:
                        wd = g.get("weight_decay", hp["adamw_weight_decay"])
                        if name == "sf-normuon":
                            sf_adamw_ref(p, grad, st, hp["adamw_lr"], wd, (0.9, 0.9999), 1e-8, hp["warmup_steps"])
                        else:
                            adamw_ref(p, grad, st, hp["adamw_lr"], hp["adamw_betas"], 1e-8, wd)
    return states


CASES = {
    "muon": dict(lr=0.01, weight_decay=0.0, adjust_lr="original", adamw_lr=1e-3, adamw_betas=(0.8, 0.999),
                 adamw_weight_decay=0.1),
    "d-muon": dict(lr=1e-3, weight_decay=0.1, adjust_lr="match_rms_adamw", adamw_lr=1e-3, adamw_betas=(0.8, 0.999),
                   adamw_weight_decay=0.1),
    "normuon": dict(lr=1e-3, weight_decay=0.1, adjust_lr="paper", adamw_lr=1e-3, adamw_betas=(0.8, 0.999),
                    adamw_weight_decay=0.1),
    "normuon-official": dict(lr=0.01, weight_decay=0.1, adjust_lr="official", adamw_lr=1e-3,
                             adamw_betas=(0.8, 0.999), adamw_weight_decay=0.1),
    "sf-normuon": dict(lr=3e-3, weight_decay=0.05, warmup_steps=10, adamw_lr=3e-3, adamw_weight_decay=0.05),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_algorithm_box(case):
    name = case.replace("-official", "")
    hp = dict(CASES[case])
    model, ref_model = make_model(), make_model()
    opt = build(name, model, **{k: v for k, v in hp.items() if k != "adamw_betas" or name != "sf-normuon"})
    run(model, opt, STEPS)
    hp.setdefault("adamw_betas", None)
    states = _reference_run(name, ref_model, hp, STEPS)
    init = make_model().state_dict()
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert (q - init[n]).abs().max() > 0, n
        torch.testing.assert_close(p, q, atol=2e-3, rtol=2e-3, msg=lambda m: f"{case} {n}: {m}")
    if name == "sf-normuon":  # eval() gives x, train() gives y back
        opt.eval()
        for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, states[id(q)]["x"], atol=2e-3, rtol=2e-3, msg=lambda m: f"x {n}: {m}")
        with pytest.raises(RuntimeError, match="eval mode"):
            opt.step()
        opt.train()
        for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, atol=2e-3, rtol=2e-3)


def test_routing_and_errors():
    model = make_model()
    opt = create_optimizer("muon", model)
    table = {r["name"]: r for r in opt.routing_table()}
    assert table["q.weight"]["rule"] == "matrix" and table["conv.weight"]["rule"] == "matrix"
    assert table["emb.weight"]["rule"] == "adamw" and table["lm_head.weight"]["rule"] == "adamw"
    assert table["norm.weight"]["rule"] == "adamw" and table["up.bias"]["rule"] == "adamw"
    names = [g["name"] for g in opt.param_groups]
    assert "matrix" in names and "no_decay" in names
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["matrix"] == 0.01 and lrs["no_decay"] == 1e-3
    plain = create_optimizer("muon", list(model.parameters()))  # unflagged: split by ndim
    assert [g["name"] for g in plain.param_groups] == ["matrix", "adamw"]
    with pytest.raises(ValueError, match="norm.weight"):
        create_optimizer("muon", [{"params": [model.norm.weight], "param_names": ["norm.weight"], "matrix": True}])
    with pytest.raises(ValueError, match="ns_coefficients"):
        create_optimizer("muon", model, ns_coefficients="cubic")


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_and_bitwise_resume(name, tmp_path):
    hp = {"warmup_steps": 3} if name == "sf-normuon" else {}
    m_full = make_model()
    opt_full = create_optimizer(name, m_full, **hp)
    run(m_full, opt_full, 6)

    m_a = make_model()
    opt_a = create_optimizer(name, m_a, **hp)
    run(m_a, opt_a, 3)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": m_a.state_dict(), "optim": opt_a.state_dict()}, path)
    ck = torch.load(path, weights_only=True)
    m_b = make_model(seed=5)
    m_b.load_state_dict(ck["model"])
    opt_b = create_optimizer(name, m_b, **hp)
    opt_b.load_state_dict(ck["optim"])
    run(m_b, opt_b, 3, start=3)
    for (n, p), q in zip(m_full.named_parameters(), m_b.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("name", ["normuon", "sf-normuon"])
def test_dcp_state_dict_full(name):
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    m = make_model()
    opt = create_optimizer(name, m)
    run(m, opt, 2)
    sd = get_optimizer_state_dict(m, opt, options=StateDictOptions(full_state_dict=True))
    assert "q.weight" in sd["state"]
    m2 = make_model()
    m2.load_state_dict(m.state_dict())
    opt2 = create_optimizer(name, m2)
    sd = copy.deepcopy(sd)  # get_* returns the live state tensors; do not let both optimizers share them
    set_optimizer_state_dict(m2, opt2, sd)  # initialises state with an lr-0 step first
    run(m, opt, 2, start=2)
    run(m2, opt2, 2, start=2)
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p, q)
