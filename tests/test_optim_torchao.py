"""torchao's low-bit AdamW entries: refused with the extra's name without torchao; with it, quantised state
for large tensors, plain state for small ones, and training close to AdamW."""

from __future__ import annotations

import sys

import pytest
import torch

import lightning_optim as lo
from lightning_optim.optim.torchao_lowbit import TORCHAO_OPTIMIZERS, quantized_if


@pytest.mark.parametrize("name", sorted(TORCHAO_OPTIMIZERS))
def test_without_torchao_the_error_names_the_extra(name: str, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao → ImportError
    monkeypatch.setitem(sys.modules, "torchao.optim", None)
    with pytest.raises(ImportError, match=r"lightning-optim\[torchao\]"):
        lo.create_optimizer(name, torch.nn.Linear(4, 4))


def test_quantised_only_when_torchao_would() -> None:
    rule = quantized_if(256)
    assert rule((64, 64)) and rule((4096,))
    assert not rule((63, 64)) and not rule((4000,)) and not rule((2048,))


@pytest.mark.parametrize("name", sorted(TORCHAO_OPTIMIZERS))
def test_trains_with_quantised_state(name: str) -> None:
    pytest.importorskip("torchao.optim")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 4))
    x, y = torch.randn(256, 64), torch.randn(256, 4)
    opt = lo.create_optimizer(name, model, lr=3e-3)
    first = None
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first
    big = opt.state[model[0].weight]["exp_avg"]  # 8192 elements: quantised
    small = opt.state[model[0].bias]["exp_avg"]  # 128: plain
    assert type(big) is not torch.Tensor and type(small) is torch.Tensor
