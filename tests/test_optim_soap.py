"""SOAP (``soap``): the algorithm box, the reference's conventions, state round trips, dtypes.

The plain rendition below follows nikhilvyas/SOAP literally, one tensor at a time: tensordot projections,
the first step only initialising, m rotated back and forth on every step, one eigh per factor at the start,
one power iteration + QR with re-sorting every ``precondition_frequency`` steps. It uses the same eigh/QR
routines per matrix as the optimizer's batched calls, so the bases agree exactly up to rounding (no sign or
ordering ambiguity) and the comparison is in float64 at 1e-9.
"""

from __future__ import annotations

import copy
import io
import math
import pytest
import torch

import lightning_optim as lo
from lightning_optim.optim.soap import SOAP, _merge_dims, soap_work_shape


@pytest.fixture(autouse=True)
def _one_thread():
    """LAPACK (eigh/QR) on 2 busy cores is far faster single-threaded; restore afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------------------
# plain single-tensor rendition of the algorithm box (the reference's structure)


class PlainSOAP:
    def __init__(self, p, lr, betas, shampoo_beta, eps, wd, freq, max_dim, merge=False, pre1d=False, normalize=False):
        self.p, self.lr, self.b1, self.b2 = p, lr, betas[0], betas[1]
        self.sb, self.eps, self.wd, self.freq, self.max_dim = shampoo_beta, eps, wd, freq, max_dim
        self.merge, self.pre1d, self.normalize = merge, pre1d, normalize
        self.step_n, self.Q = 0, None

    def _shape(self, g):
        return g.reshape(_merge_dims(tuple(g.shape), self.max_dim)) if (self.merge and g.dim() > 1) else g

    def _on(self, d, ndim):
        return (self.pre1d and d <= self.max_dim) if ndim == 1 else d <= self.max_dim

    def project(self, x, back=False):
        shape = x.shape
        x = self._shape(x)
        for q in self.Q:
            if q is not None:
                x = torch.tensordot(x, q, dims=[[0], [1 if back else 0]])
            else:
                x = x.permute(list(range(1, x.dim())) + [0])
        return x.reshape(shape)

    def update_precond(self, g):
        if self.Q is not None:
            self.m = self.project(self.m, back=True)
        g = self._shape(g)
        for i, d in enumerate(g.shape):
            if self.GG[i] is not None:
                # g_(i)·g_(i)ᵀ as one GEMM accumulated into GG (the optimizer's rounding): where GG is rank
                # deficient (a 1-D gradient's first factor is rank 1) its null-space eigenvectors are decided
                # by rounding noise, so the rendition must round the factor the same way to be comparable.
                a = g.movedim(i, 0).reshape(d, -1)
                self.GG[i] = torch.addmm(self.GG[i], a, a.T, beta=self.sb, alpha=1 - self.sb)
        if self.Q is None:
            self.Q = [None if m is None else torch.flip(torch.linalg.eigh(m + 1e-30 * torch.eye(len(m), dtype=m.dtype))[1], [1])
                      for m in self.GG]
        if self.step_n > 0 and self.step_n % self.freq == 0:
            v = self._shape(self.v)
            new = []
            for i, (m, o) in enumerate(zip(self.GG, self.Q)):
                if m is None:
                    new.append(None)
                    continue
                est = torch.diag(o.T @ m @ o)
                idx = torch.argsort(est, descending=True)
                v = v.index_select(i, idx)
                new.append(torch.linalg.qr(m @ o[:, idx])[0])
            self.v = v.reshape(self.v.shape)
            self.Q = new
        if self.step_n > 0:
            self.m = self.project(self.m)

    def step(self, g):
        p = self.p
        if self.Q is None:
            self.m, self.v = torch.zeros_like(p), torch.zeros_like(p)
            gs = self._shape(g)
            self.GG = [torch.zeros(d, d, dtype=g.dtype) if self._on(d, gs.dim()) else None for d in gs.shape]
            self.update_precond(g)
            return
        gp = self.project(g)
        self.step_n += 1
        self.m = self.b1 * self.m + (1 - self.b1) * gp
        self.v = self.b2 * self.v + (1 - self.b2) * gp * gp
        u = self.project(self.m / (self.v.sqrt() + self.eps), back=True)
        if self.normalize:
            u = u / (1e-30 + torch.mean(u**2) ** 0.5)
        t = self.step_n
        step_size = self.lr * math.sqrt(1 - self.b2**t) / (1 - self.b1**t)
        p -= step_size * u
        p -= self.lr * self.wd * p
        self.update_precond(g)


CASES = {
    "matrix": [(12, 7), (7, 12), (12, 7)],
    "mixed": [(9, 5), (6, 4, 3), (5,), (30, 4)],  # 3-D, a 1-D vector, a dim above max_precond_dim
}


@pytest.mark.parametrize("case,merge,pre1d,normalize", [
    ("matrix", False, False, False),
    ("mixed", False, True, False),
    ("mixed", True, False, True),
])
def test_matches_plain_rendition_50_steps(case, merge, pre1d, normalize):
    torch.manual_seed(0)
    shapes = CASES[case]
    hp = dict(lr=3e-2, betas=(0.9, 0.95), shampoo_beta=0.9, eps=1e-8, weight_decay=0.1,
              precondition_frequency=3, max_precond_dim=20)
    ps = [torch.randn(s, dtype=torch.float64) for s in shapes]
    ours = [p.clone().requires_grad_() for p in ps]
    opt = SOAP(ours, merge_dims=merge, precondition_1d=pre1d, normalize_grads=normalize, **hp)
    plain = [PlainSOAP(p.clone(), hp["lr"], hp["betas"], hp["shampoo_beta"], hp["eps"], hp["weight_decay"],
                       hp["precondition_frequency"], hp["max_precond_dim"], merge, pre1d, normalize) for p in ps]
    for _ in range(50):
        for o, r in zip(ours, plain):
            g = torch.randn(o.shape, dtype=torch.float64)
            o.grad = g.clone()
            r.step(g.clone())
        opt.step()
    for o, r in zip(ours, plain):
        torch.testing.assert_close(o.detach(), r.p, rtol=0, atol=1e-9)
        torch.testing.assert_close(opt.state[o]["exp_avg"], r.m, rtol=0, atol=1e-9)


def test_shampoo_beta_default_and_first_step_only_initialises():
    p = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    before = p.detach().clone()
    opt = lo.create_optimizer("soap", [p])
    assert opt.param_groups[0]["shampoo_beta"] is None  # → betas[1]
    p.grad = torch.randn_like(p)
    opt.step()
    assert torch.equal(p.detach(), before)
    st = opt.state[p]
    assert float(st["step"]) == 0 and set(st) == {"step", "exp_avg", "exp_avg_sq", "GG0", "GG1", "Q0", "Q1"}
    torch.testing.assert_close(st["GG0"], (1 - 0.999) * p.grad @ p.grad.T)
    p.grad = torch.randn_like(p)
    opt.step()
    assert not torch.equal(p.detach(), before) and float(st["step"]) == 1


def test_matches_pytorch_optimizer_soap():
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    torch.manual_seed(1)
    shapes = [(16, 8), (8,), (5, 3, 2)]
    ps = [torch.randn(s, dtype=torch.float64) for s in shapes]
    a = [p.clone().requires_grad_() for p in ps]
    b = [p.clone().requires_grad_() for p in ps]
    oa = SOAP(a, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, precondition_frequency=4)
    ob = pytorch_optimizer.SOAP(b, lr=1e-2, betas=(0.9, 0.99), shampoo_beta=0.99, weight_decay=0.1,
                                precondition_frequency=4)
    for _ in range(30):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, dtype=torch.float64)
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    for x, y in zip(a, b):  # pytorch-optimizer keeps its factors in float32: agreement to ~1e-7
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.GELU(), torch.nn.Linear(10, 4)).to(dtype)


def _train(model, opt, steps, start=0):
    for s in range(start, start + steps):
        g = torch.Generator().manual_seed(s)
        x = torch.randn(8, 6, generator=g).to(next(model.parameters()).dtype)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_state_dict_round_trip_and_bit_identical_resume():
    hp = dict(precondition_frequency=3)
    m1 = _model()
    o1 = lo.create_optimizer("soap", m1.parameters(), **hp)
    _train(m1, o1, 10)
    straight = _model()
    os_ = lo.create_optimizer("soap", straight.parameters(), **hp)
    _train(straight, os_, 20)

    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    m2 = _model()
    m2.load_state_dict(ckpt["model"])
    o2 = lo.create_optimizer("soap", m2.parameters(), **hp)
    o2.load_state_dict(ckpt["opt"])
    for t in o2.state_dict()["state"][0].values():
        assert isinstance(t, torch.Tensor)
    _train(m2, o2, 10, start=10)
    for a, b in zip(m2.parameters(), straight.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("full", [True, False])
def test_distributed_checkpoint_state_dict(full):
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict,
    )

    m = _model()
    o = lo.create_optimizer("soap", m.parameters(), precondition_frequency=2)
    _train(m, o, 5)
    opts = StateDictOptions(full_state_dict=full)
    sd = copy.deepcopy(get_optimizer_state_dict(m, o, options=opts))  # it returns the live tensors
    assert set(sd["state"]["0.weight"]) == {"step", "exp_avg", "exp_avg_sq", "GG0", "GG1", "Q0", "Q1"}
    m2 = _model()
    m2.load_state_dict(m.state_dict())
    o2 = lo.create_optimizer("soap", m2.parameters(), precondition_frequency=2)
    set_optimizer_state_dict(m2, o2, sd, options=opts)
    _train(m, o, 3, start=5)
    _train(m2, o2, 3, start=5)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_param_without_grad_untouched_and_bf16():
    m = _model(torch.bfloat16)
    frozen = m[0].bias
    before = frozen.detach().clone()
    o = lo.create_optimizer("soap", m.parameters(), precondition_frequency=2)
    w_before = m[2].weight.detach().clone()
    for s in range(5):
        x = torch.randn(8, 6, dtype=torch.bfloat16)
        m(x).square().mean().backward()
        frozen.grad = None
        o.step()
        o.zero_grad()
    assert torch.equal(frozen, before) and frozen not in o.state
    assert m[2].weight.dtype == torch.bfloat16 and not torch.equal(m[2].weight, w_before)
    assert torch.isfinite(m[2].weight.float()).all()
    assert o.state[m[2].weight]["exp_avg"].dtype == torch.float32


def test_work_shapes_and_memory_layout():
    assert soap_work_shape((8192, 512)) == ((8192, 512), (True, True))
    assert soap_work_shape((50304, 768)) == ((50304, 768), (False, True))
    assert soap_work_shape((64, 32, 3, 3), max_precond_dim=1000, merge_dims=True)[0] == (64, 288)
    assert soap_work_shape((512,)) == ((512,), (False,))
    spec = lo.optimizer_info("soap")
    assert spec.state.numel((512, 2048)) == 2 * 512 * 2048 + 2 * (512**2 + 2048**2)
    assert spec.state.names == ("exp_avg", "exp_avg_sq")


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="precondition_frequency"):
        lo.create_optimizer("soap", [torch.zeros(2, 2, requires_grad=True)], precondition_frequency=0)
    with pytest.raises(ValueError, match="max_precond_dim"):
        SOAP([torch.zeros(2, 2, requires_grad=True)], max_precond_dim=0)
