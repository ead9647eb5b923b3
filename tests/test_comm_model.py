"""benchmarks/comm_model.py: Dion's and AdaMuon's collectives and the FSDP2 x TP table rows, on hand-checkable shapes."""

from __future__ import annotations

import pytest

from benchmarks.comm_model import Shapes, grad_sync_wire, optimizer_comm, table


def _shapes() -> Shapes:
    mats = [(8, 4), (8, 4), (6, 4), (4, 6), (4, 4)]
    names = ["a.qkv.weight", "a.proj.weight", "m.up.weight", "m.down.weight", "m.gate.weight"]
    return Shapes(mats, list(mats) + [(4,)], names)


def test_dion_two_packed_all_reduces_in_the_shard_group():
    """Full rank: r = min(m, n) = 4 for every matrix, sketch rows ceil(1.25·4) = 5, so the sketch all-reduce is
    Σ 5·4 = 100 floats and the Gram + Y one Σ (4 + n)·4 = 4·(8 + 8 + 8 + 10 + 8) = 168 floats."""
    s = _shapes()
    c = optimizer_comm("dion", "fsdp2", s, 4)
    assert [(x.op, x.group, x.buffer) for x in c.collectives] == [("all_reduce", 4, 100 * 4), ("all_reduce", 4, 168 * 4)]
    assert [x.wire for x in c.collectives] == [2 * 3 * 400 // 4, 2 * 3 * 672 // 4]  # ring: 2(S-1)/S of the buffer
    hsdp = optimizer_comm("dion", "hsdp", s, 8, shards=2)  # in the shard group only: the replicas step alike
    assert [(x.group, x.buffer) for x in hsdp.collectives] == [(2, 400), (2, 672)]
    assert optimizer_comm("dion", "ddp", s, 8).count == 0
    assert optimizer_comm("dion", "fsdp2", s, 4, power_iters=3).count == 6


def test_dion_rank_fraction_shrinks_the_payload():
    """rank_fraction 1/4: r = 1 everywhere, sketch rows 2: Σ 2·1 = 10 floats and Σ (1 + n)·1 = 27 floats."""
    c = optimizer_comm("dion", "fsdp2", _shapes(), 2, rank_fraction=0.25)
    assert [x.buffer for x in c.collectives] == [10 * 4, 27 * 4]
    with pytest.raises(ValueError, match="rank_fraction"):
        optimizer_comm("dion", "fsdp2", _shapes(), 2, rank_fraction=0.0)
    with pytest.raises(ValueError, match="power_iters"):
        optimizer_comm("dion", "fsdp2", _shapes(), 2, power_iters=0)


def test_adamuon_communicates_like_normuon():
    s = _shapes()
    for strategy, w, shards in (("ddp", 4, None), ("fsdp2", 4, None), ("hsdp", 4, 2)):
        a = optimizer_comm("adamuon", strategy, s, w, shards=shards)
        n = optimizer_comm("normuon", strategy, s, w, shards=shards)
        assert [(x.op, x.buffer, x.wire) for x in a.collectives] == [(x.op, x.buffer, x.wire) for x in n.collectives]
    assert optimizer_comm("adamuon", "fsdp2", s, 4).by_op() == {"all_to_all_single": 2, "all_reduce": 1}


def test_tensor_parallel_refusals_and_grad_sync():
    s = _shapes()
    for name in ("soap", "dion", "adamuon"):
        with pytest.raises(ValueError, match="tensor parallelism"):
            optimizer_comm(name, "fsdp2", s, 4, tp=2)
    with pytest.raises(ValueError, match="tensor parallelism"):
        optimizer_comm("muon", "fsdp2", s, 6, tp=4)  # tp must divide the world
    mat = sum(r * c for r, c in s.matrices)
    # dp = 2 ranks over a tp rank's parameters: the matrices split tp ways, the vector replicated over tp
    assert grad_sync_wire("fsdp2", s, 4, tp=2) == (2 - 1) * (mat // 2 + 4) * 8 // 2


def test_table_has_tp_rows_with_dashes():
    text, data = table(["124m"], [8], [64])
    rows = [line for line in text.splitlines() if "fsdp2×tp8" in line]
    assert len(rows) == 1 and rows[0].count("—") == 3  # SOAP and both Dion columns
    assert data[("124m", "fsdp2×tp8", 64)]["soap"] is None and data[("124m", "fsdp2×tp8", 64)]["muon"] > 0
    assert data[("124m", "fsdp2", 8)]["dion r/16"] < data[("124m", "fsdp2", 8)]["dion"]
    with pytest.raises(ValueError, match="multiples"):
        table(["124m"], [8], [12])
