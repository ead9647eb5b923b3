"""Bucketed, overlapped matrix exchange (``lightning_optim.optim._matrix_dist``): buckets by bytes, the recorder,
and on 2 CPU processes (FSDP2, gloo; this file is also the torchrun script) Muon and NorMuon with the smallest
buckets (one matrix per owner rank) step bit-identically to one bucket, with bucket k+1's all-to-all issued
before bucket k is orthogonalised.

    torchrun --nproc_per_node=2 tests/test_matrix_overlap.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_optim.optim import _matrix_dist as md  # noqa: E402

NAMES = ("muon", "normuon")


def _meta(rows: int, cols: int) -> md.MatrixMeta:
    return md.MatrixMeta(rows, cols, "local")


def test_bucketize_closes_a_bucket_before_it_overflows_and_keeps_big_matrices_alone():
    mib = 2 ** 20
    # bf16: a 512 x 512 matrix is 0.5 MiB, 1024 x 1024 is 2 MiB
    metas = [_meta(512, 512), _meta(512, 512), _meta(1024, 1024), _meta(512, 512), _meta(512, 512), _meta(512, 512)]
    assert md.bucketize(metas, bucket_mb=1.0) == [[0, 1], [2], [3, 4], [5]]
    assert md.bucketize(metas, bucket_mb=100.0) == [list(range(6))]
    assert md.bucketize(metas, bucket_mb=1e-9) == [[i] for i in range(6)]
    assert sum(2 * m.rows * m.cols for m in metas) == 4.5 * mib
    assert md.bucketize(metas) == [list(range(6))]  # BUCKET_MB (64) holds them all
    # per owner rank: 0.5 MiB x 2 ranks, and at least one matrix per rank in every bucket but the last
    assert md.bucketize(metas, bucket_mb=0.5, ranks=2) == [[0, 1], [2, 3], [4, 5]]
    assert md.bucketize(metas, bucket_mb=1e-9, ranks=4) == [[0, 1, 2, 3], [4, 5]]
    assert md.bucketize(metas, bucket_mb=1.0, ranks=3) == [[0, 1, 2], [3, 4, 5]]
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="bucket_mb must be positive"):
            md.bucketize(metas, bucket_mb=bad)


def test_buckets_continue_one_balance():
    """Owners are assigned bucket by bucket from the load so far: single-matrix buckets go round the ranks
    instead of all to rank 0, and one bucket gives the unbucketed assignment."""
    load = [0] * 4
    assert [md.assign_owners([5], 4, load)[0] for _ in range(6)] == [0, 1, 2, 3, 0, 1]
    assert load == [10, 10, 5, 5]
    costs = [9, 7, 7, 5, 3, 3, 1]
    assert md.assign_owners(costs, 3, [0, 0, 0]) == md.assign_owners(costs, 3)


def test_comm_model_counts_the_buckets_and_tensor_parallel_row_sums():
    """benchmarks/comm_model.py follows the bucketing: the smallest buckets give 2 all-to-alls per bucket with the
    same total bytes as one bucket; FSDP2 x TP adds NorMuon's row-sum all-reduce over the tp group."""
    from benchmarks.comm_model import Shapes, optimizer_comm

    mats = [(8, 4), (8, 4), (6, 4), (6, 4), (4, 4)]
    names = ["a.qkv.weight", "a.proj.weight", "m.up.weight", "m.down.weight", "m.gate.weight"]
    shapes = Shapes(mats, list(mats), names)
    one = optimizer_comm("muon", "fsdp2", shapes, 2, bucket_mb=1e6)
    small = optimizer_comm("muon", "fsdp2", shapes, 2, bucket_mb=1e-9)
    assert one.by_op() == {"all_to_all_single": 2}
    assert small.by_op() == {"all_to_all_single": 2 * 3}  # buckets of 2, 2, 1 matrices
    assert sum(c.buffer for c in small.collectives[::2]) >= one.collectives[0].buffer // 2
    tp = optimizer_comm("normuon", "fsdp2", shapes, 4, tp=2)
    assert tp.by_op() == {"all_to_all_single": 2, "all_reduce": 2}
    assert tp.collectives[-1].group == 2  # row sums over the tp group
    with pytest.raises(ValueError, match="tensor parallelism"):
        optimizer_comm("soap", "fsdp2", shapes, 4, tp=2)


