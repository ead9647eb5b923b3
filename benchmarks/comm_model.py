"""Communication model: collectives and bytes per optimizer step, matrix optimizers vs AdamW, DDP / FSDP2 / HSDP / TP.

    python benchmarks/comm_model.py            # table + plot, 8 to 1024 GPUs, 124M to 70B-class shapes

What is modelled is exactly what ``lightning_optim.optim._matrix_dist`` (Muon family) and ``soap.py`` issue in
``optimizer.step()``, with the same owner assignment (:func:`assign_owners`) and the same packing, so the
per-rank buffer sizes are exact, not estimates. ``benchmarks/comm_count.py`` measures the same quantities at 2
and 4 CPU ranks and checks them against :func:`optimizer_comm` (``benchmarks/results/comm_model_validation.md``).

Per step and per rank, for each optimizer:

* Muon / D-Muon (same communication), NorMuon / SF-NorMuon (NorMuon adds one all-reduce of one float32 per
  matrix under FSDP2/HSDP: the squared Frobenius norms of the row-sharded matrices; under DDP every rank holds
  whole results and needs none):
    - DDP: one ``all_gather_into_tensor`` of the owners' packed bf16 results. Each rank contributes a buffer as
      wide as the *largest* owner share, so the output is ``W × max share``: once ``W`` approaches the number of
      matrices this padding dominates (the table shows it).
    - FSDP2 (``W`` shards): two ``all_to_all_single`` per bucket: row blocks to the owners (an owner receives
      its whole matrices) and result rows back (every rank receives its rows of every matrix). Buckets hold
      about ``BUCKET_MB`` (64) MiB of bf16 matrices per rank and at least one matrix per rank
      (``_matrix_dist.bucketize``), so up to 720M every preset is one bucket (2 all-to-alls) and the 7B–70B
      shapes on few ranks are several (the count column shows it; the bytes are nearly those of one bucket).
    - FSDP2 × TP (``optimizer_comm(..., tp=T)``, a ``(W/T, T)`` mesh, every matrix tensor-parallel): the same
      exchange with all ``W`` ranks as holders of each matrix's blocks (torch's shard arithmetic), plus for
      NorMuon one all-reduce of the rowwise (``Shard(1)``) matrices' row sums over the tp group.
    - HSDP (``R`` replicas × ``S`` shards): owners over all ``R·S`` ranks; the two all-to-alls in the shard group
      for the matrices of one's own replica, then one ``all_gather_into_tensor`` over the ``R`` replicas.
* AdaMuon: NorMuon's collectives (the same exchange; its one all-reduce carries ``‖Ô‖²_F`` per sharded matrix).
* Dion (``dion.py``): DDP none (every rank computes the same low-rank step); FSDP2/HSDP per power iteration two
  packed float32 all-reduces over the shard group, of ``Σ k·r`` (sketches, ``k = sketch_rows(r)``) and
  ``Σ (r + n)·r`` elements (Gram matrices and ``Bᵀ·P₁``), ``r = dion_rank(m, n, rank_fraction)``; the payload
  does not shrink with the ranks. The table shows rank_fraction 1 (the default) and 1/16.
* Tensor parallelism (table rows ``fsdp2×tp8``, 64 GPUs and up): SOAP is not modelled; AdaMuon and Dion refuse
  the rowwise (``Shard(1)``) matrices when built (``comm_count.py --validate`` checks the refusal), so "—".
* SOAP: DDP none (every rank computes every update); FSDP2/HSDP one all-gather per parameter
  (``grad.full_tensor()``, float32 gradients) over the shard group, and every rank then does the whole
  optimizer work itself (the state is not sharded).
* AdamW: none (elementwise on replicas or shards).

The gradient synchronisation of the strategy itself (the same for every optimizer) is given for scale:
DDP an all-reduce of float32 gradients; FSDP2 two all-gathers of bf16 parameters (forward and backward,
``reshard_after_forward=True``) and a reduce-scatter of float32 gradients; HSDP the same within the shard
group plus an all-reduce of the float32 gradient shard across replicas.

Bytes: ``buffer`` is the size of the receive buffer of each collective on the busiest rank (what
``comm_count.py`` measures); ``wire`` is what a rank sends with ring / pairwise algorithms — all-gather
``(n-1)/n`` of the output, reduce-scatter ``(n-1)/n`` of the input, all-reduce ``2(n-1)/n`` of the tensor,
all-to-all the buffer minus the part a rank keeps — taken on the busiest rank. Latency (the number of
collectives) and bandwidth are reported separately; no link speed is assumed.

Shapes: the Llama-style presets of ``lightning_optim.models.gpt.model_config`` (124m, 210m, 583m, 720m) and
the Llama-2 7B, 13B and 70B shapes through its overrides (:data:`SHAPES`; 6.74B, 13.02B and 68.98B parameters,
the published counts), built on the meta device and routed by ``param_groups(split_matrices=True)``.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_optim import param_groups  # noqa: E402
from lightning_optim.models.gpt import Transformer, model_config  # noqa: E402
from lightning_optim.optim._matrix_dist import MatrixMeta, assign_owners, bucketize, shard_rows  # noqa: E402
from lightning_optim.optim.dion import dion_rank, sketch_rows  # noqa: E402
from lightning_optim.optim.newton_schulz import ns_flops  # noqa: E402

RESULTS = Path(__file__).parent / "results"
OPTIMIZERS = ("adamw", "muon", "normuon", "adamuon", "soap", "dion")  # d-muon ≡ muon, sf-normuon ≡ normuon
TP_OPTIMIZERS = ("adamw", "muon", "normuon")  # the ones that step tensor-parallel column shards
STRATEGIES = ("ddp", "fsdp2", "hsdp")
SHAPES = {
    "124m": ("124m", {}), "210m": ("210m", {}), "583m": ("583m", {}), "720m": ("720m", {}),
    # Llama-2 7B / 13B / 70B (Touvron et al. 2023): untied 32000-token embeddings, 70B with 8 KV heads (GQA)
    "7b": ("720m", dict(n_layer=32, n_embd=4096, n_head=32, mlp_hidden=11008, vocab_size=32000, tie_embeddings=False)),
    "13b": ("720m", dict(n_layer=40, n_embd=5120, n_head=40, mlp_hidden=13824, vocab_size=32000,
                         tie_embeddings=False)),
    "70b": ("720m", dict(n_layer=80, n_embd=8192, n_head=64, n_kv_head=8, mlp_hidden=28672, vocab_size=32000,
                         tie_embeddings=False)),
}
GPUS_PER_NODE = 8  # HSDP's shard group: one node


@dataclass
class Shapes:
    """The parameters the optimizer sees: matrix-rule matrices (rows, cols) and every parameter's shape."""

    matrices: list[tuple[int, int]]
    params: list[tuple[int, ...]]
    names: list[str] = field(default_factory=list)  # of the matrices (tensor parallelism's plan reads them)

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.params)


