"""Tensor parallelism for the matrix exchange: ``parallelize_module`` layouts on 2 CPU processes (1-D tp mesh:
``Shard(0)`` colwise, ``Shard(1)`` rowwise) and FSDP2 x TP on 4 (a (2, 2) (dp, tp) mesh: ``(_StridedShard(0),
Shard(0))`` and ``(Shard(0), Shard(1))``), one launch each (tests/dist_scripts/tp_muon.py).

Each matrix is assembled whole on its owner, orthogonalised once and its blocks sent back: equal to Newton–Schulz
of the full matrix, bit-identical whatever the bucket size, with the overlap ordering of the pipelined buckets;
row means and norms completed across column blocks. Muon and NorMuon on the tiny Llama with a TP plan equal one
process within bf16 tolerance (the HSDP test's)."""

import json
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed

LAYOUTS = {"tp": 2, "fsdp_tp": 4}
EXPECTED_PLACEMENTS = {
    "tp": {"qkv": "(Shard(dim=0),)", "proj": "(Shard(dim=1),)"},
    "fsdp_tp": {"qkv": "(_StridedShard(dim=0, sf=2), Shard(dim=0))", "proj": "(Shard(dim=0), Shard(dim=1))"},
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def run(request, tmp_path_factory):
    mode = request.param
    d = tmp_path_factory.mktemp(f"tp_{mode}")
    run_distributed(Path(__file__).parent / "dist_scripts" / "tp_muon.py", str(d), mode, nprocs=LAYOUTS[mode],
                    timeout=400, out_dir=d)
    return mode, d, [json.loads((d / f"{mode}_rank{r}.json").read_text()) for r in range(LAYOUTS[mode])]


def _overlapped(events: list) -> bool:
    """Bucket k+1's inbound all-to-all is issued before bucket k is waited on; each bucket's NS follows its wait
    and precedes its return; every return is waited on after the last one was issued."""
    pos = {tuple(e): i for i, e in enumerate(events)}
    n = sum(1 for e in events if e[0] == "issue")
    if n < 2:
        return False
    for k in range(n):
        if not pos[("issue", k)] < pos[("wait", k)] < pos[("ns", k)] < pos[("issue_back", k)] < pos[("wait_back", k)]:
            return False
        if k + 1 < n and not pos[("issue", k + 1)] < pos[("wait", k)]:
            return False
    return min(pos[("wait_back", k)] for k in range(n)) > max(pos[("issue_back", k)] for k in range(n))


@pytest.mark.slow
def test_exchange_assembles_orthogonalises_and_scatters_back(run):
    mode, _, ranks = run
    for rec in ranks:
        ex = rec["exchange"]
        for name, pl in ex["placements"].items():
            layer = name.split(".")[-2]
            if layer in ("qkv", "up", "gate"):
                assert pl == EXPECTED_PLACEMENTS[mode]["qkv"], (name, pl)
            else:
                assert pl == EXPECTED_PLACEMENTS[mode]["proj"], (name, pl)
        assert ex["kinds"] == ["sharded"]
        assert ex["shapes_ok"]
        assert ex["ns_vs_full_max"] <= 1e-2, ex["ns_vs_full_max"]  # the owner's NS of the whole matrix (0.0 here)
        assert ex["buckets_bitwise"], "the smallest buckets changed a result"
        assert ex["row_mean_sq_max"] < 1e-5 and ex["sq_norm_rel"] < 1e-5, ex
        assert ex["one_bucket"] == {"all_to_all_single": 2}
        # the smallest buckets: one matrix per owner rank (all ranks are holders here)
        buckets = -(-ex["n_matrices"] // LAYOUTS[mode])
        assert sum(1 for e in ex["events"] if e[0] == "issue") == buckets
        assert ex["per_matrix_buckets"] == {"all_to_all_single": 2 * buckets}
        assert _overlapped(ex["events"]), ex["events"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["muon", "normuon"])
def test_colwise_plan_equals_one_process(run, name):
    from tests.dist_scripts.tp_muon import make_model

    mode, d, ranks = run
    init = make_model().state_dict()
    got = torch.load(d / f"{mode}_colwise_{name}.pt", weights_only=True)
    single = torch.load(d / f"{mode}_single_{name}.pt", weights_only=True)
    assert any((single[k] - init[k]).abs().max() > 1e-4 for k in init if "blocks" in k)
    for k in single:
        torch.testing.assert_close(got[k], single[k], atol=2e-3, rtol=2e-3, msg=lambda m: f"{mode} {name} {k}: {m}")
    rec = [r[f"colwise_{name}"] for r in ranks]
    matrices = rec[0]["matrices"]
    from tests.dist_scripts.muon_dist import K

    if mode == "tp":  # TP matrices once over the tp group, the replicated rest split between the ranks: once each
        assert sum(r["ns_matrices"] for r in rec) == matrices * K
    else:  # the colwise 6 once over all 4 ranks; proj/down are FSDP2-only, once per tp rank's dp group
        fsdp_only = sum(1 for k in init if k.endswith(("attn.proj.weight", "mlp.down.weight")))
        assert sum(r["ns_matrices"] for r in rec) == (matrices + fsdp_only) * K
    assert all(r["ns_matrices"] > 0 for r in rec)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["muon", "normuon"])
def test_rowwise_plan_equals_one_process_or_is_refused_by_name(run, name):
    """Column blocks (Shard(1)) need an update that completes rows across the tp ranks; an optimizer that does not
    declare it (``column_shards``) is refused at construction naming the parameter and its placements."""
    from lightning_optim.registry import get_optimizer_spec

    mode, d, ranks = run
    cls = get_optimizer_spec(name).factory
    rec = ranks[0][f"full_{name}"]
    if not getattr(cls, "column_shards", False):
        msg = rec["refused"]
        assert "blocks.0.attn.proj.weight" in msg and EXPECTED_PLACEMENTS[mode]["proj"] in msg, msg
        return
    assert "refused" not in rec, rec
    got = torch.load(d / f"{mode}_full_{name}.pt", weights_only=True)
    single = torch.load(d / f"{mode}_single_{name}.pt", weights_only=True)
    for k in single:
        torch.testing.assert_close(got[k], single[k], atol=2e-3, rtol=2e-3, msg=lambda m: f"{mode} {name} {k}: {m}")
    from tests.dist_scripts.muon_dist import K

    # every matrix is TP-sharded: orthogonalised once in the whole job
    assert sum(r[f"full_{name}"]["ns_matrices"] for r in ranks) == rec["matrices"] * K
