"""Muon family on 2 CPU ranks (one launch): DDP replicas end identical; FSDP2 (Lightning ModelParallelStrategy,
fully_shard per block) equals one process within bf16 tolerance, with DTensor optimizer state."""

import json
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed

NAMES = ["muon", "d-muon", "normuon", "sf-normuon"]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    d = tmp_path_factory.mktemp("muon_dist")
    run_distributed(Path(__file__).parent / "dist_scripts" / "muon_dist.py", str(d), timeout=400, out_dir=d)
    return d


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_ddp_and_fsdp2(out, name):
    from tests.dist_scripts.muon_dist import make_model  # noqa: F401  (same init as the script)

    init = make_model().state_dict()
    r0 = torch.load(out / f"ddp_{name}_rank0.pt", weights_only=True)
    r1 = torch.load(out / f"ddp_{name}_rank1.pt", weights_only=True)
    single = torch.load(out / f"ddp_{name}_single.pt", weights_only=True)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"DDP ranks differ at {k}"
        torch.testing.assert_close(r0[k], single[k], atol=2e-3, rtol=2e-3)
    assert any((single[k] - init[k]).abs().max() > 1e-4 for k in init if "blocks" in k)
    fsdp = torch.load(out / f"fsdp_{name}.pt", weights_only=True)
    fsingle = torch.load(out / f"fsdp_{name}_single.pt", weights_only=True)
    for k in fsdp:
        torch.testing.assert_close(fsdp[k], fsingle[k], atol=2e-3, rtol=2e-3, msg=lambda m: f"{name} {k}: {m}")
    report = json.loads((out / "report.json").read_text())[name]
    assert report == {"state_dtensor": True, "params_dtensor": True, "matrix_layouts": ["sharded"]}


def test_owners_longest_first_balance_and_batching():
    """LPT owners: deterministic, within Graham's 4/3 bound of a known optimum, better than round-robin here,
    and one batched Newton–Schulz call per distinct shape an owner holds."""
    from lightning_optim.optim._matrix_dist import assign_owners

    costs = [7, 7, 6, 6, 5, 5, 4, 4, 4]  # optimum on 3 ranks: 16 each (7+5+4, 7+5+4, 6+6+4)
    owner = assign_owners(costs, 3)
    assert owner == assign_owners(list(costs), 3)
    loads = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(3)]
    assert sum(loads) == sum(costs) and max(loads) <= 16 * (4 / 3 - 1 / 9)
    rr = [sum(c for i, c in enumerate(costs) if i % 3 == r) for r in range(3)]
    assert max(loads) < max(rr)
    assert assign_owners([5], 4) == [0] and assign_owners([], 2) == []

    from benchmarks.owner_balance import balance

    shapes = [(64, 32)] * 6 + [(32, 32)] * 6  # two shapes, 12 matrices, 2 ranks: 6 matrices, 2 calls each
    b = balance(shapes, 2)
    assert b["lpt"] == pytest.approx(1.0) and (b["calls"], b["owned"], b["idle"]) == (2, 6, 0)
    assert balance([(64, 32)], 4)["idle"] == 3


def test_comm_model_arithmetic():
    """benchmarks/comm_model.py on hand-checkable shapes: DDP's all-gather is W x the largest owner share,
    FSDP2's all-to-alls carry whole matrices to owners and rows back, HSDP adds one all-gather over replicas."""
    from benchmarks.comm_model import Shapes, optimizer_comm

    shapes = Shapes(matrices=[(8, 4), (8, 4), (6, 4)], params=[(8, 4), (8, 4), (6, 4), (4,)])
    ddp = optimizer_comm("muon", "ddp", shapes, 2)  # owners: 8x4 -> 0, 8x4 -> 1, 6x4 -> 0: shares 56, 32
    assert [(c.op, c.buffer, c.wire) for c in ddp.collectives] == [("all_gather_into_tensor", 2 * 56 * 2, 56 * 2)]
    fsdp = optimizer_comm("normuon", "fsdp2", shapes, 2)
    a2a1, a2a2, norms = fsdp.collectives
    assert (a2a1.buffer, a2a2.buffer) == ((32 + 24) * 2, (16 + 16 + 12) * 2)  # rank 0 owns 8x4 and 6x4
    assert (norms.op, norms.buffer) == ("all_reduce", 3 * 4)
    hsdp = optimizer_comm("muon", "hsdp", shapes, 4, shards=2)
    assert [c.op for c in hsdp.collectives] == ["all_to_all_single", "all_to_all_single", "all_gather_into_tensor"]
    soap = optimizer_comm("soap", "fsdp2", shapes, 4)
    assert soap.count == 4 and soap.buffer == (32 + 32 + 24 + 4) * 4
    assert optimizer_comm("adamw", "hsdp", shapes, 4, shards=2).count == 0
    assert optimizer_comm("soap", "ddp", shapes, 4).count == 0
    with pytest.raises(ValueError, match="strategy"):
        optimizer_comm("muon", "zero3", shapes, 4)
    with pytest.raises(ValueError, match="multiple"):
        optimizer_comm("muon", "hsdp", shapes, 6, shards=4)
