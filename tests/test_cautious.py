"""``cautious=True`` (Liang, Chen, Liu & Liu 2024, "Cautious Optimizers", arXiv 2411.16085) against the published
formula: each optimizer's uncautious update written plainly in float64, then the mask and rescale written plainly
here, ``u ⊙ φ / max(mean(φ), 1e-3)`` with ``φ = 1[u ⊙ g > 0]``, over 20+ steps whose gradients depend on the
weights (tests/_trajectory.py). Also: eager == compiled, the mask's global mean on DTensor shards (1-rank mesh, and
2-process FSDP2 against one process), refusal by the optimizers without the option, and a recipe run.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from lightning_optim import create_optimizer
from lightning_optim.optim import _elementwise
from lightning_optim.optim._cautious import cautious, cautious_tensor, mask_means
from lightning_optim.optim._elementwise import COMPILED_MIN_NUMEL
from lightning_optim.optim.newton_schulz import newton_schulz
from lightning_optim.optim.torch_builtin import ElementwiseAdam, adam, adamw
from lightning_optim.registry import available_optimizers, get_optimizer_spec
from tests._trajectory import gradient, max_diff, run_optimizer, run_reference

STEPS = 24

#: registry names that take ``cautious`` (adamw/adam: through their factories, see test_adamw_adam_factories)
TAKES = ("adamw", "adam", "lion", "signum", "adopt", "ademamix", "mars", "prodigy", "stable-adamw", "lamb", "muon",
         "d-muon", "normuon", "adamuon")
#: names with no published cautious form (or no cautious path here): the registry refuses the key
REFUSES = ("sf-adamw", "sf-normuon", "adafactor", "sgd", "soap", "sophia", "galore", "apollo", "apollo-mini", "scion",
           "adalayer", "adam-mini", "adamw8bit", "shampoo", "psgd-kron", "dion")


def caution(u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The published rule, plainly: mask where the update and the gradient disagree, rescale by the mask's mean."""
    phi = (u * g > 0).double()
    return u * phi / max(phi.mean().item(), 1e-3)


def weights() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(6, 5, generator=g, dtype=torch.float64) * 0.5,
            torch.randn(7, generator=g, dtype=torch.float64) * 0.5]


# -- plain float64 references: the uncautious update, then caution() ----------------------------------------------

def ref_lion(lr=1e-2, betas=(0.9, 0.99), wd=0.1, cautious=True):
    def update(i, x, g, st, t):
        m = st.setdefault("m", torch.zeros_like(x))
        u = torch.sign(betas[0] * m + (1 - betas[0]) * g)
        st["m"] = betas[1] * m + (1 - betas[1]) * g
        return x * (1 - lr * wd) - lr * (caution(u, g) if cautious else u)
    return update


def ref_signum(lr=1e-2, mu=0.95, wd=0.1):
    def update(i, x, g, st, t):
        buf = st["buf"] = mu * st.get("buf", torch.zeros_like(x)) + g
        return x * (1 - lr * wd) - lr * caution(torch.sign(g + mu * buf), g)
    return update


def ref_adopt(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, wd=0.1):
    def update(i, x, g, st, t):
        if t == 1:
            st["v"], st["m"] = g * g, torch.zeros_like(x)
            return x
        clip = (t - 1) ** 0.25
        n = (g / torch.clamp(st["v"].sqrt(), min=eps)).clamp(-clip, clip)
        st["m"] = st["m"] + (1 - betas[0]) * (n - st["m"])
        st["v"] = betas[1] * st["v"] + (1 - betas[1]) * g * g
        return x * (1 - lr * wd) - lr * caution(st["m"], g)
    return update


def ref_ademamix(lr=1e-2, betas=(0.9, 0.999), beta3=0.999, alpha=8.0, eps=1e-8, wd=0.1):
    def update(i, x, g, st, t):
        for k in ("m1", "m2", "v"):
            st.setdefault(k, torch.zeros_like(x))
        st["m1"] = betas[0] * st["m1"] + (1 - betas[0]) * g
        st["m2"] = beta3 * st["m2"] + (1 - beta3) * g
        st["v"] = betas[1] * st["v"] + (1 - betas[1]) * g * g
        num = st["m1"] / (1 - betas[0] ** t) + alpha * st["m2"]
        return x * (1 - lr * wd) - lr * caution(num, g) / ((st["v"] / (1 - betas[1] ** t)).sqrt() + eps)
    return update


