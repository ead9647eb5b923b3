"""HSDP: the Muon family on a 2-D (replicate x shard) FSDP2 mesh, 4 CPU processes (2 x 2, gloo), one launch.

Directly (``fully_shard`` with a ``(2, 2)`` mesh) and through Lightning's ModelParallelStrategy, the result
equals one process within bf16 tolerance, and each matrix is orthogonalised once per step in the whole job:
the Newton–Schulz matrices of the four ranks add up to matrices x steps (never once per replica). SOAP on the
same mesh equals one process too."""

import json
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed

RUNS = {"direct_muon": "muon", "direct_normuon": "normuon", "direct_soap": "soap", "lightning_muon": "muon"}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    d = tmp_path_factory.mktemp("hsdp")
    run_distributed(Path(__file__).parent / "dist_scripts" / "hsdp_muon.py", str(d), nprocs=4, timeout=400,
                    out_dir=d)
    return d


@pytest.mark.slow
def test_hsdp_equals_one_process_and_orthogonalises_each_matrix_once(out):
    from tests.dist_scripts.hsdp_muon import make_model
    from tests.dist_scripts.muon_dist import K

    init = make_model().state_dict()
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
    for run, name in RUNS.items():
        rec = [r[run] for r in ranks]
        assert all(r["placements"] == ["(Replicate(), Shard(dim=0))"] for r in rec), rec[0]["placements"]
        got = torch.load(out / f"{run}.pt", weights_only=True)
        single = torch.load(out / f"single_{name}.pt", weights_only=True)
        assert any((single[k] - init[k]).abs().max() > 1e-4 for k in init if "blocks" in k)
        for k in single:
            torch.testing.assert_close(got[k], single[k], atol=2e-3, rtol=2e-3, msg=lambda m: f"{run} {k}: {m}")
        if name == "soap":  # every rank gathers each gradient and computes the whole update itself
            continue
        matrices = rec[0]["matrices"]
        assert sum(r["ns_matrices"] for r in rec) == matrices * K, (run, [r["ns_matrices"] for r in rec])
        assert all(r["ns_matrices"] > 0 for r in rec), f"{run}: a rank did no Newton–Schulz work"
        # per step: two all-to-alls in the shard group, one all-gather across the replicas (+ NorMuon's norms)
        expected = {"all_to_all_single": 2 * K, "all_gather_into_tensor": K}
        if name == "normuon":
            expected["all_reduce"] = K
        assert all(r["collectives"] == expected for r in rec), (run, [r["collectives"] for r in rec])

    # tensor-parallel layouts (2-D and 1-D) are refused when the optimizer is built, naming what is wrong
    for msg in ranks[0]["refusal"]:
        assert "tp.weight" in msg and "Shard(dim=1)" in msg, msg
