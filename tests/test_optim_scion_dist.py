"""Scion on 2 CPU ranks (one launch of ``tests/dist_scripts/scion_dist.py``): DDP replicas end identical and
equal one process, sharing the Newton–Schulz work (each hidden matrix orthogonalised once across the ranks per
step); Lightning FSDP2 with uneven shards equals one process within bf16 tolerance, with DTensor state.
Every Scion rule is in use (spectral, rms_rows, sign, bias_rms)."""

import json
from pathlib import Path

import pytest

from tests.dist_utils import run_distributed


@pytest.mark.slow
def test_ddp_and_fsdp2_two_processes_equal_one_and_ddp_shares_newton_schulz(tmp_path):
    import torch

    from tests.dist_scripts.muon_dist import K
    from tests.dist_scripts.scion_dist import make_model

    run_distributed(Path(__file__).parent / "dist_scripts" / "scion_dist.py", str(tmp_path), timeout=300,
                    out_dir=tmp_path)
    init = make_model().state_dict()
    r0 = torch.load(tmp_path / "ddp_scion_rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "ddp_scion_rank1.pt", weights_only=True)
    single = torch.load(tmp_path / "ddp_scion_single.pt", weights_only=True)
    assert set(r0) == set(init)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"DDP ranks differ at {k}"
        torch.testing.assert_close(r0[k], single[k], atol=2e-3, rtol=2e-3, msg=lambda m: f"DDP {k}: {m}")
        assert (single[k] - init[k]).abs().max() > 1e-4, f"{k} did not move"
    fsdp = torch.load(tmp_path / "fsdp_scion.pt", weights_only=True)
    fsingle = torch.load(tmp_path / "fsdp_scion_single.pt", weights_only=True)
    for k in fsdp:
        torch.testing.assert_close(fsdp[k], fsingle[k], atol=2e-3, rtol=2e-3, msg=lambda m: f"FSDP2 {k}: {m}")
    assert json.loads((tmp_path / "report.json").read_text())["scion"] == {"state_dtensor": True,
                                                                          "params_dtensor": True}
    ranks = [json.loads((tmp_path / f"ns_rank{r}.json").read_text()) for r in range(2)]
    matrices = ranks[0]["matrices"]
    assert matrices == 10
    assert [r["layouts"] for r in ranks] == [["sharded"]] * 2  # FSDP2 really split them over the 2 ranks
    assert [r["embedding_rows"] for r in ranks] == [49, 48]  # uneven shards
    for run in ("ddp", "fsdp"):  # once per matrix and step across the ranks, both ranks working
        assert sum(r[run] for r in ranks) == matrices * K, (run, ranks)
        assert all(r[run] > 0 for r in ranks), (run, ranks)