def adamw_step(x, g, st, t, lr, betas, eps, wd, l2=0.0, c=None):
    """AdamW (decoupled ``wd``; ``l2``: Adam's L2) on gradient ``c`` (default ``g``); the mask is against ``g``."""
    g = g + l2 * x
    c = g if c is None else c
    m = st["m"] = betas[0] * st.get("m", torch.zeros_like(x)) + (1 - betas[0]) * c
    v = st["v"] = betas[1] * st.get("v", torch.zeros_like(x)) + (1 - betas[1]) * c * c
    return x * (1 - lr * wd) - lr * caution(m, g) / (1 - betas[0] ** t) / ((v / (1 - betas[1] ** t)).sqrt() + eps)


def ref_adamw(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, wd=0.1):
    return lambda i, x, g, st, t: adamw_step(x, g, st, t, lr, betas, eps, wd)


def ref_adam(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, wd=0.05):
    return lambda i, x, g, st, t: adamw_step(x, g, st, t, lr, betas, eps, 0.0, l2=wd)


def ref_mars(lr=1e-2, betas=(0.95, 0.99), gamma=0.025, eps=1e-8, wd=0.1, adamw_lr=1e-2, adamw_betas=(0.9, 0.999)):
    def update(i, x, g, st, t):
        if x.ndim < 2:
            return adamw_step(x, g, st, t, adamw_lr, adamw_betas, eps, wd)
        last = st.get("last", torch.zeros_like(x))
        c = g + gamma * betas[0] / (1 - betas[0]) * (g - last)
        c = c / max(torch.linalg.vector_norm(c).item(), 1.0)
        st["last"] = g.clone()
        return adamw_step(x, g, st, t, lr, betas, eps, wd, c=c)
    return update


def ref_stable_adamw(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, wd=0.1):
    def update(i, x, g, st, t):
        b1, b2 = (b * (1 - b ** (t - 1)) / (1 - b ** t) for b in betas)
        m = st["m"] = b1 * st.get("m", torch.zeros_like(x)) + (1 - b1) * g
        v = st["v"] = b2 * st.get("v", torch.zeros_like(x)) + (1 - b2) * g * g
        eta = lr / max(1.0, math.sqrt((g * g / v.clamp(min=eps * eps)).mean().item()))
        return x * (1 - eta * wd) - eta * caution(m / (v.sqrt() + eps), g)
    return update


def ref_lamb(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, wd=0.01):
    def update(i, x, g, st, t):
        m = st["m"] = betas[0] * st.get("m", torch.zeros_like(x)) + (1 - betas[0]) * g
        v = st["v"] = betas[1] * st.get("v", torch.zeros_like(x)) + (1 - betas[1]) * g * g
        r = caution((m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps), g) + wd * x
        w, rn = x.norm().item(), r.norm().item()
        return x - lr * (w / rn if w > 0 and rn > 0 else 1.0) * r
    return update


ELEMENTWISE = {
    "lion": (dict(lr=1e-2, weight_decay=0.1), ref_lion()),
    "signum": (dict(lr=1e-2, weight_decay=0.1), ref_signum()),
    "adopt": (dict(lr=1e-2, weight_decay=0.1), ref_adopt()),
    "ademamix": (dict(lr=1e-2, weight_decay=0.1), ref_ademamix()),
    "mars": (dict(lr=1e-2, adamw_lr=1e-2, weight_decay=0.1), ref_mars()),
    "stable-adamw": (dict(lr=1e-2, weight_decay=0.1), ref_stable_adamw()),
    "lamb": (dict(lr=1e-2, weight_decay=0.01), ref_lamb()),
}