def test_recording_is_off_outside_the_block_and_nests():
    assert md._events is None
    with md.recording() as outer:
        md._record("issue", 0)
        with md.recording() as inner:
            md._record("wait", 0)
        md._record("ns", 0)
    assert outer == [("issue", 0), ("ns", 0)] and inner == [("wait", 0)]
    assert md._events is None
    md._record("issue", 1)  # no recorder: nothing kept anywhere
    assert md._events is None


def test_column_shards_are_refused_unless_the_caller_completes_rows(one_rank_mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    w = distribute_tensor(torch.randn(6, 8), one_rank_mesh, (Shard(1),))
    with pytest.raises(ValueError, match=r"'layer\.weight'.*Shard\(dim=1\)"):
        md.matrix_meta(w, "layer.weight")
    assert md.matrix_meta(w, "layer.weight", column_shards=True).kind == "local"  # one rank holds it all
    with pytest.raises(ValueError, match=r"'conv\.weight'.*only dimension 0"):
        md.matrix_meta(distribute_tensor(torch.randn(4, 3, 2, 2), one_rank_mesh, (Shard(1),)), "conv.weight",
                       column_shards=True)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    from tests.dist_utils import run_distributed

    d = tmp_path_factory.mktemp("overlap")
    run_distributed(Path(__file__), str(d), nprocs=2, timeout=300, out_dir=d)
    return [json.loads((d / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_buckets_overlap_and_change_no_bit(out, name):
    for rec in out:
        r = rec[name]
        assert r["bitwise"], f"{name}: the smallest buckets changed the weights"
        assert r["buckets"] >= 4
        assert r["collectives_one"]["all_to_all_single"] == 2
        assert r["collectives_many"]["all_to_all_single"] == 2 * r["buckets"]
        pos = {tuple(e): i for i, e in enumerate(r["events"])}
        for k in range(r["buckets"]):
            assert pos[("issue", k)] < pos[("wait", k)] < pos[("ns", k)] < pos[("issue_back", k)] \
                < pos[("wait_back", k)]
            if k + 1 < r["buckets"]:
                assert pos[("issue", k + 1)] < pos[("wait", k)], f"bucket {k + 1} not in flight during NS {k}"
                assert pos[("issue_back", k)] < pos[("wait", k + 1)]


# ------------------------------------------------------------------------------------------ torchrun script


def _run(name: str, bucket_mb: float, events: list | None):
    from torch.distributed.fsdp import fully_shard

    from lightning_optim import create_optimizer
    from tests.dist_scripts.muon_dist import HP, batch, loss_of, make_model

    model = make_model()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = create_optimizer(name, model, **HP[name])
    old, md.BUCKET_MB = md.BUCKET_MB, bucket_mb
    try:
        md.CommCounter.reset()
        for s in range(2):
            opt.zero_grad()
            loss_of(model, batch(s)).backward()
            if s == 1 and events is not None:
                with md.recording() as ev:
                    opt.step()
                events.extend(ev)
            else:
                opt.step()
    finally:
        md.BUCKET_MB = old
    weights = {k: v.full_tensor() for k, v in model.state_dict().items()}
    return weights, {k: v // 2 for k, v in md.CommCounter.collectives.items()}


def main() -> None:
    import torch.distributed as dist

    from tests.dist_utils import finish

    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    record = {}
    for name in NAMES:
        one, c_one = _run(name, 1e6, None)
        events: list = []
        many, c_many = _run(name, 1e-6, events)
        record[name] = {"bitwise": all(torch.equal(one[k], many[k]) for k in one),
                        "buckets": sum(1 for e in events if e[0] == "issue"), "events": events,
                        "collectives_one": c_one, "collectives_many": c_many}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(record))
    finish(out)


if __name__ == "__main__":
    main()
