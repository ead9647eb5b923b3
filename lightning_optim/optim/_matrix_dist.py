"""Orthogonalising many matrices once each, on one process, across DDP replicas, FSDP2 shards or tensor parallelism.

Every matrix optimizer hands :func:`orthogonalize` its momentum updates as *local* 2-D tensors (a DTensor's
local block, viewed ``(local_rows, local_cols)``) with a :class:`MatrixMeta` saying how the parameter is laid out:

``local``       plain tensor, single process (or ``distributed=False``): batch by shape, run Newton–Schulz.
``replicated``  plain tensor (or a ``Replicate`` DTensor) on ``world > 1`` ranks, e.g. DDP: every rank holds the
                same update. Each matrix gets an *owner* rank (greedy balance of Newton–Schulz flops, largest
                first, the same on every rank); owners orthogonalise their share batched by shape, and a single
                ``all_gather_into_tensor`` of the packed bf16 results gives every rank every result.
``sharded``     a DTensor split into rectangular blocks over its *holder group* (the ranks of the mesh dimensions
                that shard it). FSDP2 (``Shard(0)`` on a 1-D mesh) gives row blocks; tensor parallelism gives row
                blocks (``ColwiseParallel``: ``Shard(0)``) or column blocks (``RowwiseParallel``: ``Shard(1)``);
                FSDP2 on top of TP on a ``(dp, tp)`` mesh gives ``(Shard(0), Shard(1))`` (row × column blocks) or
                ``(_StridedShard(0), Shard(0))`` (row blocks, dp inside each tp chunk). Each rank's block is
                computed from the placements (torch's own ``_compute_local_shape_and_global_offset``, checked
                against the local tensor and required to tile the matrix). One ``all_to_all_single`` over the
                holder group sends every block to the matrix's owner, the owner assembles the whole matrix,
                orthogonalises it (batched by shape), and a second ``all_to_all_single`` sends each rank its
                block of the result. Each matrix is orthogonalised exactly once across the holders, and no
                collective runs inside the Newton–Schulz iterations. A 2-D mesh whose two dimensions both shard
                uses the holder group of the whole mesh (its process group when it spans the job, else
                ``DeviceMesh._flatten``).
                Replication on top (HSDP: ``fully_shard`` on a ``(replicate, shard)`` mesh, placements
                ``(Replicate(), Shard(0))``): the ``R`` replicas of each block hold the same update (FSDP2
                all-reduces the gradient across the replicate dimension), so the matrices are split over all
                ``R·S`` ranks: matrix ``i`` gets one owner ``(r, s)``; the ranks of replica ``r`` run the two
                all-to-alls for the matrices replica ``r`` owns, within their holder group, and one
                ``all_gather_into_tensor`` over the replicate group then gives every rank its block of every
                result. Each matrix is still orthogonalised once per step in the whole job, for one extra
                collective.

Owners are assigned by Newton–Schulz cost, longest first, to the least-loaded rank (Graham's LPT rule, within
4/3 of the optimal makespan), the same on every rank; an owner runs all its matrices of one shape as one
batched call.

Overlap. The ``sharded`` exchange is cut into buckets of about ``BUCKET_MB`` MiB of bf16 matrices per owner
rank (module constant, default 64: a bucket holds up to ``64 MiB × ranks``, and at least one matrix per rank so
that every owner orthogonalises in every bucket; matrices in the given order, a bucket closes when the next
matrix would overflow it and it already has one matrix per rank). Owners are assigned bucket by bucket, LPT within each
bucket starting from the load of the buckets before, so each bucket is spread over the ranks and the whole step
stays balanced (one bucket: the same owners as without bucketing). The all-to-alls are
issued with ``async_op=True``: bucket ``k+1``'s inbound all-to-all is already in flight while bucket ``k`` is
orthogonalised, and bucket ``k``'s return all-to-all is in flight while bucket ``k+1`` is waited on and
orthogonalised; every return is waited on before the results are read (``B`` buckets: ``2·B`` all-to-alls, and
for HSDP still one all-gather). On NCCL the collectives run on the communicator's own stream, so the compute
stream's Newton–Schulz overlaps them without a side stream; on gloo they run on the process group's worker
threads. Newton–Schulz is per matrix, so bucketing changes which matrices share an exchange, never a result.
:func:`recording` collects the order of issue / wait / Newton–Schulz events (tests read it).

Column-sharded matrices (a placement splitting dimension 1) reach the optimizer as local column blocks, so an
update that reads whole rows (NorMuon's per-row second moment, :func:`row_mean_sq`) or norms
(:func:`global_sq_norms`) must complete them across the ranks; callers that do say so with
``matrix_meta(..., column_shards=True)``, and the others get a ``ValueError`` naming the parameter and its
placements when the optimizer is built.

Payloads travel as bf16 (the kernel casts to bf16 first, so this loses nothing) reinterpreted as uint8 so
any backend (gloo included) moves them. Results are bf16, shaped like the local input.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_optim._dtensor import DTensor, Replicate, local, shard_dim
from lightning_optim.optim.newton_schulz import ns_flops

__all__ = ["MatrixMeta", "matrix_meta", "orthogonalize", "global_sq_norms", "row_mean_sq", "packed_all_reduce", "local",
           "CommCounter", "shard_rows", "assign_owners", "bucketize", "recording", "BUCKET_MB"]

BUCKET_MB = 64.0
"""Target size of one exchange bucket of the ``sharded`` layout, in MiB of bf16 full matrices per owner rank."""

Block = tuple[int, int, int, int]  # (row offset, rows, column offset, columns) in the global 2-D view


@dataclass(frozen=True)
class MatrixMeta:
    """How one matrix parameter is laid out: global 2-D view ``rows × cols`` and the distribution kind.

    ``blocks`` (``sharded`` only): the block of each rank of ``group``, in group-rank order; ``None`` means
    row blocks in ``torch.chunk`` layout (FSDP2 ``Shard(0)``). ``col_group``/``col_world``: the ranks holding
    different columns of the same rows (``None``/1 unless a placement splits dimension 1)."""

    rows: int
    cols: int
    kind: str  # "local" | "replicated" | "sharded"
    group: Any = None  # the process group that shares it (None: default group); "sharded": the holder group
    world: int = 1
    rank: int = 0
    replicate_group: Any = None  # HSDP: the ranks that hold the same block (None: no replication)
    replicas: int = 1
    replica: int = 0
    blocks: tuple[Block, ...] | None = None
    col_group: Any = None
    col_world: int = 1

    def block(self, s: int) -> Block:
        """The block group rank ``s`` holds (the whole matrix unless ``sharded``)."""
        if self.kind != "sharded":
            return (0, self.rows, 0, self.cols)
        if self.blocks is not None:
            return self.blocks[s]
        sizes = shard_rows(self.rows, self.world)
        return (sum(sizes[:s]), sizes[s], 0, self.cols)

    def block_numel(self, s: int) -> int:
        b = self.block(s)
        return b[1] * b[3]

    @property
    def local_shape(self) -> tuple[int, int]:
        """``(local_rows, local_cols)``: the 2-D view of this rank's local data."""
        b = self.block(self.rank)
        return (b[1], b[3])

    def shard_sizes(self) -> list[int]:
        """Rows per holder rank (row-block layouts)."""
        return [self.block(s)[1] for s in range(self.world)]

    def bucket_key(self) -> tuple:
        """Matrices with equal keys are exchanged together (same kind and the same process groups)."""
        return (self.kind, _group_key(self.group), _group_key(self.replicate_group))


