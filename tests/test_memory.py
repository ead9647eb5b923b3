"""Memory estimator: the headline figures, dtypes and sharding, and — for every registered optimizer — the
estimate against the optimizer-state bytes actually allocated after one step.

What is counted as "state" (both sides): every tensor with at least one dimension that the optimizer keeps
per parameter (``optimizer.state`` and any optimizer it delegates to), each storage once. 0-dim tensors are
step counters and are left out; so are Python numbers in the state or the param groups.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lightning_optim as lo
from lightning_optim.cli import main as cli_main
from lightning_optim.memory import (
    estimate_memory,
    format_bytes,
    measure_state_bytes,
    preset_shapes,
    transformer_shapes,
)
from lightning_optim.registry import get_optimizer_spec
from lightning_optim.specs import StateLayout

VOCAB, DIM, SEQ = 96, 32, 8


class ToyLM(nn.Module):
    """A small decoder-shaped model: embedding, norms, attention-like and MLP matrices with and without
    bias, an untied ``lm_head`` — every routing case of the default rules, in a few thousand parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            self.blocks.append(nn.ModuleDict({
                "norm": nn.LayerNorm(DIM),
                "qkv": nn.Linear(DIM, 3 * DIM, bias=False),
                "proj": nn.Linear(DIM, DIM, bias=False),
                "up": nn.Linear(DIM, 2 * DIM),
                "down": nn.Linear(2 * DIM, DIM),
            }))
        self.norm = nn.RMSNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for b in self.blocks:
            h = b["norm"](x)
            q, k, v = b["qkv"](h).chunk(3, dim=-1)
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(DIM), dim=-1)
            x = x + b["proj"](att @ v)
            x = x + b["down"](torch.nn.functional.gelu(b["up"](b["norm"](x))))
        return self.lm_head(self.norm(x))


def _one_step(name: str, dtype: torch.dtype = torch.float32, **hp) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = ToyLM().to(dtype)
    try:
        opt = lo.create_optimizer(name, model, **hp)
    except ImportError as err:
        pytest.skip(f"{name} needs an optional dependency: {err}")
    idx = torch.randint(0, VOCAB, (4, SEQ))
    logits = model(idx)
    loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), idx.roll(-1, 1).flatten())
    loss.backward()
    opt.step()
    return model, opt


@pytest.mark.parametrize("name", lo.available_optimizers())
def test_estimate_matches_allocated_state(name: str) -> None:
    """Every registered optimizer (discovered at test time): estimate == bytes allocated after one step.

    Tolerance 1% of the measured bytes (quantised layouts carry block scales the per-element figure averages)
    plus 2 kB for tables shared by all parameters (bitsandbytes' two 256-entry float32 quantisation maps).
    """
    model, opt = _one_step(name)
    measured = measure_state_bytes(opt)
    estimate = estimate_memory(name, module=model).state_total
    assert measured > 0 or estimate == 0, f"{name}: no state allocated after one step"
    assert estimate == pytest.approx(measured, rel=0.01, abs=2048), (
        f"{name}: estimator says {estimate:,.0f} B of state, the optimizer allocated {measured:,} B "
        f"(spec: {get_optimizer_spec(name).state.describe()}"
        + (f"; others {get_optimizer_spec(name).other_state.describe()})" if get_optimizer_spec(name).other_state else ")")
    )


@pytest.mark.parametrize("name", [n for n in lo.available_optimizers()
                                  if "state_dtype" in get_optimizer_spec(n).defaults])