def _mars_groups(ps):
    return [{"params": [ps[0]], "matrix": True}, {"params": [ps[1]], "matrix": False}]


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_elementwise_trajectory_matches_the_published_formula(name):
    hp, ref = ELEMENTWISE[name]
    groups = _mars_groups if name == "mars" else None
    got = run_optimizer(lambda ps: create_optimizer(name, ps, cautious=True, **hp), weights(), STEPS,
                        torch.float64, groups)
    want = run_reference(ref, weights(), STEPS)
    plain = run_optimizer(lambda ps: create_optimizer(name, ps, **hp), weights(), STEPS, torch.float64, groups)
    # LAMB and StableAdamW compute in float32 whatever the parameter's dtype (lightning_optim/optim/_per_tensor.py)
    tol = 1e-6 if name in ("lamb", "stable-adamw") else 1e-10
    assert max_diff(got, want) < tol, name
    assert max_diff(plain, want) > 1e-3, f"{name}: the mask changed nothing, the test cannot tell"


@pytest.mark.parametrize("factory, ref", [(adamw, ref_adamw()), (adam, ref_adam())], ids=["adamw", "adam"])
def test_adamw_adam_cautious_trajectory(factory, ref):
    hp = dict(lr=1e-2, weight_decay=0.1 if factory is adamw else 0.05)
    got = run_optimizer(lambda ps: factory([{"params": ps}], cautious=True, **hp), weights(), STEPS, torch.float64)
    assert max_diff(got, run_reference(ref, weights(), STEPS)) < 1e-10


def ref_prodigy(ws, steps, lr=1.0, betas=(0.9, 0.999), eps=1e-8, wd=0.1, d0=1e-6):
    """Prodigy (Mishchenko & Defazio 2023, prodigyopt's step), one group, growth_rate inf, d_coef 1; caution()
    on the applied first moment."""
    xs = [w.clone() for w in ws]
    p0 = [w.clone() for w in ws]
    s, m, v = ([torch.zeros_like(w) for w in ws] for _ in range(3))
    d, d_max, num = d0, d0, 0.0
    beta3 = math.sqrt(betas[1])
    for k in range(steps):
        gs = [gradient(x, k + 1, i) for i, x in enumerate(xs)]
        dlr = d * lr * math.sqrt(1 - betas[1] ** (k + 1)) / (1 - betas[0] ** (k + 1))
        num = beta3 * num + (d / d0) * dlr * sum(float((g * (q - x)).sum()) for g, q, x in zip(gs, p0, xs))
        s = [beta3 * si + (d / d0) * dlr * g for si, g in zip(s, gs)]
        den = sum(float(si.abs().sum()) for si in s)
        d_hat = num / den if den > 0 else d
        d_new = max(d, d_hat) if d == d0 else d
        d_max = max(d_max, d_hat)
        d_new = min(d_max, d_new * math.inf)
        m = [betas[0] * mi + d * (1 - betas[0]) * g for mi, g in zip(m, gs)]
        v = [betas[1] * vi + d * d * (1 - betas[1]) * g * g for vi, g in zip(v, gs)]
        xs = [x * (1 - wd * dlr) - dlr * caution(mi, g) / (vi.sqrt() + d_new * eps)
              for x, mi, vi, g in zip(xs, m, v, gs)]
        d = d_new
    return xs


@pytest.mark.parametrize("host", [True, False], ids=["host-scalars", "device-scalars"])
def test_prodigy_trajectory_matches_the_published_formula(host, monkeypatch):
    from lightning_optim.optim.prodigy import Prodigy

    monkeypatch.setattr(Prodigy, "_host_scalars", host)
    got = run_optimizer(lambda ps: create_optimizer("prodigy", ps, cautious=True), weights(), STEPS, torch.float64)
    plain = run_optimizer(lambda ps: create_optimizer("prodigy", ps), weights(), STEPS, torch.float64)
    want = ref_prodigy(weights(), STEPS)
    assert max_diff(got, want) < 1e-9
    assert max_diff(plain, want) > 1e-4


# -- the Muon family --------------------------------------------------------------------------------------------

