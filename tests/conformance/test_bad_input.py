"""Guarantee 5 — bad input is handled correctly or refused at construction, naming the parameter.

Refusals: an empty parameter list and a group without ``params`` raise ``ValueError`` from
``create_optimizer``. Odd parameters — frozen (``requires_grad=False``), never receiving a gradient, 0-d,
3-D, 4-D — must either be refused when the optimizer is built, with a message naming the parameter (its
name, or its group and index, or its shape), or train correctly: the parameter that gets gradients moves and
stays finite, the frozen one and the one without gradients do not move, and nothing fails inside ``step()``.
Each case is tried both through a module (the default grouping; hybrids route by shape) and as a plain list
of parameters where that makes sense.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import lightning_optim as lo

from ._helpers import build, nonfinite_entries


def test_empty_parameter_list(optim_name):
    with pytest.raises(ValueError, match="empty parameter list"):
        lo.create_optimizer(optim_name, [])
    frozen = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="empty parameter list"):
        lo.create_optimizer(optim_name, frozen)


def test_group_without_params(optim_name):
    w = nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"parameter group 1 has no 'params'"):
        lo.create_optimizer(optim_name, [{"params": [w]}, {"lr": 1e-3}])


class Odd(nn.Module):
    """A small model carrying one odd parameter ``odd`` next to an ordinary Linear layer."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)
        self.kind = kind
        if kind == "0d":
            self.odd = nn.Parameter(torch.tensor(0.5))
        elif kind == "3d":
            self.odd = nn.Parameter(torch.randn(3, 4, 4) * 0.3)  # e.g. stacked expert weights
        elif kind == "4d":
            self.odd = nn.Parameter(torch.randn(4, 2, 3, 3) * 0.3)  # a conv kernel (out, in, kh, kw)
        elif kind in ("frozen", "no_grad"):
            self.odd = nn.Parameter(torch.randn(4, 4) * 0.3, requires_grad=kind != "frozen")
        else:
            raise ValueError(kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 4)
        h = self.lin(x)
        if self.kind == "0d":
            h = h * self.odd
        elif self.kind == "3d":
            h = torch.einsum("bi,eij->bj", h, self.odd)
        elif self.kind == "4d":
            img = h.reshape(-1, 2, 2, 1).expand(-1, 2, 2, 2)
            h = nn.functional.conv2d(img, self.odd, padding=1).mean(dim=(2, 3))
        elif self.kind == "frozen":
            h = h @ self.odd
        # "no_grad": self.odd is never used, so it never receives a gradient
        return h


KINDS = ["frozen", "no_grad", "0d", "3d", "4d"]


def _names_the_parameter(err: BaseException, name: str, shape: tuple[int, ...]) -> bool:
    msg = str(err)
    shape_texts = {str(shape), str(list(shape)), "x".join(map(str, shape)), "×".join(map(str, shape)),
                   str(torch.Size(shape))}
    return (
        re.search(rf"\b{re.escape(name)}\b", msg) is not None
        or any(s in msg for s in shape_texts)
        or re.search(r"group \d+.*(item|param|index|\[)\s*\d+", msg) is not None
    )


def _run(model: Odd, opt: torch.optim.Optimizer, steps: int = 4) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        x = torch.randn(5, 4, generator=g)
        model(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("how", ["module", "list"])
@pytest.mark.parametrize("kind", KINDS)
def test_odd_parameter(optim_name, kind, how):
    model = Odd(kind)
    before = model.odd.detach().clone()
    lin_before = model.lin.weight.detach().clone()
    target = model if how == "module" else list(model.parameters())
    try:
        opt = build(optim_name, target)
    except (ValueError, TypeError, NotImplementedError) as err:  # refused at construction: must say which one
        assert _names_the_parameter(err, "odd", tuple(before.shape)), (
            f"{optim_name}: refused a {kind} parameter ({how}) without naming it: {err}"
        )
        return
    try:
        _run(model, opt)
    except Exception as err:  # accepted at construction, then failed inside step(): the worst outcome
        pytest.fail(f"{optim_name}: accepted a {kind} parameter ({how}) but step() failed: "
                    f"{type(err).__name__}: {err}")
    after = model.odd.detach()
    bad = nonfinite_entries({"odd": after, "lin": model.lin.weight}) + nonfinite_entries(opt.state_dict())
    assert not bad, f"{optim_name}: non-finite values with a {kind} parameter ({how}): {bad}"
    assert not torch.equal(model.lin.weight, lin_before), f"{optim_name}: the ordinary layer did not train ({kind})"
    if kind in ("frozen", "no_grad"):
        assert torch.equal(after, before), f"{optim_name}: a {kind} parameter moved ({how})"
    else:
        assert not torch.equal(after, before), f"{optim_name}: the {kind} parameter never moved ({how})"
        assert after.shape == before.shape

