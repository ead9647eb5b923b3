"""Collectives and Newton–Schulz calls per optimizer step under FSDP2 on 2 CPU ranks: ours vs torch.optim.Muon.

    torchrun --nproc_per_node=2 benchmarks/comm_count.py [--layers 6 --width 512 --vocab 8192]
    torchrun --nproc_per_node=2 benchmarks/comm_count.py --validate    # then with --nproc_per_node=4

``--validate`` measures, for AdamW, Muon, NorMuon, AdaMuon, SOAP and Dion (rank_fraction 1 and 1/16) under
DDP-style replicas (plain tensors), FSDP2 (1-D mesh) and, on 4 ranks, HSDP (2 x 2 mesh) and FSDP2 x TP (a
``(dp, tp) = (2, 2)`` mesh: qkv, up, gate ``ColwiseParallel``, proj, down ``RowwiseParallel``, then
``fully_shard`` over dp), every collective one ``optimizer.step()`` issues and the receive-buffer bytes of the
ones issued directly, on a small model with uneven row shards, and compares them with
``benchmarks/comm_model.py``'s prediction for the same shapes (``optimizer_comm``), with the default exchange
buckets and, for the Muon family under FSDP2/HSDP/TP, with the smallest ones (one matrix per owner rank: several
pipelined all-to-all pairs, buffers in issue order). Under TP, AdaMuon and Dion must refuse the rowwise matrices
when built (the model marks them "—"); SOAP under TP is not modelled and not run. Each launch adds its
rows to ``benchmarks/results/comm_model_validation.md`` (2 ranks replace the file, 4 ranks append).

The model is the 23M Llama-style GPT shape (6 layers, width 512, vocab 8192), ``fully_shard`` per block and on
the root. One warm-up step, then one measured ``optimizer.step()``: collectives issued directly through
``torch.distributed`` are counted by wrapping its functions, collectives issued by DTensor dispatch by
``CommDebugMode``. torch.optim.Muon gets the matrix parameters only (it is 2-D only); its failure, if any, is
reported. Writes ``benchmarks/results/comm_fsdp2.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from lightning_optim import create_optimizer, param_groups  # noqa: E402
from lightning_optim.models.gpt import ModelConfig, Transformer  # noqa: E402
from lightning_optim.optim._matrix_dist import CommCounter  # noqa: E402

_WRAPPED = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single",
            "all_to_all", "broadcast", "gather", "scatter", "reduce")


class DirectCounter:
    def __init__(self):
        self.counts = Counter()
        self.orig = {}

    def __enter__(self):
        for n in _WRAPPED:
            f = getattr(dist, n)
            self.orig[n] = f

            def wrap(*a, _f=f, _n=n, **k):
                self.counts[_n] += 1
                return _f(*a, **k)

            setattr(dist, n, wrap)
        return self

    def __exit__(self, *exc):
        for n, f in self.orig.items():
            setattr(dist, n, f)


def build(args):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=args.layers, n_embd=args.width, n_head=8, vocab_size=args.vocab, block_size=64,
                      arch="llama")
    model = Transformer(cfg)
    for b in model.blocks:
        fully_shard(b)
    fully_shard(model)
    return model


def measure(args, label, make_opt):
    from torch.distributed.tensor.debug import CommDebugMode

    model = build(args)
    opt = make_opt(model)
    idx = torch.randint(0, args.vocab, (2, 64))

    def grads():
        model.zero_grad()
        model(idx).float().pow(2).mean().backward()

    grads()
    opt.step()  # warm-up: state initialisation
    grads()
    CommCounter.reset()
    mode = CommDebugMode()
    t = time.perf_counter()
    with DirectCounter() as direct, mode:
        opt.step()
    dt = time.perf_counter() - t
    # CommDebugMode also sees the c10d ops behind our direct calls (allreduce_, alltoall_base_): keep only the
    # functional collectives DTensor dispatch issues, so nothing is counted twice
    functional = Counter()
    for k, v in mode.get_comm_counts().items():
        name = getattr(k, "__name__", str(k)).split(".")[0]
        if not name.endswith("_"):
            functional[name] += v
    n_matrix = sum(len(g["params"]) for g in opt.param_groups if g.get("matrix", True))
    return {"label": label, "direct": dict(direct.counts), "functional": dict(functional), "time": dt,
            "ns_calls": CommCounter.ns_calls, "ns_matrices": CommCounter.ns_matrices, "matrices": n_matrix}


class ByteCounter(DirectCounter):
    """Also records each direct collective's receive-buffer bytes, in call order."""

    def __enter__(self):
        super().__enter__()
        self.buffers = []
        for n in ("all_gather_into_tensor", "all_to_all_single", "all_reduce"):
            f = self.orig[n]

            def wrap(out, *a, _f=f, _n=n, **k):
                self.counts[_n] += 1
                self.buffers.append((_n, out.numel() * out.element_size()))
                return _f(out, *a, **k)

            setattr(dist, n, wrap)
        return self


VALIDATION_CFG = dict(n_layer=2, n_embd=64, n_head=2, vocab_size=256, block_size=16, arch="llama", mlp_hidden=71)


