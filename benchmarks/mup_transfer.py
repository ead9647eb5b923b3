"""muP learning-rate transfer on CPU: final loss against lr for several widths, AdamW and Muon, with and without muP.

Usage::

    python benchmarks/mup_transfer.py                        # widths 64 128 256 x 5 lrs x {adamw, muon} x {SP, muP}
    python benchmarks/mup_transfer.py --optimizers adamw     # one optimizer (run the other in a second process)
    python benchmarks/mup_transfer.py --list                 # the runs, and which are done

Every run trains the recipes' Llama-style model (``LanguageModel``: RMSNorm, RoPE, SwiGLU, tied embeddings;
2 layers, ``n_head`` 4 fixed, width = ``n_embd``) on the offline default corpus (the Python standard library's
source, 4096-token BPE) with the optimizer and schedule the mixin builds from an ``OptimConfig`` — what the recipes
do — in a plain loop: 80 steps of 16 sequences of 32 tokens, the same seed, the same batches in the same order
for every run, cosine with 10% warmup,
gradient clipping 1.0, the optimizer's registered defaults except ``lr``. muP runs set ``mup_base_width=64``
(:mod:`lightning_optim.mup`); at width 64 muP and SP are the same model, so those runs are shared. For Muon the lr
swept is the matrix lr; its internal AdamW (embeddings, norms) keeps its default ``adamw_lr``.

The loss is the validation loss after the last step (64 held-out windows). The optimum of each curve is the
minimum of a parabola through the best grid point and its two neighbours in ``log2(lr)`` (the grid point itself
when it lies on the edge of the grid); its shift across widths is reported in octaves (factors of 2).

**Resuming**: one JSON per finished run under ``benchmarks/out/mup-transfer/runs/`` (written atomically, with the
settings' fingerprint); re-running the same command runs only the missing ones. Workers in parallel: e.g.
``--optimizers adamw`` and ``--optimizers muon`` in two processes, or ``--only mup`` beside ``--only sp``; a worker
skips a run another one has finished. Writes
``benchmarks/results/mup_transfer.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.compare import _write_json, load_done  # noqa: E402  (one resumable-run format for both harnesses)


@dataclass
class TransferConfig:
    """The shared setting of every run (the fingerprint of a run's JSON)."""

    widths: tuple[int, ...] = (64, 128, 256)
    base_width: int = 64
    n_layer: int = 2
    n_head: int = 4
    seq_len: int = 32
    batch_size: int = 16
    steps: int = 80
    warmup_steps: int = 8
    grad_clip: float = 1.0
    val_sequences: int = 64
    seed: int = 0
    data: dict[str, Any] = field(default_factory=lambda: {"tokenizer": "bpe:4096"})
    # 5 lrs per optimizer, factors of 2: around the tiny recipe's AdamW 3e-3; for Muon from its registered 0.01 up
    lrs: dict[str, tuple[float, ...]] = field(default_factory=lambda: {
        "adamw": (7.5e-4, 1.5e-3, 3e-3, 6e-3, 1.2e-2), "muon": (1e-2, 2e-2, 4e-2, 8e-2, 1.6e-1)})

    def fingerprint(self) -> str:
        data = dataclasses.asdict(self)
        data.pop("widths")
        data.pop("lrs")  # which runs, not how one run trains
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_name(optimizer: str, mup: bool, width: int, lr: float) -> str:
    return f"{optimizer}__{'mup' if mup else 'sp'}__w{width}__lr{lr:g}"


def plan(cfg: TransferConfig, optimizers: list[str]) -> list[tuple[str, bool, int, float]]:
    """(optimizer, mup, width, lr) for every run, narrowest width first (an interrupted sweep still compares SP
    and muP on the widths it finished); at the base width only the SP run (it is the muP model)."""
    runs = []
    for width in cfg.widths:
        for name in optimizers:
            for mup in (False, True):
                if mup and width == cfg.base_width:
                    continue
                runs += [(name, mup, width, lr) for lr in cfg.lrs[name]]
    return runs


def train_one(cfg: TransferConfig, optimizer: str, mup: bool, width: int, lr: float) -> dict[str, Any]:
    """Train one run in a plain loop and return its record."""
    import torch

    from lightning_optim import OptimConfig
    from lightning_optim.data import TokenDataModule
    from lightning_optim.models import LanguageModel

    torch.manual_seed(cfg.seed)
    dm = TokenDataModule(seq_len=cfg.seq_len, global_batch_size=cfg.batch_size, val_sequences=cfg.val_sequences,
                         seed=cfg.seed + 1234, show_progress=False, **cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    optim = OptimConfig(name=optimizer, lr=lr, scheduler="cosine", warmup_steps=cfg.warmup_steps,
                        total_steps=cfg.steps, mup_base_width=cfg.base_width if mup else None)
    torch.manual_seed(cfg.seed)
    model = LanguageModel("tiny", arch="llama", optim=optim, tokenizer_vocab_size=dm.vocab_size,
                          block_size=cfg.seq_len, n_layer=cfg.n_layer, n_embd=width, n_head=cfg.n_head)
    built = model.configure_optimizers()
    opt, sched = built["optimizer"], built["lr_scheduler"]["scheduler"]
    stream = dm.train_dataset(0)
    train, started, status = [], time.perf_counter(), "ok"
    model.train()
    for step in range(cfg.steps):
        loss = model._loss(stream.batch(step))
        if not torch.isfinite(loss):
            status = f"diverged at step {step}"
            break
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        train.append(loss.item())
    val = float("nan")
    if status == "ok":
        model.eval()
        with torch.no_grad():
            losses = [float(model._loss(batch)) for batch in dm.val_dataloader()]
        val = sum(losses) / len(losses)
        if not math.isfinite(val):
            status = "non-finite validation loss"
    return {"run": run_name(optimizer, mup, width, lr), "optimizer": optimizer, "mup": mup, "width": width,
            "lr": lr, "status": status, "val_loss": val, "train_loss_last10": sum(train[-10:]) / max(len(train[-10:]), 1),
            "train": train[::5], "n_params": model.num_parameters(), "wall_s": time.perf_counter() - started,
            "fingerprint": cfg.fingerprint(), "config": dataclasses.asdict(cfg), "torch_threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------------------
# Analysis


def curve(records: dict[str, dict], cfg: TransferConfig, optimizer: str, mup: bool, width: int) -> list[tuple[float, float]]:
    """(lr, final validation loss) along the grid; a run shared at the base width counts for both."""
    use_mup = mup and width != cfg.base_width
    out = []
    for lr in cfg.lrs[optimizer]:
        rec = records.get(run_name(optimizer, use_mup, width, lr))
        if rec is not None:
            out.append((lr, rec["val_loss"] if math.isfinite(rec["val_loss"]) else float("inf")))
    return out


def optimum(points: list[tuple[float, float]]) -> float | None:
    """The lr minimising a parabola through the best grid point and its neighbours in log2(lr)."""
    finite = [(lr, v) for lr, v in points if math.isfinite(v)]
    if not finite:
        return None
    i = min(range(len(points)), key=lambda k: points[k][1])
    if i == 0 or i == len(points) - 1 or not all(math.isfinite(points[k][1]) for k in (i - 1, i, i + 1)):
        return points[i][0]
    (x0, y0), (x1, y1), (x2, y2) = [(math.log2(points[k][0]), points[k][1]) for k in (i - 1, i, i + 1)]
    denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / denom
    if a <= 0:
        return points[i][0]
    return 2 ** min(max(-b / (2 * a), x0), x2)


def write_report(records: dict[str, dict], cfg: TransferConfig, optimizers: list[str], md: Path, png: Path,
                 command: str, missing: list[str]) -> str:
    lines = ["# muP learning-rate transfer (CPU)", "", f"Command: `{command}`", "",
             f"Llama-style model ({cfg.n_layer} layers, {cfg.n_head} heads fixed, tied embeddings, 4096-token BPE), "
             f"widths {', '.join(map(str, cfg.widths))}, {cfg.steps} steps of {cfg.batch_size}x{cfg.seq_len} tokens "
             f"on the offline default corpus, cosine with warmup {cfg.warmup_steps}, clipping {cfg.grad_clip}, "
             f"seed {cfg.seed}, one run per cell. muP: base width {cfg.base_width}. Cells: final validation loss "
             f"({cfg.val_sequences} held-out windows); `inf` = diverged. Optimum: parabola in log2(lr) through the best "
             "grid point and its neighbours.", ""]
    summary, at = [], len(lines)
    for name in optimizers:
        for mup in (False, True):
            label = f"{name}, {'muP' if mup else 'SP'}"
            lines += [f"## {label}", "", "| width | " + " | ".join(f"lr {lr:g}" for lr in cfg.lrs[name]) +
                      " | optimum lr |", "|---|" + "---|" * (len(cfg.lrs[name]) + 1)]
            opts = {}
            for width in cfg.widths:
                pts = dict(curve(records, cfg, name, mup, width))
                cells = " | ".join(f"{pts[lr]:.4f}" if lr in pts else "–" for lr in cfg.lrs[name])
                best = optimum(sorted(pts.items())) if len(pts) == len(cfg.lrs[name]) else None
                opts[width] = best
                lines.append(f"| {width} | {cells} | {best:.3g} |" if best else f"| {width} | {cells} | – |")
            lines.append("")
            done = [w for w in cfg.widths if opts[w]]
            per_width = " | ".join(f"{opts[w]:.3g}" if opts[w] else "–" for w in cfg.widths)
            shift = "–"
            if len(done) >= 2:
                lo, hi = done[0], done[-1]
                shift = f"{math.log2(opts[hi] / opts[lo]):+.2f} over {math.log2(hi / lo):.0f} ({lo} → {hi})"
            summary.append(f"| {label} | {per_width} | {shift} |")
    lines[at:at] = ["## Optimum shift", "", "Optimum lr per width, and its shift in octaves (log2 of the ratio) over "
                    "the width octaves it spans: 0 is perfect transfer, -1 per width octave is lr ∝ 1/width.", "",
                    "| run | " + " | ".join(f"width {w}" for w in cfg.widths) + " | shift (octaves) over width octaves |",
                    "|---|" + "---|" * (len(cfg.widths) + 1), *summary, ""]
    if missing:
        lines += [f"Not run yet (rerun the same command to complete): {len(missing)} runs."]
    text = "\n".join(lines) + "\n"
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)

    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5 * 2, 3.6 * len(optimizers)))
    axes = fig.subplots(len(optimizers), 2, squeeze=False, sharey="row")  # SP and muP losses on one scale
    for row, name in enumerate(optimizers):
        for col, mup in enumerate((False, True)):
            ax = axes[row][col]
            for width in cfg.widths:
                pts = curve(records, cfg, name, mup, width)
                xs = [lr for lr, v in pts if math.isfinite(v)]
                ys = [v for lr, v in pts if math.isfinite(v)]
                ax.plot(xs, ys, marker="o", label=f"width {width}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("lr" + (" (matrix)" if name == "muon" else ""))
            ax.set_ylabel("final validation loss")
            ax.set_title(f"{name}, {'muP (base 64)' if mup else 'SP'}", fontsize=10)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "muon"], choices=["adamw", "muon"])
    parser.add_argument("--widths", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "out" / "mup-transfer")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=["sp", "mup"], default=None,
                        help="run only the SP or only the muP cells (e.g. a second worker process; the report "
                             "covers every finished run)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="write the report from the finished runs only")
    args = parser.parse_args(argv)
    cfg = TransferConfig()
    if args.widths:
        cfg.widths = tuple(sorted(args.widths))
        cfg.base_width = cfg.widths[0]
    if args.steps:
        cfg.steps, cfg.warmup_steps = args.steps, max(1, args.steps // 10)
    runs_dir = args.out_dir / "runs"
    todo = plan(cfg, args.optimizers)
    done = load_done(runs_dir, cfg)
    if args.list:
        for o, m, w, lr in todo:
            print(f"{'done' if run_name(o, m, w, lr) in done else 'todo'}  {run_name(o, m, w, lr)}")
        return
    import torch

    torch.set_num_threads(args.threads)
    for o, m, w, lr in [] if args.report_only else todo:
        name = run_name(o, m, w, lr)
        if args.only is not None and m != (args.only == "mup"):
            continue
        if name not in done and (runs_dir / f"{name}.json").exists():  # finished meanwhile by another worker
            done.update(load_done(runs_dir, cfg))
        if name in done:
            continue
        rec = train_one(cfg, o, m, w, lr)
        _write_json(runs_dir / f"{name}.json", rec)
        done[name] = rec
        print(f"{name}: val {rec['val_loss']:.4f} ({rec['status']}, {rec['wall_s']:.0f} s)", flush=True)
    missing = [run_name(*r) for r in todo if run_name(*r) not in done]
    command = "python benchmarks/mup_transfer.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(write_report(done, cfg, args.optimizers, args.results_dir / "mup_transfer.md",
                       args.results_dir / "mup_transfer.png", command.strip(), missing))


if __name__ == "__main__":
    main()
