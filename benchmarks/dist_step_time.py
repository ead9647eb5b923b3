"""Distributed optimizer step time and collectives per step on CPU (gloo): FSDP2 on 2 processes and HSDP
(2 x 2) on 4, in one run, for the registry's matrix optimizers against single-process peers.

    python benchmarks/dist_step_time.py                  # -> benchmarks/results/dist_step_time.md (+ .json)
    python benchmarks/dist_step_time.py --smoke --out /tmp/dst   # tiny model, 1 + 2 steps: checks it runs

Each layout is one ``torchrun`` launch of this file (``--worker``). The model is the tiny Llama of the recipes'
shape family (``--layers``, ``--width``; 71-ish uneven MLP rows are not needed here), ``fully_shard`` per block
and on the root (HSDP: on a ``(replicate, shard)`` mesh). For each optimizer: one backward gives the gradients
(kept for every step), ``--warmup`` steps, then ``--steps`` timed ``optimizer.step()`` calls, each between two
barriers; a step's time is the slowest rank's (all-reduce MAX outside the timed region) and the median over the
steps is reported. Collectives per step are counted on one more step with a ``TorchDispatchMode`` that sees
every ``c10d`` and ``_c10d_functional`` op (process-group collectives and DTensor redistributions alike), on
rank 0.

Ours: ``muon``, ``normuon``, ``soap`` and ``dion`` where the registry has it (names are taken from the registry).
Peers are single-process optimizers, so under FSDP2 they need whole tensors: ``torch.optim.Muon`` on a DTensor
shard runs Newton–Schulz on the local row block alone (no collective; a different, wrong update), so the peer
is run the naive way, written plainly here: every rank keeps full-size copies of the matrices, all-gathers each
gradient (``full_tensor()``), steps the peer on the full copies (the same Newton–Schulz redundantly on every
rank) and copies its own shard back. ``heavyball.Muon`` (if installed) the same way. Only matrices are stepped
(the ``matrix`` groups; ours route the rest to their internal AdamW, so ours do a little more work per step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LAYOUTS = {"fsdp2": 2, "hsdp": 4}


# ------------------------------------------------------------------------------------------------ worker


def _collective_counter():
    from torch.utils._python_dispatch import TorchDispatchMode

    class CollectiveCounter(TorchDispatchMode):
        """Counts every dispatched collective op (``c10d::*`` process-group ops, ``_c10d_functional::*``)."""

        def __init__(self) -> None:
            super().__init__()
            self.counts: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace in ("c10d", "_c10d_functional"):
                name = func.__name__.split(".")[0]
                if name not in ("wait_tensor", "barrier", "_wrap_tensor_autograd"):  # not collectives
                    self.counts[name] += 1
            return func(*args, **(kwargs or {}))

    return CollectiveCounter()


class GatheredPeer:
    """A single-process optimizer on full copies of FSDP2-sharded matrices (the naive pattern, see the module
    docstring): ``step`` all-gathers every gradient, steps the peer redundantly, writes each rank's shard back."""

    def __init__(self, params: list, make) -> None:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        self.params = params
        self.full = [torch.nn.Parameter(p.full_tensor().detach().clone()) for p in params]
        self.slices = []
        for p in params:
            shape, off = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            self.slices.append(tuple(slice(o, o + s) for o, s in zip(off, shape)))
        self.opt = make(self.full)

    @torch.no_grad()
    def step(self) -> None:
        for p, f in zip(self.params, self.full):
            if f.grad is None:
                f.grad = torch.zeros_like(f)
            f.grad.copy_(p.grad.full_tensor())  # a plain tensor (full_tensor() may return a wrapper subclass)
        self.opt.step()
        for p, f, s in zip(self.params, self.full, self.slices):
            p.to_local().copy_(f[s])


def _peers() -> dict:
    peers = {"torch.optim.Muon (gathered)": lambda ps: torch.optim.Muon(ps, lr=0.02)}
    try:
        import heavyball

        peers["heavyball.Muon (gathered)"] = lambda ps: heavyball.Muon(ps, lr=0.02)
    except ImportError:
        pass
    return peers


def _ours() -> list[str]:
    from lightning_optim.registry import available_optimizers

    have = set(available_optimizers())
    return [n for n in ("muon", "normuon", "soap", "dion") if n in have]


