"""The compiled path (``compiled=True``; what ``"auto"``, the default, picks where a compiler works) of the
elementwise optimizers computes what the eager foreach path does; ``"auto"`` falls back with one warning.

Each optimizer is compiled once here (about 10 s per kernel on CPU), in float64 so the two paths can be held
to 1e-10: the large matrix goes through the ``torch.compile``'d kernel, the small tensors through the eager
foreach ops (they are below ``COMPILED_MIN_NUMEL``), both in the same step.
"""

from __future__ import annotations

import pytest
import torch

from lightning_optim import create_optimizer
from lightning_optim.optim import _elementwise
from lightning_optim.optim._elementwise import COMPILED_MIN_NUMEL

COMPILABLE = {
    "lion": {},
    "signum": {},
    "adopt": {},
    "ademamix": {"alpha_warmup": 8, "beta3_warmup": 8},
    "sf-adamw": {"warmup_steps": 4},
    "prodigy": {},
    "mars": {},
}


def _params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    big = (256, COMPILED_MIN_NUMEL // 256 + 3)  # one compiled tensor (2-D, so one compile per kernel)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64) * 0.1)
            for s in [big, (big[1],), (32, 48)]]


@pytest.mark.parametrize("name", sorted(COMPILABLE))
def test_compiled_equals_eager_over_20_steps(name: str) -> None:
    eager_ps, compiled_ps = _params(), _params()
    eager = create_optimizer(name, eager_ps, compiled=False, **COMPILABLE[name])
    compiled = create_optimizer(name, compiled_ps, compiled=True, **COMPILABLE[name])
    assert compiled.compiled is True and eager.compiled is False
    for step in range(20):
        g = torch.Generator().manual_seed(100 + step)
        for a, b in zip(eager_ps, compiled_ps):
            grad = torch.randn(a.shape, generator=g, dtype=a.dtype) * 0.01
            a.grad, b.grad = grad.clone(), grad.clone()
        if step == 7:  # a parameter without a gradient is left untouched on both paths
            eager_ps[0].grad = compiled_ps[0].grad = None
        eager.step()
        compiled.step()
    kernels = [k for k in _elementwise._COMPILED if k.__module__ == type(compiled).__module__]
    assert kernels, f"{name}: the compiled path was not taken"
    assert not torch.equal(compiled_ps[0], _params()[0]), f"{name}: the compiled tensor did not move"
    for a, b in zip(eager_ps, compiled_ps):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-14)
    sa, sb = eager.state_dict(), compiled.state_dict()
    for i, st in sa["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(sb["state"][i][key], value, rtol=1e-10, atol=1e-14)


def test_compiled_flag_is_validated() -> None:
    with pytest.raises(ValueError, match="compiled"):
        create_optimizer("lion", _params(), compiled="yes")


def test_mars_adamw_part_compiled_equals_eager() -> None:
    """MARS's non-matrix groups take a plain AdamW step: its kernel too (a large tensor routed as "other")."""
    eager_ps, compiled_ps = _params(), _params()
    eager = create_optimizer("mars", [{"params": eager_ps, "matrix": False}], compiled=False)
    compiled = create_optimizer("mars", [{"params": compiled_ps, "matrix": False}], compiled=True)
    for step in range(10):
        g = torch.Generator().manual_seed(200 + step)
        for a, b in zip(eager_ps, compiled_ps):
            grad = torch.randn(a.shape, generator=g, dtype=a.dtype) * 0.01
            a.grad, b.grad = grad.clone(), grad.clone()
        eager.step()
        compiled.step()
    assert "last_grad" not in compiled.state[compiled_ps[0]]
    for a, b in zip(eager_ps, compiled_ps):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-14)