def ref_muon_family(name, lr, wd, mu=0.95, beta2=0.95, eps=1e-10, adamw_lr=1e-2, cautious=True):
    """Muon (``adjust_lr="original"``) / NorMuon (``"paper"``): Nesterov EMA momentum, Newton–Schulz (the package's
    kernel: the orthogonalisation is not what is tested), then caution() on the final update against ``g``; the
    1-D tensor takes C-AdamW with betas (0.8, 0.999)."""
    def update(i, x, g, st, t):
        if x.ndim < 2:
            return adamw_step(x, g, st, t, adamw_lr, (0.8, 0.999), 1e-8, 0.1)
        buf = st["buf"] = mu * st.get("buf", torch.zeros_like(x)) + (1 - mu) * g
        o = newton_schulz((1 - mu) * g + mu * buf).double()
        if name == "muon":
            u = o * math.sqrt(max(1.0, x.shape[0] / x.shape[1]))
        else:
            v = st.get("v", torch.zeros(x.shape[0], 1, dtype=x.dtype))
            v = st["v"] = beta2 * v + (1 - beta2) * (o * o).mean(1, keepdim=True)
            oh = o / (v.sqrt() + eps)
            u = oh * 0.2 * math.sqrt(x.numel()) / oh.norm()
        return x * (1 - lr * wd) - lr * (caution(u, g) if cautious else u)
    return update


@pytest.mark.parametrize("name, hp", [("muon", dict(lr=0.02, weight_decay=0.1, adjust_lr="original")),
                                      ("normuon", dict(lr=0.02, weight_decay=0.1, adjust_lr="paper"))])
def test_muon_family_trajectory_matches_the_published_formula(name, hp):
    kw = dict(hp, adamw_lr=1e-2, adamw_betas=(0.8, 0.999), adamw_weight_decay=0.1)
    groups = lambda ps: [{"params": [ps[0]], "matrix": True}, {"params": [ps[1]], "matrix": False}]  # noqa: E731
    got = run_optimizer(lambda ps: create_optimizer(name, ps, cautious=True, **kw), weights(), STEPS, torch.float32,
                        groups)
    plain = run_optimizer(lambda ps: create_optimizer(name, ps, **kw), weights(), STEPS, torch.float32, groups)
    want = run_reference(ref_muon_family(name, hp["lr"], hp["weight_decay"]), weights(), STEPS)
    # Newton–Schulz runs in bf16 on both sides: agreement to ~1e-3 (as tests/test_optim_muon.py), while the
    # uncautious run is far away
    assert max_diff(got, want) < 3e-3
    assert max_diff(plain, want) > 3e-2
    assert max_diff(got[1:], want[1:]) < 1e-5  # the 1-D tensor: C-AdamW in float32, no bf16 kernel


def test_d_muon_takes_cautious_from_the_same_class():
    ps = [torch.nn.Parameter(w.float()) for w in weights()]
    opt = create_optimizer("d-muon", [{"params": [ps[0]], "matrix": True}, {"params": [ps[1]], "matrix": False}],
                           cautious=True)
    assert all(g["cautious"] is True for g in opt.param_groups)
    assert get_optimizer_spec("d-muon").defaults["cautious"] is False


# -- eager == compiled ------------------------------------------------------------------------------------------

def _big_params():
    g = torch.Generator().manual_seed(0)
    big = (256, COMPILED_MIN_NUMEL // 256 + 3)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64) * 0.1) for s in [big, (big[1],)]]


@pytest.mark.parametrize("make", [
    lambda ps, c: create_optimizer("lion", ps, cautious=True, compiled=c, lr=1e-2),
    lambda ps, c: ElementwiseAdam(ps, lr=1e-2, cautious=True, compiled=c),
], ids=["lion", "adamw"])
def test_compiled_cautious_equals_eager(make):
    eager_ps, compiled_ps = _big_params(), _big_params()
    eager, compiled = make(eager_ps, False), make(compiled_ps, True)
    for step in range(6):
        g = torch.Generator().manual_seed(100 + step)
        for a, b in zip(eager_ps, compiled_ps):
            grad = torch.randn(a.shape, generator=g, dtype=a.dtype) * 0.01 + 0.5 * a.detach()
            a.grad, b.grad = grad.clone(), grad.clone()
        eager.step()
        compiled.step()
    assert type(compiled).cautious_kernel in _elementwise._COMPILED, "the compiled cautious kernel was not taken"
    for a, b in zip(eager_ps, compiled_ps):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-14)
    assert not torch.equal(eager_ps[0], _big_params()[0])


