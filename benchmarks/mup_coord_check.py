"""muP coordinate check: per-layer activation size and its change after a few optimizer steps, across widths.

Usage::

    python benchmarks/mup_coord_check.py                           # widths 64 128 256 512, AdamW and Muon
    python benchmarks/mup_coord_check.py --widths 64 128 --steps 3 --optimizers adamw

The check of Yang et al. 2022 (arXiv 2203.03466, §7 / Fig. 5; the ``mup`` package's ``coord_check``): train each
width a few steps from the same seed on the same batches and measure, per layer, the RMS of its output
activation (``act``) and the RMS of that output's change since initialisation on a fixed probe batch
(``update``: ``RMS(h_t(x) - h_0(x))``, what "maximal update" is about). Under muP both stay of the same size at
every width; under the standard parametrization (one lr for every width) the updates of the hidden layers and
the logits grow with width (for Adam, about ∝ width).

Model: the recipes' Llama-style Transformer (RMSNorm, RoPE, SwiGLU, tied embeddings), ``n_layer`` 2, ``n_head``
4 fixed (muP grows ``head_dim`` with width), vocabulary 256, random token batches (scale is what is measured,
not language modelling). muP runs use ``--optim.mup_base_width`` = the smallest width: at that width muP and SP
are the same model.

Writes ``benchmarks/results/mup_coord_check.md`` (the table, and max/min ratios across widths) and ``.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lightning_optim import create_optimizer, param_groups  # noqa: E402
from lightning_optim.models import build_model  # noqa: E402
from lightning_optim.mup import mup_param_groups  # noqa: E402
from lightning_optim.registry import get_optimizer_spec  # noqa: E402

WIDTHS = (64, 128, 256, 512)
#: the tiny recipe's AdamW lr and Muon's registered default
LRS = {"adamw": 3e-3, "muon": 0.01}


def layer_names(n_layer: int) -> list[str]:
    """The measured layers, input to output."""
    names = ["embedding"]
    for i in range(n_layer):
        names += [f"block{i}.attn", f"block{i}.mlp", f"block{i}"]
    return names + ["logits"]


def _hooks(model: torch.nn.Module, store: dict[str, torch.Tensor]) -> list[Any]:
    def keep(name: str):
        def hook(_module, _inputs, output):
            store[name] = output.detach().float()
        return hook

    handles = [model.tok_emb.register_forward_hook(keep("embedding"))]
    for i, block in enumerate(model.blocks):
        handles.append(block.attn.register_forward_hook(keep(f"block{i}.attn")))
        handles.append(block.mlp.register_forward_hook(keep(f"block{i}.mlp")))
        handles.append(block.register_forward_hook(keep(f"block{i}")))
    return handles


def _rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean().sqrt())


def run_width(width: int, *, mup: bool, optimizer: str, lr: float, base_width: int, steps: int = 4,
              n_layer: int = 2, n_head: int = 4, vocab: int = 256, seq_len: int = 32, batch: int = 8,
              seed: int = 0) -> dict[str, dict[str, list[float]]]:
    """``{"act": {layer: [rms at step 0..steps]}, "update": {layer: [rms of the change since step 0]}}``."""
    torch.manual_seed(seed)
    model = build_model("tiny", arch="llama", vocab_size=vocab, n_layer=n_layer, n_embd=width, n_head=n_head,
                        block_size=seq_len, mup_base_width=base_width if mup else None)
    spec = get_optimizer_spec(optimizer)
    groups = param_groups(model, split_matrices=spec.hybrid)
    if mup:
        groups = mup_param_groups(model, groups, spec.name, {**spec.defaults, "lr": lr})
    opt = create_optimizer(optimizer, groups, lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    probe = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    data = [torch.randint(0, vocab, (batch, seq_len + 1), generator=gen) for _ in range(steps)]
    store: dict[str, torch.Tensor] = {}
    handles = _hooks(model, store)
    names = layer_names(n_layer)
    act = {n: [] for n in names}
    upd = {n: [] for n in names}
    first: dict[str, torch.Tensor] = {}
    try:
        for t in range(steps + 1):
            with torch.no_grad():
                store["logits"] = model(probe).float()
            for n in names:
                if t == 0:
                    first[n] = store[n].clone()
                act[n].append(_rms(store[n]))
                upd[n].append(_rms(store[n] - first[n]))
            if t == steps:
                break
            tokens = data[t]
            loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
    return {"act": act, "update": upd}


def coord_check(widths=WIDTHS, optimizers=("adamw", "muon"), steps: int = 4, **kwargs: Any) -> dict:
    """``{(optimizer, "mup"|"sp"): {width: run_width(...)}}`` with base width ``min(widths)``."""
    lr = kwargs.pop("lr", None)
    out = {}
    for name in optimizers:
        for mup in (False, True):
            out[(name, "mup" if mup else "sp")] = {
                w: run_width(w, mup=mup, optimizer=name, lr=lr or LRS.get(name, 1e-3), base_width=min(widths),
                             steps=steps, **kwargs) for w in widths}
    return out


def spread(results: dict, kind: str, layer: str, step: int = -1) -> float:
    """``max / min`` over widths of one layer's ``kind`` (``act`` or ``update``) at ``step``: 1 is flat."""
    values = [r[kind][layer][step] for r in results.values()]
    return max(values) / min(values)