def test_bf16_state_estimate_matches_allocated_state(name: str) -> None:
    """``state_dtype="bfloat16"``: the estimate with ``state_dtype="bf16"`` counts what the optimizer allocates
    (only the tensors its option lowers are 2 bytes: Prodigy's p0, the Muon family's AdamW part are not)."""
    model, opt = _one_step(name, state_dtype="bfloat16")
    measured = measure_state_bytes(opt)
    fp32 = estimate_memory(name, module=model).state_total
    estimate = estimate_memory(name, module=model, state_dtype="bf16")
    assert estimate.state_total == pytest.approx(measured, rel=0.01, abs=64), (name, estimate.table())
    assert estimate.state_total < fp32
    if name == "prodigy":
        assert estimate.state_dtypes["p0"] == "float32" and estimate.state_dtypes["exp_avg"] == "bf16"
        assert "[bf16]" in estimate.table()


def test_adamw_state_follows_the_parameter_dtype() -> None:
    model, opt = _one_step("adamw", torch.bfloat16)
    measured = measure_state_bytes(opt)
    n = sum(p.numel() for p in model.parameters())
    assert measured == 2 * 2 * n
    assert estimate_memory("adamw", module=model, weight_dtype="bf16").state_total == measured
    assert estimate_memory("adamw", module=model, weight_dtype="bf16", state_dtype="fp32").state_total == 2 * measured


def test_seven_billion_adamw_fp32_is_112_gb(capsys: pytest.CaptureFixture[str]) -> None:
    est = estimate_memory("adamw", 7e9)
    assert est.parameters == est.gradients == 28e9
    assert est.state == {"exp_avg": 28e9, "exp_avg_sq": 28e9}
    assert est.total == 112e9 and est.bytes_per_param() == 16 and est.exact
    assert cli_main(["memory", "--params", "7e9", "--optimizer", "adamw"]) == 0
    out = capsys.readouterr().out
    assert out.count("28.00 GB") == 4 and "112.00 GB" in out


def test_dtypes_master_weights_and_sharding() -> None:
    n = 1_000_000
    mixed = estimate_memory("adamw", n, weight_dtype="bf16", state_dtype="fp32", master_dtype="fp32")
    assert (mixed.parameters, mixed.gradients, mixed.master, mixed.state_total) == (2 * n, 2 * n, 4 * n, 8 * n)
    assert mixed.bytes_per_param() == 16
    full = estimate_memory("adamw", n, shard=8)
    assert full.total == 16 * n / 8 and full.bytes_per_param() == 16
    zero1 = estimate_memory("adamw", n, shard=8, sharding="optimizer")
    assert zero1.parameters == 4 * n and zero1.gradients == 4 * n and zero1.state_total == 8 * n / 8
    zero2 = estimate_memory("adamw", n, shard=8, sharding="grad_op")
    assert zero2.parameters == 4 * n and zero2.gradients == 4 * n / 8
    assert estimate_memory("sgd", n, weight_dtype=torch.float16).total == 3 * 2 * n
    with pytest.raises(ValueError, match="shard"):
        estimate_memory("adamw", n, shard=0)
    with pytest.raises(ValueError, match="sharding"):
        estimate_memory("adamw", n, shard=2, sharding="zero9")
    with pytest.raises(ValueError, match="unknown dtype"):
        estimate_memory("adamw", n, weight_dtype="fp12")
    with pytest.raises(ValueError, match="exactly one"):
        estimate_memory("adamw", n, preset="llama2-7b")


def test_known_shapes_and_shape_dependent_state() -> None:
    shapes = preset_shapes("llama2-7b")
    assert sum(math.prod(s) for s, _ in shapes) == 6_738_415_616  # the published Llama-2-7B count
    gpt2 = transformer_shapes(768, 12, 50257, arch="gpt2")
    assert sum(math.prod(s) for s, _ in gpt2) == 124_439_808  # GPT-2 small, tied head
    # Adafactor's factored second moment: rows + columns per matrix, full for vectors
    est = estimate_memory("adafactor", shapes=[((300, 200), True), ((200,), False)])
    assert est.state_total == 4 * (300 + 200 + 200) and est.exact
    # without shapes the shape-dependent part is unknown and the estimate says so
    assert not estimate_memory("adafactor", 7e9).exact
    assert "format" not in format_bytes(1.5e9) and format_bytes(1.5e9) == "1.50 GB"