def _group_key(group: Any) -> Any:
    return None if group is None else getattr(group, "group_name", id(group))


def shard_rows(rows: int, world: int) -> list[int]:
    """Rows per rank under ``Shard(0)`` (``torch.chunk`` semantics, as DTensor and FSDP2 use)."""
    chunk = -(-rows // world) if world else rows
    return [max(0, min(rows, (r + 1) * chunk) - r * chunk) for r in range(world)]


def matrix_meta(p: Tensor, name: str, distributed: bool | None = None, *, column_shards: bool = False) -> MatrixMeta:
    """The layout of parameter ``p`` (named ``name`` in errors). Raises ``ValueError`` for what cannot be handled.

    ``column_shards``: the caller's update completes per-row quantities and norms across column blocks (see the
    module docstring); without it a placement that splits dimension 1 is refused."""
    if p.ndim < 2:
        raise ValueError(f"parameter {name!r} with shape {tuple(p.shape)} is routed to the matrix rule but has fewer "
                         "than 2 dimensions; route it to AdamW (group 'matrix': False)")
    if p.is_complex():
        raise ValueError(f"parameter {name!r} is complex; the matrix rule supports real parameters only")
    if p.numel() == 0:
        raise ValueError(f"parameter {name!r} is empty (shape {tuple(p.shape)})")
    rows, cols = int(p.shape[0]), int(math.prod(p.shape[1:]))
    if isinstance(p, DTensor):
        return _dtensor_meta(p, name, rows, cols, column_shards)
    if distributed is not False and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return MatrixMeta(rows, cols, "replicated", None, dist.get_world_size(), dist.get_rank())
    return MatrixMeta(rows, cols, "local")


def _dtensor_meta(p: Tensor, name: str, rows: int, cols: int, column_shards: bool) -> MatrixMeta:
    """Any mesh whose placements are ``Replicate``, ``Shard(0|1)`` or ``_StridedShard(0|1)`` (see the module
    docstring); everything else is refused naming the parameter and its placements."""
    mesh, placements = p.device_mesh, tuple(p.placements)
    where = f"parameter {name!r} is a DTensor with placements {placements} on a {mesh.ndim}-D device mesh"
    dims = []
    for pl in placements:
        d = shard_dim(pl)
        if d is None and not isinstance(pl, Replicate):
            raise ValueError(f"{where}; the matrix rule supports Shard, _StridedShard (FSDP2 over tensor "
                             f"parallelism) and Replicate placements, not {pl!r}. Route it to AdamW.")
        dims.append(d)
    if any(d is not None and d > 1 for d in dims) or (p.ndim > 2 and any(d is not None and d > 0 for d in dims)):
        raise ValueError(f"{where}; the matrix rule views it as shape[0] x prod(shape[1:]), so only dimension 0 "
                         "of a >2-D parameter and dimensions 0 and 1 of a matrix may be sharded. Route it to AdamW.")
    col_dims = [i for i, d in enumerate(dims) if d == 1]
    if col_dims and not column_shards:
        raise ValueError(f"{where}: it is split along its columns (Shard(1), e.g. RowwiseParallel tensor "
                         "parallelism), which this optimizer's update does not support (it reads whole local "
                         "rows). Route it to AdamW or reshard it (Shard(0)).")
    if len(col_dims) > 1:
        raise ValueError(f"{where}: more than one mesh dimension splits its columns; the matrix rule supports at "
                         "most one. Route it to AdamW.")
    shard_mesh_dims = [i for i, d in enumerate(dims) if d is not None]
    rep_mesh_dims = [i for i, d in enumerate(dims) if d is None]
    rg, replicas, replica = _group_of(mesh, rep_mesh_dims, where)
    if not shard_mesh_dims:
        if replicas == 1:
            return MatrixMeta(rows, cols, "local")
        return MatrixMeta(rows, cols, "replicated", rg, replicas, replica)
    sg, world, rank = _group_of(mesh, shard_mesh_dims, where)
    blocks = _blocks(p, mesh, placements, sg, rows, cols, where)
    local_2d = (int(p._local_tensor.shape[0]), int(math.prod(p._local_tensor.shape[1:])))
    if (blocks[rank][1], blocks[rank][3]) != local_2d:
        raise ValueError(f"{where}: its local tensor is {local_2d[0]} x {local_2d[1]}, but the placements (torch.chunk "
                         f"layout) give {blocks[rank][1]} x {blocks[rank][3]}; uneven custom sharding is not supported")
    if world == 1:
        if replicas == 1:
            return MatrixMeta(rows, cols, "local")
        return MatrixMeta(rows, cols, "replicated", rg, replicas, replica)
    cg, cw = None, 1
    if col_dims:
        cg, cw, _ = _group_of(mesh, col_dims, where)
    return MatrixMeta(rows, cols, "sharded", sg, world, rank, rg if replicas > 1 else None, replicas,
                      replica if replicas > 1 else 0, blocks, cg, cw)


def _group_of(mesh: Any, mesh_dims: list[int], where: str) -> tuple[Any, int, int]:
    """The process group spanning ``mesh_dims`` of ``mesh`` (through this rank), its size and this rank's rank."""
    if not mesh_dims:
        return None, 1, 0
    if len(mesh_dims) == 1:
        pg = mesh.get_group(mesh_dims[0])
    elif len(mesh_dims) == mesh.ndim and mesh.size() == dist.get_world_size():
        pg = dist.group.WORLD
    else:
        names = mesh.mesh_dim_names
        if names is None:
            raise ValueError(f"{where}: it is sharded over mesh dimensions {mesh_dims} of a mesh without dimension "
                             "names, which cannot be flattened into one group; name the mesh dimensions "
                             "(init_device_mesh(..., mesh_dim_names=...)).")
        pg = mesh[tuple(names[d] for d in mesh_dims)]._flatten().get_group()
    return pg, dist.get_world_size(pg), dist.get_rank(pg)


def _blocks(p: Tensor, mesh: Any, placements: tuple, pg: Any, rows: int, cols: int, where: str) -> tuple[Block, ...]:
    """Each holder's block (group-rank order), from torch's shard arithmetic; they must tile the matrix."""
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    grid = mesh.mesh
    out = []
    for g in dist.get_process_group_ranks(pg):
        coord = [int(c) for c in (grid == g).nonzero()[0].tolist()]
        shape, off = _compute_local_shape_and_global_offset(tuple(p.shape), tuple(mesh.shape), coord, placements)
        nr, nc = int(shape[0]), int(math.prod(shape[1:]))
        c0 = int(off[1]) if p.ndim == 2 else 0
        out.append((int(off[0]) if nr else 0, nr, c0 if nc else 0, nc))
    if not _tiles(out, rows, cols):
        raise ValueError(f"{where}: its shards are not contiguous blocks that tile the matrix exactly once (a strided "
                         "layout); the matrix rule cannot assemble it. Route it to AdamW.")
    return tuple(out)


def _tiles(blocks: Sequence[Block], rows: int, cols: int) -> bool:
    """The non-empty blocks lie inside ``rows × cols``, do not overlap, and their areas add up to it."""
    full = [b for b in blocks if b[1] and b[3]]
    if any(r0 < 0 or c0 < 0 or r0 + nr > rows or c0 + nc > cols for r0, nr, c0, nc in full):
        return False
    if sum(nr * nc for _, nr, _, nc in full) != rows * cols:
        return False
    for j, (a0, an, b0, bn) in enumerate(full):
        for c0, cn, d0, dn in full[j + 1:]:
            if a0 < c0 + cn and c0 < a0 + an and b0 < d0 + dn and d0 < b0 + bn:
                return False
    return True


# ----------------------------------------------------------------------------------------------------------


class CommCounter:
    """Counts collectives and Newton–Schulz launches this module issues (read by benchmarks/comm_count.py)."""

    collectives: dict[str, int] = defaultdict(int)
    ns_calls = 0
    ns_matrices = 0

    @classmethod
    def reset(cls) -> None:
        cls.collectives = defaultdict(int)
        cls.ns_calls = 0
        cls.ns_matrices = 0


_events: list[tuple[str, int]] | None = None


@contextlib.contextmanager
def recording() -> Iterator[list[tuple[str, int]]]:
    """Collect the ``sharded`` exchange's events in order while the block runs: ``("issue", k)`` (bucket ``k``'s
    inbound all-to-all issued), ``("wait", k)`` (its data arrived), ``("ns", k)`` (its Newton–Schulz done),
    ``("issue_back", k)`` and ``("wait_back", k)`` for the return all-to-all. Off (no cost) outside the block."""
    global _events
    prev, _events = _events, []
    try:
        yield _events
    finally:
        _events = prev


def _record(event: str, k: int) -> None:
    if _events is not None:
        _events.append((event, k))


NSFn = Callable[[Tensor], Tensor]


def batched_ns(mats: Sequence[Tensor], ns_fn: NSFn) -> list[Tensor]:
    """Newton–Schulz of each matrix, one batched call per distinct shape; results bf16, same order."""
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, m in enumerate(mats):
        by_shape[tuple(m.shape)].append(i)
    out: list[Tensor] = [None] * len(mats)  # type: ignore[list-item]
    for shape, idx in by_shape.items():
        stack = torch.empty((len(idx), *shape), dtype=torch.bfloat16, device=mats[idx[0]].device)
        torch._foreach_copy_(list(stack.unbind(0)), [mats[i] for i in idx])
        res = ns_fn(stack)
        CommCounter.ns_calls += 1
        CommCounter.ns_matrices += len(idx)
        for j, i in enumerate(idx):
            out[i] = res[j]
    return out


def assign_owners(costs: Sequence[int], world: int, load: list[int] | None = None) -> list[int]:
    """Owner rank of each job: longest-processing-time first, each to the least-loaded rank (ties: lowest rank).

    Graham's LPT rule (1969): the busiest rank's load is at most ``4/3 - 1/(3·world)`` times the optimal
    makespan. Deterministic, so every rank computes the same assignment without communicating. ``load``: the
    ranks' load so far (updated in place), so consecutive buckets continue one balance instead of each
    starting from rank 0."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    load = [0] * world if load is None else load
    owner = [0] * len(costs)
    for i in order:
        r = min(range(world), key=lambda k: (load[k], k))
        owner[i] = r
        load[r] += costs[i]
    return owner


def bucketize(metas: Sequence[MatrixMeta], bucket_mb: float | None = None, ranks: int = 1) -> list[list[int]]:
    """Consecutive runs of matrix indices, each about ``bucket_mb`` MiB of bf16 full matrices per owner rank
    (``BUCKET_MB`` when ``None``), i.e. up to ``ranks × bucket_mb`` MiB in all, and at least ``ranks`` matrices
    (but the last), so every owner has work in every bucket and Newton–Schulz runs in parallel across the
    ranks: a bucket closes when the next matrix would overflow it and it already holds ``ranks`` matrices. The
    same on every rank."""
    limit = (BUCKET_MB if bucket_mb is None else bucket_mb) * 2 ** 20 * ranks
    if not limit > 0:
        raise ValueError(f"bucket_mb must be positive, got {bucket_mb!r}")
    buckets: list[list[int]] = []
    size = 0.0
    for i, m in enumerate(metas):
        nbytes = 2 * m.rows * m.cols
        if not buckets or (size + nbytes > limit and len(buckets[-1]) >= ranks):
            buckets.append([])
            size = 0.0
        buckets[-1].append(i)
        size += nbytes
    return buckets


def _owners(metas: Sequence[MatrixMeta], world: int, load: list[int] | None = None) -> list[int]:
    """Owners of the matrices by Newton–Schulz cost (:func:`assign_owners`), identical on every rank."""
    return assign_owners([ns_flops(m.rows, m.cols) for m in metas], world, load)


def _as_bytes(t: Tensor) -> Tensor:
    return t.view(torch.uint8)  # bf16 bits as bytes: every backend (gloo included) moves uint8


def _replicated(mats: list[Tensor], metas: list[MatrixMeta], ns_fn: NSFn) -> list[Tensor]:
    pg = metas[0].group
    world, rank = metas[0].world, metas[0].rank
    owner = _owners(metas, world)
    mine = [i for i in range(len(mats)) if owner[i] == rank]
    results = batched_ns([mats[i] for i in mine], ns_fn)
    sizes = [0] * world
    for i, o in enumerate(owner):
        sizes[o] += metas[i].rows * metas[i].cols
    width = max(sizes)
    device = mats[0].device
    send = torch.empty(width, dtype=torch.bfloat16, device=device)
    if results:
        torch.cat([r.reshape(-1) for r in results], out=send[: sizes[rank]])
    recv = torch.empty(world * width, dtype=torch.bfloat16, device=device)
    dist.all_gather_into_tensor(_as_bytes(recv), _as_bytes(send), group=pg)
    CommCounter.collectives["all_gather_into_tensor"] += 1
    out: list[Tensor] = [None] * len(mats)  # type: ignore[list-item]
    offsets = [r * width for r in range(world)]
    for i, o in enumerate(owner):
        n = metas[i].rows * metas[i].cols
        out[i] = recv[offsets[o]: offsets[o] + n].view(metas[i].rows, metas[i].cols)
        offsets[o] += n
    return out


def _sharded(mats: list[Tensor], metas: list[MatrixMeta], ns_fn: NSFn, bucket_mb: float | None) -> list[Tensor]:
    """Block-sharded matrices (FSDP2, TP, FSDP2 × TP, or any of them with replicas); see the module docstring."""
    m0 = metas[0]
    world, rank, replicas, replica = m0.world, m0.rank, m0.replicas, m0.replica
    device = mats[0].device
    n = len(mats)
    # per bucket: one owner per matrix among all replicas x holder ranks; replica r handles the matrices it owns
    handled: list[list[int]] = [[] for _ in range(replicas)]
    jobs = []
    load = [0] * (world * replicas)  # carried from bucket to bucket: one balance over the whole step
    for b in bucketize(metas, bucket_mb, world * replicas):
        owner_global = _owners([metas[i] for i in b], world * replicas, load)
        for r in range(replicas):
            handled[r].extend(i for i, o in zip(b, owner_global) if o // world == r)
        mine = [(i, o % world) for i, o in zip(b, owner_global) if o // world == replica]
        if mine:
            jobs.append(([mats[i] for i, _ in mine], [metas[i] for i, _ in mine], [o for _, o in mine],
                         [i for i, _ in mine]))
    result: list[Tensor] = [None] * n  # type: ignore[list-item]
    for idx, res in zip((j[3] for j in jobs), _exchange_blocks([j[:3] for j in jobs], ns_fn)):
        for i, o in zip(idx, res):
            result[i] = o
    if replicas == 1:
        return result
    # every replica holds this rank's block of the matrices it handled: gather them across the replicas
    local_n = [m.block_numel(rank) for m in metas]
    sizes = [sum(local_n[i] for i in handled[r]) for r in range(replicas)]
    width = max(sizes)
    send = torch.zeros(width, dtype=torch.bfloat16, device=device)
    mine_flat = [result[i].reshape(-1) for i in handled[replica] if local_n[i]]
    if mine_flat:
        torch.cat(mine_flat, out=send[: sizes[replica]])
    recv = torch.empty(replicas * width, dtype=torch.bfloat16, device=device)
    dist.all_gather_into_tensor(_as_bytes(recv), _as_bytes(send), group=m0.replicate_group)
    CommCounter.collectives["all_gather_into_tensor"] += 1
    for r in range(replicas):
        off = r * width
        for i in handled[r]:
            k = local_n[i]
            result[i] = recv[off: off + k].view(metas[i].local_shape)
            off += k
    return result


def _all_to_all(recv: Tensor, send: Tensor, out_splits: list[int], in_splits: list[int], pg: Any) -> Any:
    CommCounter.collectives["all_to_all_single"] += 1
    return dist.all_to_all_single(_as_bytes(recv), _as_bytes(send), [2 * k for k in out_splits],
                                  [2 * k for k in in_splits], group=pg, async_op=True)


class _Bucket:
    """One bucket of the exchange on this rank: which blocks go where, and its buffers in flight."""

    def __init__(self, mats: list[Tensor], metas: list[MatrixMeta], owner: list[int]) -> None:
        self.mats, self.metas, self.owner = mats, metas, owner
        m0 = metas[0]
        self.pg, self.world, self.rank = m0.group, m0.world, m0.rank
        n = len(mats)
        # blocks of matrix i travel to owner[i], ordered by destination, then by i
        self.send_idx = [[i for i in range(n) if owner[i] == d] for d in range(self.world)]
        self.in_splits = [sum(metas[i].block_numel(self.rank) for i in self.send_idx[d]) for d in range(self.world)]
        self.mine = self.send_idx[self.rank]
        self.out_splits = [sum(metas[i].block_numel(s) for i in self.mine) for s in range(self.world)]

    def issue(self, k: int) -> None:
        device = self.mats[0].device
        send = torch.empty(sum(self.in_splits), dtype=torch.bfloat16, device=device)
        pieces = [self.mats[i].reshape(-1) for d in range(self.world) for i in self.send_idx[d] if self.mats[i].numel()]
        if pieces:
            torch.cat(pieces, out=send)
        self.recv = torch.empty(sum(self.out_splits), dtype=torch.bfloat16, device=device)
        self.send = send  # kept alive until the collective completes
        self.work = _all_to_all(self.recv, send, self.out_splits, self.in_splits, self.pg)
        _record("issue", k)

    def orthogonalize_and_return(self, k: int, ns_fn: NSFn) -> None:
        self.work.wait()
        _record("wait", k)
        device = self.recv.device
        full = []
        off = 0
        parts: dict[int, list[tuple[Block, Tensor]]] = {i: [] for i in self.mine}
        for s in range(self.world):
            for i in self.mine:
                b = self.metas[i].block(s)
                parts[i].append((b, self.recv[off: off + b[1] * b[3]]))
                off += b[1] * b[3]
        for i in self.mine:
            m = self.metas[i]
            if all(b[2] == 0 and b[3] == m.cols for b, _ in parts[i]):  # row blocks (tiling): one cat, by offset
                ordered = sorted(parts[i], key=lambda bx: bx[0][0])
                full.append(torch.cat([x.view(b[1], b[3]) for b, x in ordered], dim=0))
                continue
            whole = torch.empty(m.rows, m.cols, dtype=torch.bfloat16, device=device)
            for (r0, nr, c0, nc), x in parts[i]:
                if nr and nc:
                    whole[r0: r0 + nr, c0: c0 + nc] = x.view(nr, nc)
            full.append(whole)
        with torch.profiler.record_function(f"matrix_dist.newton_schulz[bucket {k}]"):  # named in profiler traces
            results = batched_ns(full, ns_fn)
        _record("ns", k)
        back = []
        for s in range(self.world):
            for j, i in enumerate(self.mine):
                r0, nr, c0, nc = self.metas[i].block(s)
                if nr and nc:
                    back.append(results[j][r0: r0 + nr, c0: c0 + nc].reshape(-1))
        send2 = torch.empty(sum(self.out_splits), dtype=torch.bfloat16, device=device)
        if back:
            torch.cat(back, out=send2)
        self.recv = self.work = None
        self.send = send2
        self.recv2 = torch.empty(sum(self.in_splits), dtype=torch.bfloat16, device=device)
        self.work2 = _all_to_all(self.recv2, send2, self.in_splits, self.out_splits, self.pg)
        _record("issue_back", k)

    def finish(self, k: int) -> list[Tensor]:
        self.work2.wait()
        _record("wait_back", k)
        out: list[Tensor] = [None] * len(self.mats)  # type: ignore[list-item]
        off = 0
        for d in range(self.world):
            for i in self.send_idx[d]:
                m = self.metas[i]
                cnt = m.block_numel(self.rank)
                out[i] = self.recv2[off: off + cnt].view(m.local_shape)
                off += cnt
        self.send = self.recv2 = self.work2 = None
        return out


def _exchange_blocks(jobs: list[tuple[list[Tensor], list[MatrixMeta], list[int]]], ns_fn: NSFn) -> list[list[Tensor]]:
    """Blocks to their owner (all-to-all), Newton–Schulz there, result blocks back (all-to-all), per bucket and
    pipelined: bucket ``k+1`` is issued before bucket ``k`` is waited on and orthogonalised.

    ``jobs``: per bucket, the matrices (this rank's blocks), their metas and their owner's rank in the holder
    group. Every rank of the holder group must pass the same buckets in the same order (with its own blocks)."""
    buckets = [_Bucket(*job) for job in jobs]
    if buckets:
        buckets[0].issue(0)
    for k, b in enumerate(buckets):
        if k + 1 < len(buckets):
            buckets[k + 1].issue(k + 1)
        b.orthogonalize_and_return(k, ns_fn)
    return [b.finish(k) for k, b in enumerate(buckets)]


def orthogonalize(mats: Sequence[Tensor], metas: Sequence[MatrixMeta], ns_fn: NSFn,
                  bucket_mb: float | None = None) -> list[Tensor]:
    """Newton–Schulz of every matrix (local 2-D views), each computed once across ranks; bf16 local results.

    ``bucket_mb``: size of the ``sharded`` layout's exchange buckets (``BUCKET_MB`` when ``None``)."""
    out: list[Tensor] = [None] * len(mats)  # type: ignore[list-item]
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, m in enumerate(metas):
        buckets[m.bucket_key()].append(i)
    for (kind, *_), idx in buckets.items():
        sub_m = [mats[i] for i in idx]
        sub_meta = [metas[i] for i in idx]
        if kind == "local":
            res = batched_ns(sub_m, ns_fn)
        elif kind == "replicated":
            res = _replicated(sub_m, sub_meta, ns_fn)
        else:
            res = _sharded(sub_m, sub_meta, ns_fn, bucket_mb)
        for j, i in enumerate(idx):
            out[i] = res[j]
    return out


def packed_all_reduce(tensors: Sequence[Tensor], group: Any) -> list[Tensor]:
    """Sum ``tensors`` (one dtype) over ``group`` with one ``all_reduce`` of their concatenation; returns the sums,
    shaped like the inputs (views of one buffer). Counted in :class:`CommCounter`."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    CommCounter.collectives["all_reduce"] += 1
    out, off = [], 0
    for t in tensors:
        out.append(flat[off: off + t.numel()].view(t.shape))
        off += t.numel()
    return out


def global_sq_norms(tensors: Sequence[Tensor], metas: Sequence[MatrixMeta]) -> list[Tensor]:
    """‖t‖²_F of each full matrix from local blocks: one all-reduce per holder group of sharded matrices (the
    holders' blocks are disjoint, so their sums add up; replicas, if any, hold the same blocks)."""
    if not tensors:
        return []
    sq = torch.stack([t.float().square().sum() for t in tensors])
    sharded = defaultdict(list)
    for i, m in enumerate(metas):
        if m.kind == "sharded":
            sharded[_group_key(m.group)].append(i)
    if sharded:
        sq = sq.clone()
        for idx in sharded.values():
            part = sq[idx].contiguous()
            dist.all_reduce(part, group=metas[idx[0]].group)
            CommCounter.collectives["all_reduce"] += 1
            sq[idx] = part
    return list(sq.unbind(0))


def row_mean_sq(tensors: Sequence[Tensor], metas: Sequence[MatrixMeta]) -> list[Tensor]:
    """``mean(t², dim=-1)`` over each *whole* row (``local_rows × 1``, fp32) from local blocks.

    A column-split matrix (``col_world > 1``) holds part of each row: the partial sums ``Σ_local t²`` are
    all-reduced over its column group (one all-reduce per group, all its matrices packed) and divided by the
    global column count. Other matrices hold whole rows: plain ``mean``, no communication."""
    out = [t.float().square().mean(dim=-1, keepdim=True) if t.shape[0] and t.shape[-1] else
           torch.zeros(t.shape[0], 1, dtype=torch.float32, device=t.device) for t in tensors]
    split = defaultdict(list)
    for i, m in enumerate(metas):
        if m.kind == "sharded" and m.col_world > 1:
            split[_group_key(m.col_group)].append(i)
    for idx in split.values():
        sums = [tensors[i].float().square().sum(dim=-1) for i in idx]
        flat = torch.cat(sums) if sums else torch.zeros(0)
        dist.all_reduce(flat, group=metas[idx[0]].col_group)
        CommCounter.collectives["all_reduce"] += 1
        off = 0
        for i in idx:
            k = tensors[i].shape[0]
            out[i] = (flat[off: off + k] / metas[i].cols).unsqueeze(-1)
            off += k
    return out
