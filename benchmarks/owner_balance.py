"""How evenly the Newton–Schulz work of the Muon family spreads over ranks: owners by cost (LPT) vs round-robin.

    python benchmarks/owner_balance.py [--presets 124m,210m,583m,720m] [--ranks 2,4,8,16,32,64]

Under DDP, FSDP2 and HSDP each matrix is orthogonalised by one owner rank (``lightning_optim.optim._matrix_dist``):
owners are assigned longest-processing-time first by Newton–Schulz cost (``ns_flops``: 5 steps of
``2·s²·l + s³`` multiply-adds for an ``s × l`` matrix, ``s <= l``), and each owner runs its matrices of one shape
as one batched call. For every preset the matrix shapes are those the optimizer sees: the Llama-style model of
``lightning_optim.models.gpt.model_config(preset)`` built on the meta device, grouped by
``param_groups(split_matrices=True)`` (embeddings, head and 1-D parameters go to AdamW), each viewed
``shape[0] × prod(shape[1:])``. For an HSDP job of ``R × S`` ranks the owners are spread over all ``R·S``
ranks, so its row is the one for ``R·S`` ranks.

Columns, for each number of ranks W:

* ``LPT max/mean``: the busiest rank's Newton–Schulz FLOPs over the mean (1.00 = perfect balance); the step
  waits for the busiest rank.
* ``bound``: ``max(largest matrix, total/W) / mean``, the best any assignment of whole matrices can do.
* ``round-robin max/mean``: matrix ``i`` to rank ``i mod W`` in model order, for comparison.
* ``NS calls``: batched Newton–Schulz calls on the busiest-in-calls rank (one per distinct shape it owns) and
  the matrices it owns.

Writes ``benchmarks/results/owner_balance.md``. Pure arithmetic (no process group); a few seconds.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_optim import param_groups  # noqa: E402
from lightning_optim.models.gpt import Transformer, model_config  # noqa: E402
from lightning_optim.optim._matrix_dist import assign_owners  # noqa: E402
from lightning_optim.optim.newton_schulz import ns_flops  # noqa: E402

OUT = Path(__file__).parent / "results" / "owner_balance.md"


def matrix_shapes(preset: str, **overrides) -> list[tuple[int, int]]:
    """``rows × cols`` of every matrix-rule parameter of the preset's model, in model order."""
    with torch.device("meta"):
        model = Transformer(model_config(preset, **overrides))
    return [(int(p.shape[0]), int(math.prod(p.shape[1:])))
            for g in param_groups(model, split_matrices=True) if g["matrix"] for p in g["params"]]


def balance(shapes: list[tuple[int, int]], world: int) -> dict[str, float]:
    costs = [ns_flops(r, c) for r, c in shapes]
    mean = sum(costs) / world

    def loads(owner: list[int]) -> list[int]:
        out = [0] * world
        for i, o in enumerate(owner):
            out[o] += costs[i]
        return out

    lpt = assign_owners(costs, world)
    calls = [len({shapes[i] for i in range(len(shapes)) if lpt[i] == r}) for r in range(world)]
    owned = [sum(1 for o in lpt if o == r) for r in range(world)]
    busiest = max(range(world), key=lambda r: (calls[r], owned[r]))
    return {
        "lpt": max(loads(lpt)) / mean,
        "bound": max(max(costs), mean) / mean,
        "round_robin": max(loads([i % world for i in range(len(costs))])) / mean,
        "calls": calls[busiest],
        "owned": owned[busiest],
        "idle": sum(1 for o in owned if o == 0),
    }


def table(presets: list[str], ranks: list[int]) -> str:
    lines = ["| preset | matrices | shapes | ranks | LPT max/mean | bound | round-robin max/mean | NS calls / matrices "
             "(busiest rank) | idle ranks |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for preset in presets:
        shapes = matrix_shapes(preset)
        for w in ranks:
            b = balance(shapes, w)
            lines.append(f"| {preset} | {len(shapes)} | {len(set(shapes))} | {w} | {b['lpt']:.2f} | {b['bound']:.2f} | "
                         f"{b['round_robin']:.2f} | {b['calls']} / {b['owned']} | {b['idle']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="124m,210m,583m,720m")
    ap.add_argument("--ranks", default="2,4,8,16,32,64")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    try:
        ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    except ValueError:
        raise SystemExit(f"--ranks must be comma-separated integers, got {args.ranks!r}") from None
    if not ranks or min(ranks) < 1:
        raise SystemExit(f"--ranks must be integers >= 1, got {args.ranks!r}")
    text = ("Newton–Schulz load per rank, Muon family, owners by cost (LPT) vs round-robin; Llama-style presets "
            "(`model_config(preset)`), matrices as the optimizer routes them. `python benchmarks/owner_balance.py`."
            "\n\n" + table(presets, ranks))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
