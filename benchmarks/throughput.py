"""Recipe throughput, stability defaults on and off, against a plain PyTorch loop doing the same clipping.

    python benchmarks/throughput.py [--steps 50] [--warmup 5] [--rounds 3] [--batch 16] [--n_layer 4 --n_embd 192]

Three loops train the tiny Llama preset on the offline default corpus with AdamW (fused), a constant lr and
global-norm clipping at 1.0, one micro-batch of ``--batch`` (the recipe's 16) × 128 tokens per step. A smaller
batch makes a step cheaper while the callbacks' work (a function of the parameter count) stays the same, so the
ratios it gives are lower bounds for the recipe:

- **plain PyTorch**: iterates the same ``WindowStream``; ``loss.backward(); clip_grad_norm_(params, 1.0);
  opt.step(); zero_grad()``;
- **recipe, stability defaults on**: the full Lightning stack of ``recipes/_cli.py`` (LightningCLI,
  TokenDataModule, TensorBoard logging, throughput monitor, checkpoint callback, progress bar off) with
  ``NonFiniteGuard()``, ``LossSpikeDetector(action="skip")``, ``GradientClipping(max_norm=1.0)`` (instead of
  the Trainer's ``gradient_clip_val``) and ``LayerNormMonitor(every_n_steps=50)``. When the recipe already adds
  these callbacks, its own instances are used; otherwise the benchmark adds them with those settings (the table
  says which);
- **recipe, defaults off**: the same recipe with those four callbacks disabled (``enabled=False``, what
  ``--<group>.enabled false`` sets) and Lightning's ``gradient_clip_val=1.0`` clipping instead, so that every
  loop clips.

The timed window is ``--steps`` optimizer steps after ``--warmup`` (so with the defaults it holds step 50, a
LayerNormMonitor logging step). The loops run side by side in rounds, in a rotating order, so that a busy machine
slows all of them alike; the table reports every round and the best of each. Writes
``benchmarks/results/throughput.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lightning_optim import OptimConfig, create_optimizer, create_scheduler, param_groups  # noqa: E402
from lightning_optim.callbacks import (  # noqa: E402
    GradientClipping, LayerNormMonitor, LossSpikeDetector, NonFiniteGuard,
)

STABILITY = (NonFiniteGuard, LossSpikeDetector, GradientClipping, LayerNormMonitor)
CLIP = 1.0
SEQ = 128


def stability_defaults() -> list[L.Callback]:
    """The four callbacks with the settings recommended for recipes (used when the recipe has none)."""
    return [NonFiniteGuard(max_consecutive=5), LossSpikeDetector(action="skip", window=128, threshold=6.0),
            GradientClipping(max_norm=CLIP), LayerNormMonitor(every_n_steps=50)]


def clocks() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads). The loaders run in-process (no workers)."""
    return time.perf_counter(), time.process_time()