KERNEL_MAKERS = {
    "lion": lambda ps, c: create_optimizer("lion", ps, cautious=True, compiled=c, lr=1e-2),
    "signum": lambda ps, c: create_optimizer("signum", ps, cautious=True, compiled=c, lr=1e-2),
    "adopt": lambda ps, c: create_optimizer("adopt", ps, cautious=True, compiled=c, lr=1e-2),
    "ademamix": lambda ps, c: create_optimizer("ademamix", ps, cautious=True, compiled=c, lr=1e-2),
    "mars": lambda ps, c: create_optimizer("mars", [{"params": [ps[0]], "matrix": True},
                                                    {"params": [ps[1]], "matrix": False}],
                                           cautious=True, compiled=c, lr=1e-2),
    "mars-adamw": lambda ps, c: create_optimizer("mars", [{"params": ps, "matrix": False}], cautious=True,
                                                 compiled=c, lr=1e-2),
    "prodigy": lambda ps, c: create_optimizer("prodigy", ps, cautious=True, compiled=c),
    "adamw": lambda ps, c: ElementwiseAdam(ps, lr=1e-2, cautious=True, compiled=c),
    "adam": lambda ps, c: ElementwiseAdam(ps, lr=1e-2, weight_decay=0.05, decoupled_weight_decay=False,
                                          cautious=True, compiled=c),
}


@pytest.mark.parametrize("name", sorted(KERNEL_MAKERS))
def test_every_cautious_kernel_equals_the_eager_path(name, monkeypatch):
    """Each optimizer's per-tensor cautious kernel (the function the compiled path compiles), run uncompiled, takes
    the steps of the eager foreach path; test_compiled_cautious_equals_eager compiles two of them."""
    called = []
    monkeypatch.setattr(_elementwise, "compiled_kernel", lambda fn: called.append(fn) or fn)
    monkeypatch.setattr(_elementwise, "COMPILED_MIN_NUMEL", 16)  # the 6x5 matrix takes the kernel, the 7-vector not
    eager_ps = [torch.nn.Parameter(w) for w in weights()]
    kernel_ps = [torch.nn.Parameter(w) for w in weights()]
    eager, kernel = KERNEL_MAKERS[name](eager_ps, False), KERNEL_MAKERS[name](kernel_ps, True)
    for step in range(8):
        g = torch.Generator().manual_seed(300 + step)
        for a, b in zip(eager_ps, kernel_ps):
            grad = torch.randn(a.shape, generator=g, dtype=a.dtype) * 0.01 + 0.5 * a.detach()
            a.grad, b.grad = grad.clone(), grad.clone()
        eager.step()
        kernel.step()
    assert any("cautious" in fn.__name__ for fn in called), f"{name}: no cautious kernel ran ({called})"
    for a, b in zip(eager_ps, kernel_ps):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-14)
    assert not torch.equal(eager_ps[0], weights()[0])


def test_cautious_tensor_is_the_list_rule():
    g = torch.Generator().manual_seed(1)
    u, grad = torch.randn(40, 30, generator=g), torch.randn(40, 30, generator=g)
    torch.testing.assert_close(cautious_tensor(u, grad), cautious([u], [grad])[0])
    torch.testing.assert_close(cautious([u], [grad])[0].double(), caution(u.double(), grad.double()))
    # no entry agrees: the floor makes the update 0, not a division by 0
    assert torch.equal(cautious([u], [-u])[0], torch.zeros_like(u))
    assert torch.equal(cautious_tensor(u, -u), torch.zeros_like(u))


