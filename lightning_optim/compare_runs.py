"""``lightning-optim compare-runs DIR...``: runs side by side from their TensorBoard event files.

Each ``DIR`` is a run folder (``lightning_logs/llama124m/version_0``) or any folder above runs
(``lightning_logs/llama124m``, ``lightning_logs``): every folder below it that holds an event file is one run,
named by its path relative to the ``DIR`` it was found under (the folder's own name when it is a run itself). Read
from each run:

- ``train/loss`` and ``val/loss`` against the optimizer step, turned into tokens with the run's
  ``geometry.tokens_per_step`` from the ``hparams.yaml`` beside the events (the recipes record it; without it
  the x axis stays in steps) and against wall-clock time since the run's first event;
- the learning rate (the first ``lr-*`` tag LearningRateMonitor wrote) and ``train/grad_norm`` (before clipping,
  logged by GradientClipping) when present;
- ``throughput/tokens_per_sec``.

Writes ``compare-runs.png`` (four panels: loss vs tokens, loss vs wall-clock, lr vs step, gradient norm vs step)
and ``compare-runs.md`` (one row per run: optimizer, steps, tokens, final train loss (mean of the last 10
logged), final and best validation loss, mean tokens/s, wall-clock) into ``--out``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

__all__ = ["Run", "find_runs", "load_run", "write_comparison"]


@dataclass
class Run:
    """The scalars of one run: ``{tag: [(step, wall_time, value), ...]}`` and what ``hparams.yaml`` says."""

    name: str
    folder: Path
    scalars: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)
    tokens_per_step: int | None = None
    optimizer: str = "?"

    def series(self, tag: str) -> list[tuple[int, float, float]]:
        return self.scalars.get(tag, [])

    def first_tag(self, prefix: str) -> str | None:
        return next((t for t in sorted(self.scalars) if t.startswith(prefix)), None)

    @property
    def start_time(self) -> float:
        times = [w for values in self.scalars.values() for _, w, _ in values]
        return min(times) if times else 0.0


def find_runs(dirs: Iterable[str | Path]) -> list[tuple[str, Path]]:
    """``(name, folder)`` for every folder holding an event file under each of ``dirs``; an error names a missing
    folder or one without any run."""
    runs: list[tuple[str, Path]] = []
    for d in dirs:
        root = Path(d)
        if not root.exists():
            raise ValueError(f"compare-runs: {root} does not exist")
        folders = sorted({p.parent for p in root.rglob("events.out.tfevents.*")})
        if not folders:
            raise ValueError(f"compare-runs: no TensorBoard event file under {root}")
        for folder in folders:
            rel = folder.relative_to(root)
            runs.append((str(rel) if str(rel) != "." else folder.name, folder))
    return runs


def load_run(name: str, folder: Path) -> Run:
    """Every scalar of the run's event files, and the tokens per step and optimizer from ``hparams.yaml``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    run = Run(name=name, folder=folder)
    for tag in acc.Tags().get("scalars", []):
        run.scalars[tag] = [(e.step, e.wall_time, e.value) for e in acc.Scalars(tag)]
    hparams = folder / "hparams.yaml"
    if hparams.is_file():
        import yaml

        try:
            data = yaml.safe_load(hparams.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"compare-runs: {hparams} is not readable YAML ({err})") from err
        geometry = data.get("geometry") or {}
        run.tokens_per_step = geometry.get("tokens_per_step")
        run.optimizer = str((data.get("optim") or {}).get("name", "?"))
    return run


def _tail_mean(values: list[tuple[int, float, float]], n: int = 10) -> float:
    tail = [v for _, _, v in values[-n:]]
    return sum(tail) / len(tail) if tail else math.nan


def _fmt(x: float | None, digits: int = 4) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def table(runs: list[Run]) -> str:
    """The markdown table of :func:`write_comparison`."""
    lines = ["| run | optimizer | steps | tokens | final train loss | final val loss | best val loss | tokens/s | "
             "wall-clock |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        train, val = run.series("train/loss"), run.series("val/loss")
        steps = max((s for s, _, _ in train), default=-1) + 1
        tokens = f"{steps * run.tokens_per_step:,}" if run.tokens_per_step and steps > 0 else "—"
        tps = run.series("throughput/tokens_per_sec")
        times = [w for values in run.scalars.values() for _, w, _ in values]
        wall = max(times) - min(times) if times else math.nan
        lines.append(
            f"| {run.name} | {run.optimizer} | {max(steps, 0)} | {tokens} | {_fmt(_tail_mean(train))} | "
            f"{_fmt(val[-1][2] if val else None)} | {_fmt(min((v for _, _, v in val), default=None))} | "
            f"{_fmt(sum(v for _, _, v in tps) / len(tps) if tps else None, 0)} | {_fmt(wall, 1)} s |")
    return "\n".join(lines) + "\n"


def write_comparison(dirs: Iterable[str | Path], out: str | Path) -> tuple[Path, Path]:
    """Load every run under ``dirs``; write ``compare-runs.png`` and ``compare-runs.md`` into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load_run(name, folder) for name, folder in find_runs(dirs)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (ax_tok, ax_wall), (ax_lr, ax_gn) = axes
    for run in runs:
        scale = run.tokens_per_step or 1
        t0 = run.start_time
        for tag, style in (("train/loss", "-"), ("val/loss", "o--")):
            values = run.series(tag)
            if not values:
                continue
            label = f"{run.name} {tag.split('/')[0]}"
            ax_tok.plot([s * scale for s, _, _ in values], [v for _, _, v in values], style, label=label, ms=3)
            ax_wall.plot([w - t0 for _, w, _ in values], [v for _, _, v in values], style, label=label, ms=3)
        lr_tag = run.first_tag("lr-")
        if lr_tag:
            values = run.series(lr_tag)
            ax_lr.plot([s for s, _, _ in values], [v for _, _, v in values], label=f"{run.name} {lr_tag}")
        values = run.series("train/grad_norm")
        if values:
            ax_gn.plot([s for s, _, _ in values], [v for _, _, v in values], label=run.name)
    any_tokens = any(r.tokens_per_step for r in runs)
    ax_tok.set(xlabel="tokens" if any_tokens else "optimizer step", ylabel="loss", title="loss vs tokens")
    ax_wall.set(xlabel="wall-clock (s)", ylabel="loss", title="loss vs wall-clock")
    ax_lr.set(xlabel="optimizer step", ylabel="lr", title="learning rate")
    ax_gn.set(xlabel="optimizer step", ylabel="norm", title="gradient norm (before clipping)")
    for ax in axes.flat:
        if ax.lines:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png, md = out / "compare-runs.png", out / "compare-runs.md"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    md.write_text("# Runs compared\n\n" + table(runs))
    return png, md
