"""Tensor parallelism for the Muon family on CPU (gloo), ONE launch per layout:

    torchrun --nproc_per_node=2 tests/dist_scripts/tp_muon.py OUT_DIR tp        # 1-D tp mesh
    torchrun --nproc_per_node=4 tests/dist_scripts/tp_muon.py OUT_DIR fsdp_tp   # (dp, tp) = (2, 2): FSDP2 x TP

The tiny Llama of ``muon_dist`` (71-row MLP: uneven shards) gets a TP plan with ``parallelize_module``: qkv, up
and gate ``ColwiseParallel`` (weights ``Shard(0)``), proj and down ``RowwiseParallel`` (``Shard(1)``); under
``fsdp_tp`` every block and the root are then ``fully_shard``-ed over ``dp`` (torch 2.13 gives
``(_StridedShard(0), Shard(0))`` and ``(Shard(0), Shard(1))``). Recorded:

* ``exchange``: for every matrix parameter of the parallelised model, a random full matrix (same seed on every
  rank) cut into this rank's block, orthogonalised through :func:`orthogonalize` with the parameter's own layout
  (``column_shards=True``), in one bucket and in the smallest buckets (one matrix per rank): the block of the
  result, the block of NS of the full matrix computed here, and :func:`row_mean_sq` / :func:`global_sq_norms`
  against the full matrix.
* ``colwise`` (muon, normuon): the plan without the rowwise layers, K steps on the same batches on every rank;
  rank 0 saves the full weights and the same K steps in one process. The Newton–Schulz work per rank and the
  exchange's collectives (``CommCounter``) are recorded.
* ``full`` (muon, normuon): the whole plan. Rowwise (``Shard(1)``) matrices need an optimizer whose update
  completes rows across column blocks; where the optimizer does not declare that (``column_shards``), building it
  must be refused naming the parameter and its placements, and the message is recorded instead.
"""

from __future__ import annotations

import json
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
warnings.filterwarnings("ignore")

from lightning_optim import create_optimizer  # noqa: E402
from lightning_optim.optim import _matrix_dist as md  # noqa: E402
from lightning_optim.optim.newton_schulz import newton_schulz  # noqa: E402
from tests.dist_scripts.hsdp_muon import CFG, HP, full_weights, n_matrices  # noqa: E402
from tests.dist_scripts.muon_dist import K, batch, loss_of  # noqa: E402
from tests.dist_utils import finish  # noqa: E402

NAMES = ("muon", "normuon")
COLWISE = ("attn.qkv", "mlp.up", "mlp.gate")
ROWWISE = ("attn.proj", "mlp.down")


def make_model():
    from lightning_optim.models.gpt import Transformer

    torch.manual_seed(0)
    return Transformer(CFG)


def tp_plan(rowwise: bool) -> dict:
    """Colwise layers return a replicated output and rowwise layers take a replicated input, so the model's own
    forward (the fused qkv split, the SwiGLU product) runs on whole activations: only the weights are split."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {name: ColwiseParallel(output_layouts=Replicate()) for name in COLWISE}
    if rowwise:
        plan.update({name: RowwiseParallel(input_layouts=Replicate()) for name in ROWWISE})
    return plan


def parallelize(model, mesh, mode: str, rowwise: bool):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    tp_mesh = mesh["tp"] if mode == "fsdp_tp" else mesh
    for block in model.blocks:
        parallelize_module(block, tp_mesh, tp_plan(rowwise))
    if mode == "fsdp_tp":
        for block in model.blocks:
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    return model


def ns(x: torch.Tensor) -> torch.Tensor:
    return newton_schulz(x, 5, "jordan", 1e-7)


def exchange(mesh, mode: str) -> dict:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    model = parallelize(make_model(), mesh, mode, rowwise=True)
    mats = [(n, p) for n, p in model.named_parameters() if p.ndim == 2 and "blocks" in n]
    metas = [md.matrix_meta(p, n, column_shards=True) for n, p in mats]
    g = torch.Generator().manual_seed(1)
    fulls = [torch.randn(tuple(p.shape), generator=g) for _, p in mats]
    slices = []
    for (_, p), f in zip(mats, fulls):
        shape, off = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        slices.append(tuple(slice(o, o + s) for o, s in zip(off, shape)))
    blocks = [f[s].contiguous() for f, s in zip(fulls, slices)]
    md.CommCounter.reset()
    one = md.orthogonalize(blocks, metas, ns, bucket_mb=1e6)
    one_counts = dict(md.CommCounter.collectives)
    md.CommCounter.reset()
    with md.recording() as events:
        many = md.orthogonalize(blocks, metas, ns, bucket_mb=1e-6)
    many_counts = dict(md.CommCounter.collectives)
    ref = [ns(f.unsqueeze(0))[0][s] for f, s in zip(fulls, slices)]
    rows = md.row_mean_sq(blocks, metas)
    rows_ref = [f.square().mean(dim=-1, keepdim=True)[s[0]] for f, s in zip(fulls, slices)]
    sq = md.global_sq_norms(blocks, metas)
    return {
        "placements": {n: repr(tuple(p.placements)) for n, p in mats},
        "kinds": sorted({m.kind for m in metas}),
        "ns_vs_full_max": max(float((a.float() - b.float()).abs().max()) for a, b in zip(one, ref)),
        "buckets_bitwise": all(torch.equal(a, b) for a, b in zip(one, many)),
        "shapes_ok": all(tuple(a.shape) == tuple(b.shape) for a, b in zip(one, blocks)),
        "row_mean_sq_max": max(float((a - b).abs().max()) for a, b in zip(rows, rows_ref)),
        "sq_norm_rel": max(float(abs(a - f.square().sum()) / f.square().sum()) for a, f in zip(sq, fulls)),
        "one_bucket": one_counts, "per_matrix_buckets": many_counts, "n_matrices": len(mats),
        "events": events,
    }


def train(name: str, mesh, mode: str, rowwise: bool, out: Path) -> dict:
    model = parallelize(make_model(), mesh, mode, rowwise)
    try:
        opt = create_optimizer(name, model, **HP[name])
    except ValueError as err:
        return {"refused": str(err)}
    md.CommCounter.reset()
    for s in range(K):
        opt.zero_grad()
        loss_of(model, batch(s)).backward()
        opt.step()
    full = full_weights(model)
    tag = f"{'full' if rowwise else 'colwise'}_{name}"
    if dist.get_rank() == 0:
        torch.save(full, out / f"{mode}_{tag}.pt")
    return {"ns_matrices": md.CommCounter.ns_matrices, "collectives": dict(md.CommCounter.collectives),
            "matrices": n_matrices(opt),
            "placements": sorted({repr(tuple(p.placements)) for p in model.parameters() if hasattr(p, "placements")})}


def single_run(name: str) -> dict[str, torch.Tensor]:
    model = make_model()
    opt = create_optimizer(name, model, distributed=False, **HP[name])
    for s in range(K):
        opt.zero_grad()
        loss_of(model, batch(s)).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    from torch.distributed.device_mesh import init_device_mesh

    rank = dist.get_rank()
    if mode == "tp":
        mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    else:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    record = {"exchange": exchange(mesh, mode)}
    for name in NAMES:
        record[f"colwise_{name}"] = train(name, mesh, mode, False, out)
        record[f"full_{name}"] = train(name, mesh, mode, True, out)
    if rank == 0:
        for name in NAMES:
            torch.save(single_run(name), out / f"{mode}_single_{name}.pt")
    (out / f"{mode}_rank{rank}.json").write_text(json.dumps(record))
    finish(out)


if __name__ == "__main__":
    main()