# -- DTensor shards: the mean is over the whole tensor --------------------------------------------------------------

def test_mask_mean_over_the_whole_dtensor(one_rank_mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    g = torch.Generator().manual_seed(2)
    u, grad = torch.randn(9, 4, generator=g), torch.randn(9, 4, generator=g)
    p = distribute_tensor(torch.zeros(9, 4), one_rank_mesh, [Shard(0)])
    masks = [(u * grad) > 0]
    (mean,) = mask_means(masks, [p])
    assert mean.item() == masks[0].double().mean().item()
    ws = weights()

    def dtensor_params(ps):
        return [torch.nn.Parameter(distribute_tensor(q.detach(), one_rank_mesh, [Shard(0)])) for q in ps]

    # a whole optimizer on DTensor parameters takes the same steps as on plain tensors
    for name in ("lion", "prodigy", "stable-adamw"):
        plain = [torch.nn.Parameter(w.clone()) for w in ws]
        sharded = dtensor_params([w.clone() for w in ws])
        opts = [create_optimizer(name, ps, cautious=True) for ps in (plain, sharded)]
        for t in range(1, 6):
            for i, (a, b) in enumerate(zip(plain, sharded)):
                a.grad = gradient(a.detach(), t, i)
                b.grad = distribute_tensor(a.grad.clone(), one_rank_mesh, [Shard(0)])
            for o in opts:
                o.step()
        for a, b in zip(plain, sharded):
            torch.testing.assert_close(b.full_tensor(), a.detach(), rtol=1e-12, atol=1e-14, msg=name)


def test_fsdp2_two_processes_equal_one(tmp_path):
    from tests.dist_utils import run_distributed

    script = __import__("pathlib").Path(__file__).parent / "dist_scripts" / "cautious_fsdp2.py"
    out = tmp_path / "result.json"
    run_distributed(script, str(out), out_dir=tmp_path, timeout=300)
    result = json.loads(out.read_text())
    assert set(result) == {"lion", "adamw", "muon", "lamb"}
    for name, r in result.items():
        assert r["moved"] > 1e-3, name
        # muon: bf16 Newton–Schulz on gathered vs local matrices; lamb: float32 arithmetic (_per_tensor.py)
        tol = {"muon": 2e-3, "lamb": 1e-6}.get(name, 1e-10)
        assert r["max_diff"] < tol, (name, r)
        # the per-shard mean would rescale each shard differently: far from the one-process run
        assert r["per_shard_diff"] > 10 * tol, (name, r)


# -- who takes the option, who refuses it ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", TAKES)
def test_registry_takes_cautious_default_false(name):
    assert get_optimizer_spec(name).defaults["cautious"] is False


@pytest.mark.parametrize("name", [n for n in available_optimizers()
                                  if "cautious" not in get_optimizer_spec(n).defaults])
def test_optimizers_without_the_option_refuse_it_naming_optimizer_and_key(name):
    with pytest.raises(ValueError) as err:
        create_optimizer(name, [torch.nn.Parameter(torch.zeros(4, 4))], cautious=True)
    assert "'cautious'" in str(err.value) and repr(name) in str(err.value)


def test_refusing_set_is_what_we_say():
    missing = [n for n in REFUSES if "cautious" in get_optimizer_spec(n).defaults]
    assert missing == [], f"{missing} now take cautious: update REFUSES and the README list"


@pytest.mark.parametrize("bad", ["true", 1, None])
def test_cautious_must_be_a_bool(bad):
    with pytest.raises(ValueError, match="cautious"):
        create_optimizer("lion", [torch.nn.Parameter(torch.zeros(3))], cautious=bad)


def test_adamw_adam_factories():
    ps = [torch.nn.Parameter(torch.zeros(3))]
    assert type(adamw([{"params": ps}])) is torch.optim.AdamW
    assert type(adam([{"params": ps}])) is torch.optim.Adam
    opt = adamw([{"params": ps}], cautious=True, lr=1e-3, amsgrad=False, maximize=False, foreach=None)
    assert isinstance(opt, ElementwiseAdam) and opt.param_groups[0]["decoupled_weight_decay"] is True
    assert adam([{"params": ps}], cautious=True).param_groups[0]["decoupled_weight_decay"] is False
    with pytest.raises(ValueError, match="amsgrad"):
        adamw([{"params": ps}], cautious=True, amsgrad=True)
    with pytest.raises(ValueError, match="fused"):
        adamw([{"params": ps}], cautious=True, fused=True)


@pytest.mark.parametrize("decoupled", [True, False])
def test_elementwise_adam_without_caution_follows_torch(decoupled):
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    hp = dict(lr=1e-2, weight_decay=0.1)
    ours = run_optimizer(lambda ps: ElementwiseAdam(ps, decoupled_weight_decay=decoupled, **hp), weights(), STEPS,
                         torch.float64)
    theirs = run_optimizer(lambda ps: cls(ps, foreach=False, **hp), weights(), STEPS, torch.float64)
    assert max_diff(ours, theirs) < 1e-12


# -- a recipe run ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lion", "adamw"])
def test_recipe_runs_cautious(name, cache, in_tmp):
    from tests.recipe_runner import RECIPES, cheap_cell, run_recipe

    if "cautious" not in get_optimizer_spec(name).defaults:
        pytest.skip(f"the registry does not list 'cautious' for {name!r} yet (lightning_optim/builtins.py)")
    cli = run_recipe(RECIPES / "tiny.py", ["--optim.name", name, "--optim.extra.cautious", "true", *cheap_cell(cache)])
    opt = cli.trainer.optimizers[0]
    assert cli.trainer.global_step == 2
    assert all(g["cautious"] is True for g in opt.param_groups)


# -- resume and low precision ---------------------------------------------------------------------------------------

RESUMABLE = {
    "lion": lambda ps: create_optimizer("lion", ps, cautious=True, lr=1e-2),
    "adamw": lambda ps: adamw([{"params": ps}], cautious=True, lr=1e-2),
    "muon": lambda ps: create_optimizer("muon", [{"params": [ps[0]], "matrix": True},
                                                 {"params": [ps[1]], "matrix": False}], cautious=True),
}


@pytest.mark.parametrize("name", sorted(RESUMABLE))
def test_resume_is_bitwise(name, tmp_path):
    """The mask is a function of the state and the gradient: 2k steps == k steps, save, load, k steps."""
    make = RESUMABLE[name]

    def steps(ps, opt, first, last):
        for t in range(first, last + 1):
            for i, p in enumerate(ps):
                p.grad = gradient(p.detach(), t, i).float()
            opt.step()

    straight = [torch.nn.Parameter(w.float()) for w in weights()]
    steps(straight, make(straight), 1, 10)
    first = [torch.nn.Parameter(w.float()) for w in weights()]
    opt = make(first)
    steps(first, opt, 1, 5)
    torch.save({"w": [p.detach() for p in first], "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = [torch.nn.Parameter(w.clone()) for w in ck["w"]]
    opt2 = make(resumed)
    opt2.load_state_dict(ck["opt"])
    assert all(g["cautious"] is True for g in opt2.param_groups)
    steps(resumed, opt2, 6, 10)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name, hp", [("lion", {"state_dtype": "bfloat16"}), ("adopt", {"state_dtype": "bfloat16"}),
                                      ("muon", {}), ("lamb", {})])
def test_bf16_parameters_train(name, hp):
    ps = [torch.nn.Parameter(w.bfloat16()) for w in weights()]
    opt = create_optimizer(name, [{"params": [ps[0]], "matrix": True}, {"params": [ps[1]], "matrix": False}]
                           if name == "muon" else ps, cautious=True, lr=1e-2, **hp)
    for t in range(1, 9):
        for i, p in enumerate(ps):
            p.grad = gradient(p.detach(), t, i).bfloat16()
        opt.step()
    for p, w in zip(ps, weights()):
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
        assert (p.double() - w.bfloat16().double()).abs().max() > 5e-3