@dataclass
class Collective:
    op: str  # all_gather_into_tensor | all_to_all_single | all_reduce | all_gather (DTensor) | reduce_scatter
    group: int  # ranks in its process group
    buffer: int  # receive-buffer bytes on the busiest rank
    wire: int  # bytes the busiest rank sends


@dataclass
class Comm:
    collectives: list[Collective] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.collectives)

    @property
    def wire(self) -> int:
        return sum(c.wire for c in self.collectives)

    @property
    def buffer(self) -> int:
        return sum(c.buffer for c in self.collectives)

    def by_op(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.collectives:
            out[c.op] = out.get(c.op, 0) + 1
        return out


def shapes_of(model: torch.nn.Module) -> Shapes:
    """The shapes of ``model``'s parameters as the optimizer routes them (``param_groups(split_matrices=True)``)."""
    mats, params, names = [], [], []
    for g in param_groups(model, split_matrices=True):
        for j, p in enumerate(g["params"]):
            params.append(tuple(p.shape))
            if g["matrix"]:
                mats.append((int(p.shape[0]), int(math.prod(p.shape[1:]))))
                names.append((g.get("param_names") or [""] * len(g["params"]))[j])
    return Shapes(mats, params, names)


def model_shapes(name: str) -> Shapes:
    """Shapes of the named entry of :data:`SHAPES` (or a ``model_config`` preset name), built on the meta device."""
    preset, overrides = SHAPES.get(name, (name, {}))
    with torch.device("meta"):
        return shapes_of(Transformer(model_config(preset, **overrides)))


def _muon_ddp(mats: list[tuple[int, int]], world: int) -> Comm:
    owner = assign_owners([ns_flops(r, c) for r, c in mats], world)
    share = [0] * world
    for (r, c), o in zip(mats, owner):
        share[o] += r * c
    width = max(share) * 2  # bf16
    return Comm([Collective("all_gather_into_tensor", world, world * width, (world - 1) * width)])


def _blocks_rows(mats: list[tuple[int, int]], shards: int) -> list[list[int]]:
    """Elements each of ``shards`` holders has of each matrix under FSDP2's ``Shard(0)`` (row blocks)."""
    return [[n * c for n in shard_rows(r, shards)] for r, c in mats]


@functools.lru_cache(maxsize=None)
def _tp_block_shapes(r: int, c: int, rowwise: bool, dp: int, tp: int) -> tuple[tuple[int, int], ...]:
    """Local shapes of an ``r × c`` matrix's blocks on a ``(dp, tp)`` mesh, holder ``d·tp + t``, from torch's own
    shard arithmetic (layers repeat, so this is cached)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import _StridedShard

    pl = (Shard(0), Shard(1)) if rowwise else (_StridedShard(0, split_factor=tp), Shard(0))
    return tuple(tuple(_compute_local_shape_and_global_offset((r, c), (dp, tp), [d, t], pl)[0])
                 for d in range(dp) for t in range(tp))


def _blocks_tp(mats: list[tuple[int, int]], names: list[str], dp: int,
               tp: int) -> tuple[list[list[int]], list[list[int]]]:
    """FSDP2 x TP on a ``(dp, tp)`` mesh (holder group rank ``d·tp + t``): colwise matrices (qkv, up, gate)
    ``(_StridedShard(0, tp), Shard(0))``, rowwise ones (proj, down) ``(Shard(0), Shard(1))``, blocks from torch's
    own shard arithmetic. Returns the elements and the local rows of every holder's block."""
    numel, rows = [], []
    for (r, c), name in zip(mats, names):
        rowwise = name.endswith(("proj.weight", "down.weight"))
        shapes = _tp_block_shapes(r, c, rowwise, dp, tp)
        numel.append([a * b for a, b in shapes])
        rows.append([a if rowwise else 0 for a, _ in shapes])  # rows whose means need the tp group (rowwise)
    return numel, rows


def _muon_sharded(mats: list[tuple[int, int]], shards: int, replicas: int, normuon: bool,
                  blocks: list[list[int]] | None = None, row_sums: list[list[int]] | None = None,
                  tp: int = 1, bucket_mb: float | None = None) -> Comm:
    """Two all-to-alls per bucket in each holder group (+ the all-gather over replicas); busiest rank of the job.

    ``blocks[i][s]``: elements holder ``s`` has of matrix ``i`` (default: FSDP2 row blocks). Buckets and owners
    as ``_matrix_dist._sharded``: :func:`bucketize` by bytes per owner rank, LPT per bucket with the load carried
    over; the all-to-alls are issued pipelined (in 0, in 1, back 0, in 2, back 1, ..., back B-1), listed in that
    order. Each collective's ``buffer`` is its largest receive buffer over the ranks; its ``wire`` is what the
    rank sending the most over the whole step sends in it, so ``Comm.wire`` is that rank's total.
    ``row_sums[i][s]``: rows of a column-split matrix holder ``s`` has (NorMuon's row means: one all-reduce
    over the tp group)."""
    blocks = blocks or _blocks_rows(mats, shards)
    metas = [MatrixMeta(r, c, "local") for r, c in mats]
    ranks = shards * replicas
    load = [0] * ranks
    ins, backs = [], []  # per bucket: receive buffer of the busiest rank, bytes each rank sends
    gather = [0] * ranks
    for b in bucketize(metas, bucket_mb, ranks):
        owner = assign_owners([ns_flops(*mats[i]) for i in b], ranks, load)
        recv_in = recv_back = 0
        sent_in, sent_back = [0] * ranks, [0] * ranks
        issued = False
        for rep in range(replicas):
            handled = [i for i, o in zip(b, owner) if o // shards == rep]
            issued |= bool(handled)
            for s in range(shards):
                me = rep * shards + s
                mine = [i for i, o in zip(b, owner) if o == me]
                # 1) an owner receives its whole matrices; sends its blocks of the others in its replica's set
                recv1 = sum(mats[i][0] * mats[i][1] for i in mine) * 2
                keep1 = sum(blocks[i][s] for i in mine) * 2
                sent_in[me] = sum(blocks[i][s] for i in handled) * 2 - keep1
                # 2) every rank receives its block of every matrix its replica handled; an owner sends the rest
                recv2 = sum(blocks[i][s] for i in handled) * 2
                sent_back[me] = recv1 - keep1
                recv_in, recv_back = max(recv_in, recv1), max(recv_back, recv2)
                gather[me] += recv2
        if issued:
            ins.append((recv_in, sent_in))
            backs.append((recv_back, sent_back))
    # wire: the rank that sends the most over the whole step (buffers: the largest of each collective)
    total = [sum(x[1][r] for x in ins + backs) for r in range(ranks)]
    busiest = max(range(ranks), key=lambda r: (total[r], -r))
    order = []
    for k in range(len(ins)):  # pipelined issue order
        order.append(ins[k])
        if k:
            order.append(backs[k - 1])
    order += backs[-1:]
    comm = Comm([Collective("all_to_all_single", shards, buf, sent[busiest]) for buf, sent in order])
    if replicas > 1:
        width = max(gather)
        comm.collectives.append(Collective("all_gather_into_tensor", replicas, replicas * width,
                                           (replicas - 1) * width))
    if normuon:
        n = len(mats) * 4
        comm.collectives.append(Collective("all_reduce", shards, n, 2 * (shards - 1) * n // shards))
        if row_sums and any(any(r) for r in row_sums):
            n = max(sum(r[s] for r in row_sums) for s in range(shards)) * 4
            comm.collectives.append(Collective("all_reduce", tp, n, 2 * (tp - 1) * n // tp))
    return comm


def _dion_sharded(mats: list[tuple[int, int]], shards: int, rank_fraction: float, power_iters: int) -> Comm:
    """Dion under FSDP2/HSDP (``dion.py``'s ``_power_step``): per power iteration two packed float32
    all-reduces over the shard group, of ``Σ k_i·r_i`` (the sketches ``S·P``, ``k = sketch_rows(r)``) and
    ``Σ (r_i + n_i)·r_i`` elements (the Gram matrices ``P₁ᵀP₁`` and ``Y = Bᵀ·P₁``), ``r_i = dion_rank(m_i, n_i,
    rank_fraction)``. Every rank of the group sends ``2(S-1)/S`` of each buffer (ring all-reduce)."""
    ranks = [dion_rank(m, n, rank_fraction) for m, n in mats]
    sketch = sum(sketch_rows(r) * r for r in ranks) * 4
    gram = sum((r + n) * r for r, (_, n) in zip(ranks, mats)) * 4
    one = [Collective("all_reduce", shards, b, 2 * (shards - 1) * b // shards) for b in (sketch, gram)]
    return Comm(one * power_iters)


def optimizer_comm(optimizer: str, strategy: str, shapes: Shapes, world: int, shards: int | None = None,
                   tp: int = 1, bucket_mb: float | None = None, rank_fraction: float = 1.0,
                   power_iters: int = 1) -> Comm:
    """Collectives one ``optimizer.step()`` issues on ``world`` ranks (HSDP: ``shards`` per replica).

    ``tp > 1`` (``strategy="fsdp2"``, Muon family): FSDP2 x TP on a ``(world/tp, tp)`` mesh with every matrix
    tensor-parallel (qkv, up, gate colwise; proj, down rowwise; see :func:`_blocks_tp`): each matrix has all
    ``world`` ranks as holders, so the exchange is the FSDP2 one with those blocks, and NorMuon adds one
    all-reduce of the rowwise matrices' row sums over the tp group. ``bucket_mb``: the exchange's bucket size
    (``_matrix_dist.BUCKET_MB`` when ``None``). AdaMuon issues NorMuon's collectives (the same exchange and one
    all-reduce of ``‖Ô‖²_F`` per sharded matrix, float32). ``rank_fraction`` / ``power_iters``: Dion's (see
    :func:`_dion_sharded`); DDP replicas need no communication for Dion. Under tensor parallelism AdaMuon and
    Dion refuse the rowwise (``Shard(1)``) matrices when built and SOAP is not modelled: all three raise here."""
    if optimizer not in OPTIMIZERS or strategy not in STRATEGIES:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS} and strategy one of {STRATEGIES}, got "
                         f"{optimizer!r}, {strategy!r}")
    if tp != 1:
        if strategy != "fsdp2" or optimizer not in TP_OPTIMIZERS or tp < 1 or world % tp:
            raise ValueError(f"tensor parallelism (tp={tp}) is modelled for FSDP2 x TP with {TP_OPTIMIZERS}, tp "
                             f"dividing the world ({world}); got {optimizer!r} under {strategy!r}")
        if optimizer == "adamw":
            return Comm()
        if len(shapes.names) != len(shapes.matrices):
            raise ValueError("tensor parallelism needs the matrices' names (shapes_of records them)")
        numel, rows = _blocks_tp(shapes.matrices, shapes.names, world // tp, tp)
        return _muon_sharded(shapes.matrices, world, 1, optimizer != "muon", numel, rows, tp, bucket_mb)
    if strategy == "hsdp":
        shards = shards or min(GPUS_PER_NODE, world)
        if world % shards:
            raise ValueError(f"HSDP: world {world} is not a multiple of the shard group size {shards}")
    else:
        shards = world
    replicas = world // shards if strategy == "hsdp" else 1
    if optimizer == "adamw" or world == 1:
        return Comm()
    if optimizer in ("muon", "normuon", "adamuon"):
        if strategy == "ddp":
            return _muon_ddp(shapes.matrices, world)
        return _muon_sharded(shapes.matrices, shards, replicas, optimizer != "muon", bucket_mb=bucket_mb)
    if optimizer == "dion":
        if not 0.0 < rank_fraction <= 1.0 or isinstance(power_iters, bool) or not isinstance(power_iters, int) \
                or power_iters < 1:
            raise ValueError(f"dion: rank_fraction must be in (0, 1] and power_iters an integer >= 1, got "
                             f"rank_fraction={rank_fraction!r}, power_iters={power_iters!r}")
        if strategy == "ddp" or shards == 1:
            return Comm()
        return _dion_sharded(shapes.matrices, shards, rank_fraction, power_iters)
    # soap: one DTensor all-gather of each float32 gradient over the shard group
    if strategy == "ddp" or shards == 1:
        return Comm()
    return Comm([Collective("all_gather (DTensor)", shards, math.prod(s) * 4, math.prod(s) * 4 * (shards - 1) // shards)
                 for s in shapes.params])


def grad_sync_wire(strategy: str, shapes: Shapes, world: int, shards: int | None = None, tp: int = 1) -> int:
    """Bytes each rank sends for the strategy's own parameter/gradient traffic per step (see the docstring).
    ``tp > 1`` (FSDP2 x TP): FSDP2's traffic over the ``world/tp`` dp ranks on a tp rank's parameters (the
    matrix-rule matrices split ``tp`` ways, the rest replicated over tp); the activations' tensor-parallel
    traffic depends on the batch and is not included."""
    p = shapes.n_params
    if tp != 1:
        mat = sum(r * c for r, c in shapes.matrices)
        local_p = mat // tp + (p - mat)
        dp = world // tp
        return (dp - 1) * local_p * (2 + 2 + 4) // dp
    if strategy == "ddp":
        return 2 * (world - 1) * p * 4 // world
    shards = world if strategy == "fsdp2" else (shards or min(GPUS_PER_NODE, world))
    replicas = world // shards
    within = (shards - 1) * p * (2 + 2 + 4) // shards  # bf16 all-gather x2, fp32 reduce-scatter
    across = 2 * (replicas - 1) * (p * 4 // shards) // replicas
    return within + across


def _size(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n < 1e10 else f"{n / 1e9:,.1f} GB"


TP = GPUS_PER_NODE  # tensor-parallel rows: tp over one node's GPUs
DION_LOW = 1 / 16  # the second Dion column's rank_fraction
COLUMNS = (("adamw", {}), ("muon", {}), ("normuon", {}), ("soap", {}), ("dion", {}),
           ("dion r/16", {"rank_fraction": DION_LOW}))  # AdaMuon ≡ NorMuon (validated)


def _row(strategy: str, shapes: Shapes, w: int) -> dict[str, Comm | None]:
    """Every column's :class:`Comm` for one row; ``None`` where the optimizer does not run (tensor parallel)."""
    tp = TP if strategy == f"fsdp2×tp{TP}" else 1
    out: dict[str, Comm | None] = {}
    for col, kw in COLUMNS:
        name = col.split()[0]
        if tp > 1 and name not in TP_OPTIMIZERS:
            out[col] = None
        else:
            out[col] = optimizer_comm(name, "fsdp2" if tp > 1 else strategy, shapes, w, tp=tp, **kw)
    return out


def table(models: list[str], gpus: list[int], tp_gpus: list[int] = ()) -> tuple[str, dict]:
    """The markdown table and ``{(model, strategy, GPUs): {"sync": bytes, column: bytes or None}}``."""
    bad = [w for w in tp_gpus if w % TP]
    if bad:
        raise ValueError(f"tp GPUs {bad} are not multiples of tp={TP}")
    data: dict = {}
    lines = ["| model | params | strategy | GPUs | grad sync | AdamW | Muon | NorMuon / AdaMuon | SOAP | "
             "Dion (r = min(m, n)) | Dion (r = min(m, n)/16) |",
             "|---|---:|---|---:|---:|---|---|---|---|---|---|"]
    rows = [(s, w) for s in STRATEGIES for w in gpus] + [(f"fsdp2×tp{TP}", w) for w in tp_gpus]
    for name in models:
        shapes = model_shapes(name)
        for strategy, w in rows:
            row = _row(strategy, shapes, w)
            tp = TP if "tp" in strategy else 1
            sync = grad_sync_wire("fsdp2" if tp > 1 else strategy, shapes, w, tp=tp)
            data[(name, strategy, w)] = {"sync": sync, **{o: c and c.wire for o, c in row.items()}}
            cells = ["—" if c is None else f"{c.count} / {_size(c.wire)} ({100 * c.wire / sync:.1f}%)" if c.count
                     else "0" for c in row.values()]
            lines.append(f"| {name} | {shapes.n_params / 1e9:.2f}B | {strategy} | {w} | {_size(sync)} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", data


def plot(data: dict, models: list[str], gpus: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models) + 2.7, 3.8), sharey=True, squeeze=False)
    styles = {"ddp": "-", "fsdp2": "--", "hsdp": ":"}
    series = {"muon": ("C0", "Muon (NorMuon: + 4 B/matrix)"), "soap": ("C2", "SOAP"), "dion": ("C3", "Dion"),
              "dion r/16": ("C1", "Dion r/16"), "sync": ("0.5", "grad sync")}
    for ax, name in zip(axes[0], models):
        for strategy, ls in styles.items():
            for key, (color, label) in series.items():
                ys = [data[(name, strategy, w)][key] / 1e6 for w in gpus]
                if not any(ys):  # nothing sent (SOAP under DDP)
                    continue
                ax.plot(gpus, ys, ls, color=color, label=f"{label}, {strategy}", marker="o", ms=2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("GPUs")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("MB sent per rank per step\n(busiest rank)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=6)
    fig.tight_layout(rect=(0, 0, 1 - 2.7 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("--gpus", default="8,32,128,512,1024")
    ap.add_argument("--tp-gpus", default="64,128,512,1024", help=f"GPUs of the FSDP2 x TP (tp={TP}) rows")
    ap.add_argument("--plot-gpus", default="8,16,32,64,128,256,512,1024")
    ap.add_argument("--plot-models", default="124m,7b,70b")
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models + args.plot_models.split(",") if m not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {', '.join(SHAPES)}")
    gpus = [int(g) for g in args.gpus.split(",")]
    tp_gpus = [int(g) for g in args.tp_gpus.split(",") if g]
    text, _ = table(models, gpus, tp_gpus)
    head = ("Communication per `optimizer.step()`, per rank (busiest rank): `collectives / bytes sent (% of the "
            "strategy's own gradient synchronisation)`; HSDP shards over 8 GPUs per node. D-Muon communicates "
            "like Muon, SF-NorMuon and AdaMuon like NorMuon. Dion at its defaults (one power iteration, "
            "rank_fraction 1: r = min(m, n) per matrix) and at rank_fraction 1/16. "
            f"`fsdp2×tp{TP}`: FSDP2 over `GPUs/{TP}` ranks × tensor parallelism over {TP} (qkv, up, gate colwise; "
            "proj, down rowwise); its grad sync is FSDP2's over the dp ranks only (the activations' TP traffic "
            "depends on the batch); SOAP is not modelled there, Dion and AdaMuon refuse rowwise (`Shard(1)`) "
            "matrices (—). `python benchmarks/comm_model.py` (model in its docstring; validated at 2 and 4 CPU "
            "ranks in `comm_model_validation.md`).\n\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "comm_model.md").write_text(head + text)
    pg = [int(g) for g in args.plot_gpus.split(",")]
    pm = [m for m in args.plot_models.split(",") if m]
    _, pdata = table(pm, pg)
    plot(pdata, pm, pg, RESULTS / "comm_model.png")
    print(head + text)


if __name__ == "__main__":
    main()