class _Timer(L.Callback):
    """Wall and CPU time from the start of step ``warmup`` to the end of step ``warmup + steps - 1``."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps, self.t0, self.t1 = warmup, steps, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.t0 is None:
            self.t0 = clocks()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.warmup + self.steps and self.t1 is None:
            self.t1 = clocks()


def run_recipe(args, workdir: Path, stability: bool) -> tuple[tuple[float, float], str]:
    """(tokens per wall second, tokens per CPU second) of the tiny recipe with the stability callbacks on or
    off, and where they came from."""
    import _cli

    timer = _Timer(args.warmup, args.steps)
    argv = ["--trainer.max_steps", str(args.warmup + args.steps), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0",
            "--data.val_every_n_steps", str(10**9), "--model.n_layer", str(args.n_layer), "--model.n_embd",
            str(args.n_embd), "--model.n_head", str(args.n_head), "--optim.scheduler", "constant",
            "--optim.warmup_steps", "0", "--trainer.gradient_clip_val", "null" if stability else str(CLIP),
            "--data.global_batch_size", str(args.batch), "--data.micro_batch_size", str(args.batch)]
    if not stability:  # the recipe's own switches; the Trainer clips instead of GradientClipping
        argv += ["--nonfinite.enabled", "false", "--spike.enabled", "false", "--clipping.enabled", "false",
                 "--norms.enabled", "false"]
    os.chdir(workdir)
    source = {"value": ""}
    orig = _cli.RecipeCLI.instantiate_trainer

    def instantiate_trainer(self, **kw):
        trainer = orig(self, **kw)
        own = [cb for cb in trainer.callbacks if isinstance(cb, STABILITY)]
        if stability:
            if own:
                source["value"] = "the recipe's own: " + ", ".join(type(cb).__name__ for cb in own)
            else:
                trainer.callbacks.extend(stability_defaults())
                source["value"] = "added by the benchmark (the recipe has none)"
        else:
            for cb in own:
                cb.enabled = False
            source["value"] = f"{len(own)} recipe callbacks disabled" if own else "none in the recipe"
        trainer.callbacks.append(timer)
        return trainer

    _cli.RecipeCLI.instantiate_trainer = instantiate_trainer
    try:
        cli = _cli.main("tiny", args=argv)
    finally:
        _cli.RecipeCLI.instantiate_trainer = orig
    if timer.t0 is None or timer.t1 is None:
        raise RuntimeError("the recipe run ended before the timed window closed")
    tokens = args.steps * cli.datamodule.global_batch_size * cli.datamodule.seq_len
    return _rates(tokens, timer.t0, timer.t1), source["value"]


def _rates(tokens: int, t0: tuple[float, float], t1: tuple[float, float]) -> tuple[float, float]:
    return tokens / (t1[0] - t0[0]), tokens / (t1[1] - t0[1])


def run_plain(args) -> tuple[float, float]:
    from lightning_optim.data import TokenDataModule
    from lightning_optim.models import build_model

    L.seed_everything(1337)
    dm = TokenDataModule(seq_len=SEQ, global_batch_size=args.batch, show_progress=False)
    dm.setup("fit")
    model = build_model("tiny", "llama", vocab_size=-(-dm.vocab_size // 64) * 64, block_size=SEQ,
                        n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head)
    cfg = OptimConfig(name="adamw", lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1)
    opt = create_optimizer("adamw", param_groups(model), **cfg.optimizer_kwargs())
    sched = create_scheduler("constant", opt, total_steps=None, warmup_steps=0)
    it = iter(dm.train_dataset())
    t0 = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            t0 = clocks()
        x, y = next(it)
        loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return _rates(args.steps * args.batch * SEQ, t0, clocks())


LOOPS = ("plain PyTorch", "recipe, stability defaults on", "recipe, defaults off")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=16, help="sequences per step (the tiny recipe's 16)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=192)
    p.add_argument("--n_head", type=int, default=6)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "throughput.md"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    command = "python benchmarks/throughput.py " + " ".join(sys.argv[1:])
    del sys.argv[1:]  # LightningCLI gets its arguments from run_recipe, not from this command line
    work = Path(tempfile.mkdtemp(prefix="lo-throughput-"))
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in LOOPS}
    sources: set[str] = set()
    for r in range(args.rounds):
        order = LOOPS[r % 3:] + LOOPS[:r % 3]  # rotate so no loop always runs first or last
        for name in order:
            if name == LOOPS[0]:
                value = run_plain(args)
            else:
                value, source = run_recipe(args, work, stability=(name == LOOPS[1]))
                if name == LOOPS[1]:
                    sources.add(source)
            results[name].append(value)
            print(f"round {r + 1}: {name}: {value[0]:.0f} tokens/s wall, {value[1]:.0f} tokens/CPU-s", flush=True)
    best = {name: (max(v[0] for v in values), max(v[1] for v in values)) for name, values in results.items()}
    plain, on, off = (best[name] for name in LOOPS)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    def row(name: str) -> str:
        walls = ", ".join(f"{v[0]:.0f}" for v in results[name])
        cpus = ", ".join(f"{v[1]:.0f}" for v in results[name])
        b = best[name]
        return f"| {name} | {walls} | {b[0]:.0f} | {b[0] / plain[0]:.3f} | {cpus} | {b[1]:.0f} | {b[1] / plain[1]:.3f} |"

    text = (
        "# Recipe throughput vs a plain PyTorch loop (CPU)\n\n"
        f"tiny Llama ({args.n_layer} layers, d={args.n_embd}), seq {SEQ}, batch {args.batch}, AdamW, global-norm "
        f"clipping {CLIP} in every loop, {args.steps} timed steps after {args.warmup}, best of {args.rounds} rounds "
        f"run side by side in rotating order; torch {torch.__version__}, lightning {L.__version__}, "
        f"{torch.get_num_threads()} threads, load average {load:.1f} at the end.\n\n"
        "| loop | tokens/s wall (each round) | best | / plain | tokens per CPU-second (each round) | best | / plain |\n"
        "|---|---|---:|---:|---|---:|---:|\n"
        + "\n".join(row(name) for name in LOOPS) + "\n\n"
        f"**recipe with stability defaults on / plain: {on[0] / plain[0]:.3f} (wall), {on[1] / plain[1]:.3f} "
        f"(CPU time)** (target >= 0.95); defaults off / plain: {off[0] / plain[0]:.3f} (wall), "
        f"{off[1] / plain[1]:.3f} (CPU); on / off: {on[0] / off[0]:.3f} (wall), {on[1] / off[1]:.3f} (CPU).\n\n"
        "Stability defaults on: NonFiniteGuard(max_consecutive=5), LossSpikeDetector(action='skip', window=128, "
        "threshold=6), GradientClipping(max_norm=1.0) replacing gradient_clip_val, "
        "LayerNormMonitor(every_n_steps=50); source: " + "; ".join(sorted(sources)) + ". "
        "Off: those callbacks disabled, Trainer(gradient_clip_val=1.0). CPU time is the process's own (all threads; "
        "the data loaders run in-process): on a machine shared with other jobs it measures the work each loop does, "
        "while wall time also measures the neighbours.\n\n"
        f"Reproduce: `{command.strip()}`.\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
