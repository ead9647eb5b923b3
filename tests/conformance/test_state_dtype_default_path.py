"""Two more cells of the conformance matrix, each for the optimizers whose spec says they take part:

* **bf16 state** — every optimizer whose spec accepts ``state_dtype``: with ``state_dtype="bfloat16"`` its
  low-precision state is stored in bfloat16, and resume is exact bit for bit through ``torch.save`` /
  ``torch.load(weights_only=True)`` and through ``torch.distributed.checkpoint``'s full state dict (the
  stochastic rounding is a pure function of a seed saved in the state dict, so nothing else needs saving).
* **the default path** — every optimizer whose spec defaults to ``compiled="auto"``: built with no
  ``compiled`` argument and the suite's ``LIGHTNING_OPTIM_COMPILE=0`` pin removed, on a model with a tensor
  large enough for the compiled kernel (>= 65,536 elements), so what a user typing ``--optim.name X`` gets is
  what runs: the compiled kernel is taken and resume is exact. float64, so the kernels compiled here are the
  ones ``tests/test_optim_compiled.py`` compiles (one compile per kernel family for the whole run).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_optim as lo
from lightning_optim.optim import _elementwise
from lightning_optim.optim._elementwise import COMPILE_ENV, COMPILED_MIN_NUMEL

from ._helpers import build, diff_states, make_model, params_of, train_steps

K = 3


def _spec_default(name: str, key: str):
    return lo.optimizer_info(name).defaults.get(key, "<absent>")


def _state_dtypes(opt: torch.optim.Optimizer) -> set[torch.dtype]:
    return {v.dtype for st in opt.state.values() for k, v in st.items()
            if isinstance(v, torch.Tensor) and v.ndim > 0 and k != "step"}


def test_bf16_state_resume_exact(optim_name, tmp_path):
    if _spec_default(optim_name, "state_dtype") == "<absent>":
        pytest.skip(f"{optim_name}: no state_dtype option in its spec")

    def setup():
        model = make_model(seed=0)
        return model, build(optim_name, model, state_dtype="bfloat16")

    m1, o1 = setup()
    train_steps(m1, o1, None, 0, 2 * K)
    assert torch.bfloat16 in _state_dtypes(o1), f"{optim_name}: no bf16 state with state_dtype='bfloat16'"

    m2, o2 = setup()
    train_steps(m2, o2, None, 0, K)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": m2.state_dict(), "optimizer": o2.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    m3 = make_model(seed=5)
    m3.load_state_dict(ckpt["model"])
    o3 = build(optim_name, m3, state_dtype="bfloat16")
    o3.load_state_dict(ckpt["optimizer"])
    assert _state_dtypes(o3) == _state_dtypes(o2), f"{optim_name}: state dtypes changed by the round trip"
    train_steps(m3, o3, None, K, K)
    problems = diff_states(params_of(m1), params_of(m3)) + diff_states(o1.state_dict(), o3.state_dict())
    assert not problems, f"{optim_name} (bf16 state): resume is not exact:\n  " + "\n  ".join(problems[:10])


def test_bf16_state_dcp_full_state_dict(optim_name):
    if _spec_default(optim_name, "state_dtype") == "<absent>":
        pytest.skip(f"{optim_name}: no state_dtype option in its spec")
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    ref = make_model(seed=0)
    o_ref = build(optim_name, ref, state_dtype="bfloat16")
    train_steps(ref, o_ref, None, 0, 2 * K)
    m1 = make_model(seed=0)
    o1 = build(optim_name, m1, state_dtype="bfloat16")
    train_steps(m1, o1, None, 0, K)
    osd = get_optimizer_state_dict(m1, o1, options=options)
    m2 = make_model(seed=7)
    m2.load_state_dict(m1.state_dict())
    o2 = build(optim_name, m2, state_dtype="bfloat16")
    set_optimizer_state_dict(m2, o2, osd, options=options)
    assert _state_dtypes(o2) == _state_dtypes(o1)
    train_steps(m2, o2, None, K, K)
    problems = diff_states(params_of(ref), params_of(m2)) + diff_states(o_ref.state_dict(), o2.state_dict())
    assert not problems, f"{optim_name} (bf16 state, DCP full): " + "; ".join(problems[:10])


class Wide(nn.Module):
    """One weight above the compiled path's size threshold (256 × 257 > 65,536), a bias and a 2-D head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(256, 257)
        self.out = nn.Linear(257, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(x)))


def _wide_steps(model: nn.Module, opt: torch.optim.Optimizer, start: int, n: int) -> None:
    for step in range(start, start + n):
        g = torch.Generator().manual_seed(500 + step)
        x = torch.randn(16, 256, generator=g, dtype=torch.float64)
        y = torch.randn(16, 8, generator=g, dtype=torch.float64)
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        opt.step()


def test_default_path_compiles_and_resumes_exactly(optim_name, tmp_path, monkeypatch):
    if _spec_default(optim_name, "compiled") != "auto":
        pytest.skip(f"{optim_name}: no compiled path by default")
    monkeypatch.delenv(COMPILE_ENV, raising=False)
    if not _elementwise.compile_available("cpu")[0]:
        pytest.skip(f"no usable compiler here: {_elementwise.compile_available('cpu')[1]}")
    assert Wide().fc.weight.numel() >= COMPILED_MIN_NUMEL

    def setup(seed: int = 0):
        torch.manual_seed(seed)
        model = Wide().double()
        return model, build(optim_name, model)  # no `compiled` argument: the default

    m1, o1 = setup()
    assert o1.compiled == "auto" and o1.use_compiled(torch.device("cpu"))
    _elementwise._CALLED.clear()
    _wide_steps(m1, o1, 0, 2 * K)
    assert {k.__module__ for k in _elementwise._CALLED} == {type(o1).__module__}, \
        f"{optim_name}: the default path did not run its compiled kernel"

    m2, o2 = setup()
    _wide_steps(m2, o2, 0, K)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": m2.state_dict(), "optimizer": o2.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    m3, o3 = setup(seed=9)
    m3.load_state_dict(ckpt["model"])
    o3.load_state_dict(ckpt["optimizer"])
    _wide_steps(m3, o3, K, K)
    problems = diff_states(params_of(m1), params_of(m3)) + diff_states(o1.state_dict(), o3.state_dict())
    assert not problems, f"{optim_name} (default path): resume is not exact:\n  " + "\n  ".join(problems[:10])
