"""``state_dtype="bfloat16"``: stochastic rounding is unbiased, training matches float32 state, checkpoints
keep the dtype, and bad values are refused naming the option."""

from __future__ import annotations

import io
import time

import pytest
import torch
import torch.nn.functional as F

import lightning_optim as lo
from lightning_optim.optim import _elementwise
from lightning_optim.optim._elementwise import COMPILE_ENV, COMPILED_MIN_NUMEL
from lightning_optim.optim._low_precision import check_state_dtype, sr_bf16, sr_copy_

LOWP = ["lion", "signum", "adopt", "ademamix", "mars", "prodigy", "sf-adamw", "muon", "d-muon", "normuon"]


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and above ``x`` in magnitude (truncation and truncation + 1 ulp)."""
    lo_bits = x.view(torch.int32) & -65536
    lo_ = lo_bits.view(torch.float32)
    hi = (lo_bits + 65536).view(torch.float32)
    return lo_, hi


def test_sr_rounds_to_a_neighbour_and_is_unbiased() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, generator=g) * torch.logspace(-6, 6, 2000)
    lo_, hi = _neighbours(x)
    draws = torch.stack([sr_bf16(x, seed).float() for seed in range(400)])
    assert ((draws == lo_) | (draws == hi)).all(), "SR must return one of the two bf16 neighbours"
    # mean of 400 roundings vs the value, in units of the gap between the neighbours: the standard error of
    # the mean is at most 0.5/sqrt(400) = 0.025 gaps; round-to-nearest would be off by up to 0.5 gaps
    err = ((draws.mean(0) - x) / (hi - lo_)).abs()
    assert err.max() < 0.15 and err.mean() < 0.03, (err.max().item(), err.mean().item())
    nearest = ((x.to(torch.bfloat16).float() - x) / (hi - lo_)).abs()
    assert nearest.mean() > 0.2  # the check above would catch round-to-nearest


def test_sr_mean_over_one_tensor_and_specials() -> None:
    value = 1.0 + 2 ** -10  # a quarter of the way between the bf16 values 1 and 1 + 2^-7... (1/8 of a gap)
    x = torch.full((200_000,), value)
    r = sr_bf16(x, 7).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2 ** -7}
    assert abs(r.mean().item() - value) < 3e-5  # SE ≈ 2^-7·sqrt(p(1-p)/n) ≈ 6e-6
    assert abs(sr_bf16(-x, 7).float().mean().item() + value) < 3e-5  # negative values: same, mirrored
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1.5])
    out = sr_bf16(special, 3).float()
    assert out[0] == float("inf") and out[1] == float("-inf") and out[2].isnan()
    assert out[3] == 0 and out[4] == 0 and out[5] == 1.5  # representable values are kept exactly


def test_sr_copy_slices_agree_with_one_pass(monkeypatch) -> None:
    from lightning_optim.optim import _low_precision

    monkeypatch.setattr(_low_precision, "_SR_SLICE", 1000)
    x = torch.randn(3005)
    a = torch.empty_like(x, dtype=torch.bfloat16)
    sr_copy_(a, x, 11)
    assert torch.equal(a, sr_bf16(x, 11)), "slicing must not change the rounding"


def test_bad_state_dtype_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="state_dtype"):
        lo.create_optimizer("lion", [torch.nn.Parameter(torch.zeros(3))], state_dtype="int8")
    with pytest.raises(ValueError, match="state_dtype"):
        lo.create_optimizer("muon", torch.nn.Linear(4, 4), state_dtype="float16")
    with pytest.raises(ValueError, match=r"param_groups\[0\]\.state_dtype"):
        lo.optim.lion.Lion([{"params": [torch.nn.Parameter(torch.zeros(3))], "state_dtype": "fp8"}])
    assert check_state_dtype("BF16") == check_state_dtype(torch.bfloat16) == "bfloat16"


class _TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(32, 24)
        self.fc1 = torch.nn.Linear(24, 48)
        self.fc2 = torch.nn.Linear(48, 24)
        self.head = torch.nn.Linear(24, 32)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        return self.head(x + self.fc2(F.gelu(self.fc1(x))))


def _train(name: str, state_dtype: str | None, steps: int = 200) -> float:
    torch.manual_seed(0)
    model = _TinyLM()
    hp = {"ademamix": {"alpha_warmup": steps, "beta3_warmup": steps}, "sf-adamw": {"warmup_steps": 20}}.get(name, {})
    opt = lo.create_optimizer(name, model, state_dtype=state_dtype, **hp)
    if callable(getattr(opt, "train", None)):
        opt.train()
    g = torch.Generator().manual_seed(1)
    # a learnable task with a loss floor (~1.6 nats): the target is (token * 5 + 3) mod 32 with probability
    # 0.7, else a uniform random token, so the loss cannot collapse to 0 and 1% is a meaningful tolerance
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, 32, (16, 12), generator=g)
        noise = torch.randint(0, 32, idx.shape, generator=g)
        keep = torch.rand(idx.shape, generator=g) < 0.7
        target = torch.where(keep, (idx * 5 + 3) % 32, noise)
        loss = F.cross_entropy(model(idx).flatten(0, 1), target.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-20:]) / 20  # mean of the last 20 steps: one step's loss is batch noise


@pytest.mark.parametrize("name", LOWP)
def test_bf16_state_trains_like_float32_state(name: str) -> None:
    torch.set_num_threads(1)
    ref, low = _train(name, None), _train(name, "bfloat16")
    assert ref < 2.6, f"{name}: the task was not learned ({ref:.3f}; ln 32 = 3.47, floor ~1.6)"
    assert abs(low - ref) <= 0.01 * ref, f"{name}: bf16 state loss {low:.4f} vs float32 {ref:.4f}"


@pytest.mark.parametrize("name", ["adopt", "muon"])
def test_bf16_state_round_trip_weights_only(name: str) -> None:
    torch.manual_seed(0)
    model = _TinyLM()
    opt = lo.create_optimizer(name, model, state_dtype="bf16")
    for _ in range(3):
        opt.zero_grad()
        model(torch.randint(0, 32, (4, 6))).square().mean().backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    opt2 = lo.create_optimizer(name, model, state_dtype="bf16")
    opt2.load_state_dict(sd)
    before = {(i, k): v for i, st in enumerate(opt.state.values()) for k, v in st.items() if torch.is_tensor(v)}
    after = {(i, k): v for i, st in enumerate(opt2.state.values()) for k, v in st.items() if torch.is_tensor(v)}
    assert before.keys() == after.keys()
    for key, v in before.items():
        assert after[key].dtype == v.dtype and torch.equal(after[key], v), key
    assert any(v.dtype == torch.bfloat16 for v in after.values())
    assert opt2.param_groups[0]["sr_step"] == 3


def test_compiled_bf16_state_matches_eager_bf16_state(monkeypatch) -> None:
    """The compiled kernel stores bf16 state with stochastic rounding too: both paths stay close to the
    float32-state trajectory and keep the state in bf16 (a compile of lion's bf16-state kernel, ~10 s)."""
    monkeypatch.delenv(COMPILE_ENV, raising=False)
    if not _elementwise.compile_available("cpu")[0]:
        pytest.skip("no usable compiler")
    shape = (256, COMPILED_MIN_NUMEL // 256 + 1)

    def run(compiled: bool, state_dtype: str | None) -> tuple[torch.Tensor, torch.optim.Optimizer]:
        p = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
        opt = lo.create_optimizer("lion", [p], compiled=compiled, state_dtype=state_dtype, lr=1e-3)
        for step in range(10):
            p.grad = torch.randn(shape, generator=torch.Generator().manual_seed(10 + step))
            opt.step()
        return p.detach(), opt

    ref, _ = run(False, None)
    eager, opt_e = run(False, "bfloat16")
    _elementwise._CALLED.clear()
    comp, opt = run(True, "bfloat16")
    assert _elementwise._CALLED, "the compiled kernel was not used"
    m_c = opt.state[opt.param_groups[0]["params"][0]]["exp_avg"]
    m_e = opt_e.state[opt_e.param_groups[0]["params"][0]]["exp_avg"]
    assert m_c.dtype == m_e.dtype == torch.bfloat16
    # both paths draw the same rounding bits (same seeds): the states agree up to where the float32 values
    # before rounding differ in the last bits (fused vs foreach arithmetic)
    ulp = m_e.float().abs() * 2 ** -7
    assert ((m_c.float() - m_e.float()).abs() <= ulp).float().mean() > 0.99
    # lion moves each weight by ±lr per step; a sign flip from rounding moves it by 2·lr at most
    for got in (eager, comp):
        frac = ((got - ref).abs() > 1e-6).float().mean().item()
        assert frac < 0.02, f"{frac:.3%} of weights differ from the float32-state run"


@pytest.mark.gpu
def test_sr_on_cuda_is_unbiased_and_matches_cpu() -> None:
    x = torch.randn(100_000) * 3
    on_gpu = sr_bf16(x.cuda(), 5).cpu()
    assert torch.equal(on_gpu, sr_bf16(x, 5)), "the hash-based rounding must not depend on the device"
    value = torch.full((1_000_000,), 1.0 + 2 ** -10, device="cuda")
    assert abs(sr_bf16(value, 1).float().mean().item() - (1.0 + 2 ** -10)) < 1e-5