def _tensor_parallel(model, mesh) -> None:
    """FSDP2 x TP on a ``("dp", "tp")`` mesh, the plan of ``comm_model._blocks_tp``: colwise layers return a
    replicated output and rowwise ones take a replicated input (only the weights are split)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {n: ColwiseParallel(output_layouts=Replicate()) for n in ("attn.qkv", "mlp.up", "mlp.gate")}
    plan.update({n: RowwiseParallel(input_layouts=Replicate()) for n in ("attn.proj", "mlp.down")})
    for b in model.blocks:
        parallelize_module(b, mesh["tp"], plan)
    for b in model.blocks:
        fully_shard(b, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])


def validate_one(strategy: str, name: str, world: int, bucket_mb: float | None = None, **hp) -> dict:
    """One warm-up and one measured step of ``name`` under ``strategy`` (``"fsdp2×tp"``: a ``(world/2, 2)``
    mesh); this rank's counts and buffers, or ``{"refused": message}`` when building the optimizer raises
    ``ValueError``. ``bucket_mb``: the exchange's bucket size for this run (``_matrix_dist.BUCKET_MB``; ``None``:
    the default). ``hp``: optimizer hyperparameters."""
    from lightning_optim.optim import _matrix_dist

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.debug import CommDebugMode

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**VALIDATION_CFG))
    if strategy == "fsdp2×tp":
        _tensor_parallel(model, init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp")))
    elif strategy != "ddp":
        shape = (world // 2, 2) if strategy == "hsdp" else (world,)
        names = ("replicate", "shard") if strategy == "hsdp" else ("shard",)
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
        for b in model.blocks:
            fully_shard(b, mesh=mesh)
        fully_shard(model, mesh=mesh)
    try:
        opt = create_optimizer(name, model, **hp)
    except ValueError as err:
        return {"refused": str(err).splitlines()[0]}
    idx = torch.randint(0, VALIDATION_CFG["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    default_mb = _matrix_dist.BUCKET_MB
    _matrix_dist.BUCKET_MB = default_mb if bucket_mb is None else bucket_mb
    try:
        for measured in (False, True):
            model.zero_grad()
            model(idx).float().pow(2).mean().backward()
            if not measured:
                opt.step()
                continue
            mode = CommDebugMode()
            with ByteCounter() as direct, mode:
                opt.step()
    finally:
        _matrix_dist.BUCKET_MB = default_mb
    functional = Counter()
    for k, v in mode.get_comm_counts().items():
        op = getattr(k, "__name__", str(k)).split(".")[0]
        if not op.endswith("_"):
            functional[f"{op} (DTensor)"] += v
    return {"counts": {**dict(direct.counts), **functional}, "buffers": direct.buffers}


def _same_buffers(ops: list[str], measured: list[int], model_ops: list[str], model: list[int]) -> bool:
    """Measured and modelled receive buffers agree: the all-to-alls and all-gathers in issue order, the
    all-reduces as a multiset (the model lists NorMuon's tensor-parallel row-sum all-reduce after the norm
    all-reduce; NorMuon issues it first)."""
    def split(o: list[str], b: list[int]) -> tuple[list, list]:
        return ([(x, y) for x, y in zip(o, b) if x != "all_reduce"],
                sorted(y for x, y in zip(o, b) if x == "all_reduce"))

    return len(ops) == len(measured) and split(ops, measured) == split(model_ops, model)


def validate(rank: int, world: int) -> None:
    from benchmarks.comm_model import TP_OPTIMIZERS, optimizer_comm, shapes_of

    shapes = shapes_of(Transformer(ModelConfig(**VALIDATION_CFG)))
    strategies = ["ddp", "fsdp2"] + (["hsdp"] if world == 4 else [])
    family = ("muon", "normuon", "adamuon")
    rows = []
    # the default buckets (one here), then the smallest (one matrix per owner rank) for the sharded exchange
    cases = [(s, n, None, {}) for s in strategies for n in ("adamw",) + family + ("soap", "dion")]
    cases += [(s, "dion", None, {"rank_fraction": 1 / 16}) for s in strategies]
    cases += [(s, n, 1e-9, {}) for s in strategies if s != "ddp" for n in family]
    if world == 4:
        cases += [("fsdp2×tp", n, None, {}) for n in ("adamw",) + family + ("dion",)]
        cases += [("fsdp2×tp", n, 1e-9, {}) for n in ("muon", "normuon")]
    for strategy, name, bucket_mb, hp in cases:
        mine = validate_one(strategy, name, world, bucket_mb, **hp)
        every = [None] * world
        dist.all_gather_object(every, mine)
        label = strategy if bucket_mb is None else f"{strategy}, smallest buckets"
        shown = name + "".join(f" {k}={v:g}" for k, v in hp.items())
        if strategy == "fsdp2×tp" and name not in TP_OPTIMIZERS:
            refused = all("refused" in e for e in every)
            msg = every[0].get("refused", "not refused").replace("|", "/")[:120]
            rows.append(f"| {world} | {label} | {shown} | refused (—) | {msg} | | | {'yes' if refused else 'NO'} |")
            continue
        tp = 2 if strategy == "fsdp2×tp" else 1
        model = optimizer_comm(name, "fsdp2" if tp > 1 else strategy, shapes, world,
                               shards=2 if strategy == "hsdp" else None, tp=tp, bucket_mb=bucket_mb, **hp)
        predicted = Counter()
        for c in model.collectives:
            predicted["all_gather_into_tensor (DTensor)" if c.op == "all_gather (DTensor)" else c.op] += 1
        if any("refused" in e for e in every):
            rows.append(f"| {world} | {label} | {shown} | {dict(sorted(predicted.items()))} | refused: "
                        f"{next(e['refused'] for e in every if 'refused' in e)[:120]} | | | NO |")
            continue
        counts_ok = all(Counter(e["counts"]) == predicted for e in every)
        direct = [c for c in model.collectives if "DTensor" not in c.op]
        direct_model = [c.buffer for c in direct]
        n_buf = {len(e["buffers"]) for e in every}  # the same number of direct collectives on every rank
        measured = [max(e["buffers"][i][1] for e in every) for i in range(min(n_buf))]
        ops = [b[0] for b in every[0]["buffers"]]
        bytes_ok = len(n_buf) == 1 and _same_buffers(ops, measured, [c.op for c in direct], direct_model)
        rows.append(f"| {world} | {label} | {shown} | {dict(sorted(predicted.items())) or '{}'} | "
                    f"{dict(sorted(Counter(every[0]['counts']).items())) or '{}'} | {direct_model} | {measured} | "
                    f"{'yes' if counts_ok and bytes_ok else 'NO'} |")
    if rank == 0:
        out = Path(__file__).parent / "results" / "comm_model_validation.md"
        head = ("`benchmarks/comm_model.py` against `torchrun --nproc_per_node=N benchmarks/comm_count.py --validate` "
                f"(gloo, CPU), model {VALIDATION_CFG} (MLP rows 71: uneven row shards on 2 and 4 ranks). "
                "Counts: collectives in one `optimizer.step()` on every rank; bytes: receive buffer of each direct "
                "collective, busiest rank (all-to-alls and all-gathers in issue order, all-reduces as a multiset). "
                "`fsdp2×tp`: a (dp, tp) = (2, 2) mesh, qkv/up/gate colwise, proj/down rowwise; AdaMuon and Dion "
                "must refuse it when built.\n\n"
                "| ranks | strategy | optimizer | model: collectives | measured (rank 0) | model: buffer bytes | "
                "measured: buffer bytes | match |\n|---|---|---|---|---|---|---|---|\n")
        body = "\n".join(rows) + "\n"
        if world == 2 or not out.exists():
            out.write_text(head + body)
        else:
            out.write_text(out.read_text() + body)
        print(body)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--validate", action="store_true", help="compare with benchmarks/comm_model.py")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    if args.validate:
        torch.set_num_threads(1)
        validate(dist.get_rank(), dist.get_world_size())
        dist.barrier()
        dist.destroy_process_group()
        return
    torch.set_num_threads(1)
    rank = dist.get_rank()
    rows = []
    for name in ("muon", "normuon", "sf-normuon"):
        rows.append(measure(args, f"lightning-optim {name}", lambda m, n=name: create_optimizer(n, m)))

    def torch_muon(m):
        mats = [p for g in param_groups(m, split_matrices=True) if g["matrix"] for p in g["params"]]
        return torch.optim.Muon(mats, lr=0.01, weight_decay=0.0)

    try:
        rows.append(measure(args, "torch.optim.Muon (matrices only)", torch_muon))
    except Exception as err:  # noqa: BLE001
        rows.append({"label": "torch.optim.Muon (matrices only)", "error": f"{type(err).__name__}: {err}".splitlines()[0][:160]})
        if rank == 0:
            traceback.print_exc()
    if rank == 0:
        lines = ["| optimizer | matrices | collectives / step (per rank) | NS batched calls / matrices (rank 0) | step time rank 0 |",
                 "|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['label']} | | fails: `{r['error']}` | | |")
                continue
            comm = {**r["direct"], **{f"{k} (DTensor)": v for k, v in r["functional"].items()}}
            total = sum(comm.values())
            desc = ", ".join(f"{k} ×{v}" for k, v in sorted(comm.items())) or "none"
            ns = f"{r['ns_calls']} / {r['ns_matrices']}" if r["ns_calls"] else f"(per matrix) / {r['matrices']}"
            lines.append(f"| {r['label']} | {r['matrices']} | {total}: {desc} | {ns} | {r['time'] * 1e3:.0f} ms |")
        text = (f"FSDP2 (`fully_shard` per block + root), 2 CPU ranks (gloo), GPT {args.layers}×{args.width}, "
                f"vocab {args.vocab}; one `optimizer.step()` after a warm-up step.\n\n" + "\n".join(lines) + "\n")
        out = Path(__file__).parent / "results" / "comm_fsdp2.md"
        out.write_text(text)
        print(text)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
