"""Recipe throughput vs a plain PyTorch loop: same model, data, batch and optimizer, on CPU, in one run.

    python benchmarks/throughput.py [--steps 30] [--warmup 5] [--n_layer 4 --n_embd 192]

Both sides train the tiny Llama preset on the offline default corpus with AdamW (fused) and a constant lr,
one micro-batch per step. The recipe side is the full Lightning stack of ``recipes/_cli.py`` (LightningCLI,
TokenDataModule, logging to TensorBoard, throughput monitor, checkpoint callback, progress bar off); the plain
loop iterates the same ``WindowStream`` and calls ``loss.backward(); clip; opt.step(); zero_grad()``.
The two alternate in rounds so a busy machine slows both alike. Writes benchmarks/results/throughput.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lightning_optim import OptimConfig, create_optimizer, create_scheduler  # noqa: E402


class _Timer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.t1 = warmup, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.t0 is None:
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.t1 = time.perf_counter()


def run_recipe(args, workdir: Path) -> float:
    from _cli import main

    timer = _Timer(args.warmup)
    argv = ["--trainer.max_steps", str(args.warmup + args.steps), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0",
            "--data.val_every_n_steps", str(10**9), "--model.n_layer", str(args.n_layer), "--model.n_embd",
            str(args.n_embd), "--model.n_head", str(args.n_head), "--optim.scheduler", "constant",
            "--optim.warmup_steps", "0", "--trainer.gradient_clip_val", "1.0"]
    os.chdir(workdir)
    import _cli

    orig = _cli.LightningCLI.instantiate_trainer

    def instantiate_trainer(self, **kw):
        trainer = orig(self, **kw)
        trainer.callbacks.append(timer)
        return trainer

    _cli.LightningCLI.instantiate_trainer = instantiate_trainer
    try:
        cli = main("tiny", args=argv)
    finally:
        _cli.LightningCLI.instantiate_trainer = orig
    tokens = args.steps * cli.datamodule.global_batch_size * cli.datamodule.seq_len
    return tokens / (timer.t1 - timer.t0)


def run_plain(args) -> float:
    from lightning_optim.data import TokenDataModule
    from lightning_optim.models import build_model

    L.seed_everything(1337)
    dm = TokenDataModule(seq_len=128, global_batch_size=16, show_progress=False)
    dm.setup("fit")
    model = build_model("tiny", "llama", vocab_size=-(-dm.vocab_size // 64) * 64, block_size=128,
                        n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head)
    cfg = OptimConfig(name="adamw", lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1)
    from lightning_optim import param_groups

    opt = create_optimizer("adamw", param_groups(model), **cfg.optimizer_kwargs())
    sched = create_scheduler("constant", opt, total_steps=None, warmup_steps=0)
    it = iter(dm.train_dataset())
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            t0 = time.perf_counter()
        x, y = next(it)
        loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return args.steps * 16 * 128 / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=192)
    p.add_argument("--n_head", type=int, default=6)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "throughput.md"))
    args = p.parse_args()
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="lo-throughput-"))
    recipe, plain = [], []
    for _ in range(args.rounds):
        plain.append(run_plain(args))
        recipe.append(run_recipe(args, work))
    r, q = max(recipe), max(plain)
    text = (f"# Recipe throughput vs a plain PyTorch loop (CPU)\n\n"
            f"tiny Llama ({args.n_layer} layers, d={args.n_embd}), seq 128, batch 16, AdamW, clip 1.0, "
            f"{args.steps} timed steps after {args.warmup}, best of {args.rounds} alternating rounds, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads.\n\n"
            f"| loop | tokens/s (each round) | best |\n|---|---|---|\n"
            f"| plain PyTorch | {', '.join(f'{v:.0f}' for v in plain)} | {q:.0f} |\n"
            f"| Lightning recipe | {', '.join(f'{v:.0f}' for v in recipe)} | {r:.0f} |\n\n"
            f"**ratio recipe / plain = {r / q:.3f}** (target >= 0.95)\n")
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