def _build(layout: str, args):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_optim.models.gpt import ModelConfig, Transformer

    cfg = ModelConfig(n_layer=args.layers, n_embd=args.width, n_head=4, vocab_size=256, block_size=32,
                      arch="llama", mlp_hidden=(8 * args.width) // 3)
    torch.manual_seed(0)
    model = Transformer(cfg)
    mesh = (init_device_mesh("cpu", (2, dist.get_world_size() // 2), mesh_dim_names=("replicate", "shard"))
            if layout == "hsdp" else init_device_mesh("cpu", (dist.get_world_size(),)))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (4, cfg.block_size + 1), generator=g)
    logits = model(idx[:, :-1])
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), idx[:, 1:].reshape(-1)).backward()
    return model


def _time_steps(step, warmup: int, steps: int) -> list[float]:
    import torch.distributed as dist

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.barrier()
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        times.append(float(dt))
    return times


def worker(layout: str, out: Path, args) -> None:
    import torch.distributed as dist

    from lightning_optim import create_optimizer
    from tests.dist_utils import finish

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    rows = []
    cases = [(n, None) for n in _ours()] + list(_peers().items())
    for name, make in cases:
        model = _build(layout, args)
        matrices = [p for n, p in model.named_parameters() if p.ndim == 2 and "blocks" in n]
        try:
            if make is None:
                opt = create_optimizer(name, model)
                step = opt.step
            else:
                opt = GatheredPeer(matrices, make)
                step = opt.step
            times = _time_steps(step, args.warmup, args.steps)
            counter = _collective_counter()
            with counter:
                step()
            rows.append({"optimizer": name, "ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
                         "collectives": dict(counter.counts), "matrices": len(matrices)})
        except Exception as err:  # a peer that cannot run here is reported, not fatal
            rows.append({"optimizer": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"})
        dist.barrier()
    if rank == 0:
        (out / f"{layout}.json").write_text(json.dumps(rows))
    finish(out)


# ------------------------------------------------------------------------------------------------ driver


def _launch(layout: str, out: Path, args) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.dist_utils import run_distributed

    extra = ["--layers", str(args.layers), "--width", str(args.width), "--warmup", str(args.warmup),
             "--steps", str(args.steps)]
    run_distributed(Path(__file__), "--worker", layout, "--out", str(out), *extra, nprocs=LAYOUTS[layout],
                    timeout=args.timeout, out_dir=out)


def _table(results: dict, args) -> str:
    lines = [
        "# Distributed step time and collectives per step (CPU, gloo)",
        "",
        f"`python benchmarks/dist_step_time.py --layers {args.layers} --width {args.width} --warmup {args.warmup} "
        f"--steps {args.steps}`: tiny Llama ({args.layers} layers, width {args.width}), one thread per process, "
        f"{os.cpu_count()} CPU cores on this machine (load average at the start: "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}). Step time: median over {args.steps} timed "
        "`optimizer.step()` calls of the slowest rank. Collectives: every `c10d` / `_c10d_functional` op of one "
        "step on rank 0 (all-to-all = `alltoall_base_`, all-gather = `allgather_into_tensor_coalesced_` / "
        "`all_gather_into_tensor`, all-reduce = `allreduce_`). Peers marked *gathered* are single-process "
        "optimizers run on full copies: one all-gather per matrix and the same Newton–Schulz on every rank.",
        "",
    ]
    for layout, rows in results.items():
        title = {"fsdp2": "FSDP2, 2 processes", "hsdp": "HSDP (2 replicas x 2 shards), 4 processes"}[layout]
        lines += [f"## {title}", "", "| optimizer | step (ms, median) | min (ms) | collectives per step |",
                  "|---|---:|---:|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['optimizer']} | n/a | n/a | {r['error']} |")
                continue
            coll = ", ".join(f"{k} x{v}" for k, v in sorted(r["collectives"].items())) or "none"
            lines.append(f"| {r['optimizer']} | {r['ms']:.1f} | {r['min_ms']:.1f} | {coll} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--smoke", action="store_true", help="2 layers, width 64, 1 warmup and 2 timed steps")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--worker", choices=list(LAYOUTS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.layers, args.width, args.warmup, args.steps = 2, 64, 1, 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        sys.path.insert(0, str(ROOT))
        worker(args.worker, args.out, args)
        return
    results = {}
    for layout in LAYOUTS:
        _launch(layout, args.out, args)
        results[layout] = json.loads((args.out / f"{layout}.json").read_text())
        for f in args.out.glob("done_rank*.json"):
            f.unlink()
    name = "dist_step_time_smoke" if args.smoke else "dist_step_time"
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=1))
    (args.out / f"{name}.md").write_text(_table(results, args) + "\n")
    for layout in LAYOUTS:
        (args.out / f"{layout}.json").unlink()
    print(_table(results, args))


if __name__ == "__main__":
    main()