def test_one_compile_serves_every_shape_and_rank() -> None:
    """Square and non-square matrices, a (1, n) row and a vector share one compiled graph (no recompiles)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    _elementwise._COMPILED.clear()
    counters.clear()
    g = torch.Generator().manual_seed(0)
    shapes = [(256, 256), (300, 400), (1, 70000), (70000,), (2, 40000)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]
    opt = create_optimizer("lion", ps, compiled=True)
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert all(opt.state[p]["exp_avg"].abs().sum() > 0 for p in ps)


def test_auto_is_the_default_and_honours_the_environment(monkeypatch) -> None:
    ps = _params()
    for name in sorted(COMPILABLE):
        assert create_optimizer(name, ps, **COMPILABLE[name]).compiled == "auto", name
    opt = create_optimizer("lion", ps)
    monkeypatch.setenv(_elementwise.COMPILE_ENV, "0")
    assert not opt.use_compiled(torch.device("cpu"))
    monkeypatch.delenv(_elementwise.COMPILE_ENV)
    assert opt.use_compiled(torch.device("cpu")) == _elementwise.compile_available("cpu")[0]
    assert not create_optimizer("lion", ps, compiled=False).use_compiled(torch.device("cpu"))


def test_auto_without_a_compiler_warns_once_and_runs_eager(monkeypatch) -> None:
    """No C++ compiler: one warning for the process, then the eager path (same numbers as compiled=False)."""
    import warnings

    monkeypatch.delenv(_elementwise.COMPILE_ENV, raising=False)
    monkeypatch.setattr(_elementwise, "_COMPILE_OK", {})
    monkeypatch.setattr(_elementwise.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    auto_ps, eager_ps = _params(), _params()
    auto = create_optimizer("adopt", auto_ps)
    eager = create_optimizer("adopt", eager_ps, compiled=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            for a, b in zip(auto_ps, eager_ps):
                a.grad = b.grad = torch.full_like(a, 0.01 * (step + 1))
            auto.step()
            eager.step()
    notes = [w for w in caught if "compiled='auto'" in str(w.message)]
    assert len(notes) == 1 and "C++ compiler" in str(notes[0].message), [str(w.message) for w in caught]
    for a, b in zip(auto_ps, eager_ps):
        assert torch.equal(a, b)


def test_auto_falls_back_when_the_compile_fails(monkeypatch) -> None:
    """A compile that fails at run time (a broken toolchain): the step still happens, with the same formula
    uncompiled, one warning, and the eager path afterwards."""
    import warnings

    def broken(fn):
        def run(*args):
            raise RuntimeError("C++ compile error: cannot find -lgomp")
        return run

    monkeypatch.delenv(_elementwise.COMPILE_ENV, raising=False)
    monkeypatch.setattr(_elementwise, "_COMPILE_OK", {"cpu": (True, "")})
    monkeypatch.setattr(_elementwise, "compiled_kernel", broken)
    auto_ps, eager_ps = _params(), _params()
    auto = create_optimizer("lion", auto_ps)
    eager = create_optimizer("lion", eager_ps, compiled=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(2):
            for a, b in zip(auto_ps, eager_ps):
                a.grad = b.grad = torch.full_like(a, 0.01 * (step + 1))
            auto.step()
            eager.step()
    notes = [w for w in caught if "cannot find -lgomp" in str(w.message)]
    assert len(notes) == 1
    assert not auto.use_compiled(torch.device("cpu"))
    for a, b in zip(auto_ps, eager_ps):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    with pytest.raises(RuntimeError, match="lgomp"):  # compiled=True asked for it: the error propagates
        explicit = create_optimizer("lion", auto_ps, compiled=True)
        explicit.step()


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(COMPILABLE))
def test_compiled_equals_eager_on_cuda(name: str) -> None:
    """The same check on CUDA: the kernels through Triton against the eager foreach path, float64."""
    eager_ps = [torch.nn.Parameter(p.detach().cuda()) for p in _params()]
    compiled_ps = [torch.nn.Parameter(p.detach().cuda()) for p in _params()]
    eager = create_optimizer(name, eager_ps, compiled=False, **COMPILABLE[name])
    compiled = create_optimizer(name, compiled_ps, compiled=True, **COMPILABLE[name])
    for opt in (eager, compiled):
        if callable(getattr(opt, "train", None)):
            opt.train()
    for step in range(10):
        g = torch.Generator().manual_seed(100 + step)
        for a, b in zip(eager_ps, compiled_ps):
            grad = (torch.randn(a.shape, generator=g, dtype=a.dtype) * 0.01).cuda()
            a.grad, b.grad = grad.clone(), grad.clone()
        eager.step()
        compiled.step()
    for a, b in zip(eager_ps, compiled_ps):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-14)