def test_quantised_state_follows_the_min_8bit_size_rule() -> None:
    if "adamw8bit" not in lo.available_optimizers():
        pytest.skip("adamw8bit is not registered")
    spec = get_optimizer_spec("adamw8bit")
    threshold = spec.defaults["min_8bit_size"]
    small, large = ((threshold - 1,), True), ((threshold * 4,), True)
    assert estimate_memory("adamw8bit", shapes=[small]).state_total == 2 * 4 * (threshold - 1)
    assert estimate_memory("adamw8bit", shapes=[large]).state_total == pytest.approx(
        2 * threshold * 4 * spec.state.bytes_per_element)
    # measured on a model with quantised (>= min_8bit_size) and 32-bit (1-D) parameters: equal up to the two
    # 256-entry float32 quantisation maps every parameter shares
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.LayerNorm(256), nn.Linear(256, 64))
    try:
        opt = lo.create_optimizer("adamw8bit", model)
    except ImportError as err:
        pytest.skip(f"bitsandbytes is not installed: {err}")
    model(torch.randn(4, 256)).pow(2).mean().backward()
    opt.step()
    assert measure_state_bytes(opt) - estimate_memory("adamw8bit", module=model).state_total == 2 * 256 * 4


def test_measure_counts_each_storage_once_and_ignores_step_counters() -> None:
    p = nn.Parameter(torch.zeros(10))
    opt = torch.optim.SGD([p], lr=0.1)
    shared = torch.zeros(256)
    opt.state[p] = {"step": torch.tensor(3.0), "buf": torch.zeros(10), "qmap": shared, "qmap_again": shared,
                    "nested": [torch.zeros(5, dtype=torch.float16)], "scalar": 1.0}
    assert measure_state_bytes(opt) == 10 * 4 + 256 * 4 + 5 * 2


def test_preset_from_models_matches_the_module() -> None:
    models = pytest.importorskip("lightning_optim.models")
    if not hasattr(models, "build_model"):
        pytest.skip("lightning_optim.models.build_model is not there yet")
    model = models.build_model("tiny", vocab_size=4096)
    for name in ("adamw", "adafactor"):
        by_preset = estimate_memory(name, preset="tiny")
        by_module = estimate_memory(name, module=model)
        assert by_preset.state_total == by_module.state_total
        assert by_preset.n_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_state_every_fsdp2_rank_keeps_whole_is_not_divided() -> None:
    """SOAP gathers the gradient and keeps its full state on every rank; Dion's right factor Q is replicated
    while its momentum is a row shard; AdamW's state is sharded like the parameters."""
    one = {name: estimate_memory(name, preset="tiny", vocab_size=256)
           for name in ("soap", "shampoo", "psgd-kron", "dion", "adamw")}
    four = {name: estimate_memory(name, preset="tiny", vocab_size=256, shard=4) for name in one}
    for gathered in ("soap", "shampoo", "psgd-kron"):  # gradient gathered, full state on every rank
        assert four[gathered].state == one[gathered].state
    assert four["soap"].parameters == one["soap"].parameters / 4
    dion_one, dion_four = one["dion"].state, four["dion"].state
    assert dion_four["matrix shape-dependent"] == dion_one["matrix shape-dependent"] > 0
    assert dion_four["matrix momentum"] == dion_one["matrix momentum"] / 4
    assert four["adamw"].state == {k: v / 4 for k, v in one["adamw"].state.items()}
    # ZeRO-1 partitions the optimizer's state by owner, whatever the optimizer keeps per parameter
    zero1 = estimate_memory("soap", preset="tiny", vocab_size=256, shard=4, sharding="optimizer")
    assert zero1.state == {k: v / 4 for k, v in one["soap"].state.items()}
    with pytest.raises(ValueError, match="replicated"):
        StateLayout(2, replicated="some")