def growth(results: dict, kind: str, layer: str, step: int = -1) -> float:
    """The widest width's value over the narrowest's: > 1 grows with width."""
    widths = sorted(results)
    return results[widths[-1]][kind][layer][step] / results[widths[0]][kind][layer][step]


def write_report(results: dict, widths, steps: int, out_md: Path, out_png: Path, command: str) -> None:
    some = next(iter(results.values()))
    names = list(next(iter(some.values()))["act"])
    lines = ["# muP coordinate check", "", f"Command: `{command}`", "",
             f"Widths {', '.join(map(str, widths))} (muP base width {min(widths)}), {steps} optimizer steps, "
             "Llama-style tiny Transformer (2 layers, 4 heads, vocabulary 256, random tokens). `update` is the "
             "RMS of a layer's output change since initialisation on a fixed probe batch after the last step; "
             "`act` its RMS. Growth = widest / narrowest width; spread = max / min over widths.", ""]
    watched = [n for n in names if n.startswith("block") and "." not in n] + ["logits"]
    lines += ["| run | update growth, widest / narrowest (block outputs, logits) | largest spread over widths |",
              "|---|---|---|"]
    for (name, param), per_width in results.items():
        grow = ", ".join(f"{growth(per_width, 'update', n):.2f}" for n in watched)
        worst = max(max(spread(per_width, 'update', n), 1.0) for n in watched)
        lines.append(f"| {name} {'muP' if param == 'mup' else 'SP'} | {grow} | {worst:.2f} |")
    lines.append("")
    for (name, param), per_width in results.items():
        lines += [f"## {name}, {'muP' if param == 'mup' else 'standard parametrization'}", "",
                  "| layer | " + " | ".join(f"update w={w}" for w in widths) + " | update growth | act spread |",
                  "|---|" + "---|" * (len(widths) + 2)]
        for layer in names:
            vals = " | ".join(f"{per_width[w]['update'][layer][-1]:.3g}" for w in widths)
            lines.append(f"| {layer} | {vals} | {growth(per_width, 'update', layer):.2f} | "
                         f"{spread(per_width, 'act', layer):.2f} |")
        lines.append("")
    out_md.write_text("\n".join(lines), encoding="utf-8")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results)
    fig, axes = plt.subplots(2, len(keys), figsize=(4.2 * len(keys), 7), squeeze=False)
    for col, key in enumerate(keys):
        per_width = results[key]
        for row, kind in enumerate(("update", "act")):
            ax = axes[row][col]
            for layer in names:
                ax.plot(widths, [per_width[w][kind][layer][-1] for w in widths], marker="o", label=layer)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("width (n_embd)")
            ax.set_title(f"{key[0]} {'muP' if key[1] == 'mup' else 'SP'}: {kind} RMS, step {steps}", fontsize=9)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "muon"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if any(w <= 0 or w % 8 for w in args.widths):
        parser.error(f"--widths must be positive multiples of 8 (4 heads, even head_dim), got {args.widths}")
    torch.set_num_threads(1)
    results = coord_check(sorted(args.widths), args.optimizers, args.steps)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/mup_coord_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_report(results, sorted(args.widths), args.steps, args.results_dir / "mup_coord_check.md",
                 args.results_dir / "mup_coord_check.png", command.strip())
    print((args.results_dir / "mup_coord_check.md").read_text())


if __name__ == "__main__":
    main()
