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
    assert report == {"state_dtensor": True, "params_dtensor": True}
