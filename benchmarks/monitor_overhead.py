"""Overhead of LayerNormMonitor (and the other stability callbacks) on the tiny recipe's step.

    python benchmarks/monitor_overhead.py                 # CPU (or CUDA when present), writes the table below
    python benchmarks/monitor_overhead.py --steps 400 --repeats 3

The model is ``lightning_optim.models.LanguageModel("tiny")`` (Llama-style, 4 layers, width 192) with the tiny
recipe's shape: sequence 128, batch 16, AdamW; the vocabulary is 4096 random tokens (no download, no tokenizer;
the step time hardly depends on the data). When ``lightning_optim.models`` is missing a small GPT-like stand-in of
the same shape is used and the table says so.

Two measurements per configuration:

- **wall**: median optimizer-step time over the run (after warm-up), each configuration run ``--repeats`` times,
  interleaved, so slow drift of a shared machine hits all of them alike;
- **in-callback**: the time spent inside the callbacks' hooks, divided by the total step time. On CUDA both are
  wall time (``time.perf_counter`` with a device synchronize around each call); on CPU both are this process's
  CPU time (``time.process_time``), which on a machine shared with other jobs measures the work done rather than
  the neighbours (run with ``--threads 1`` so that idle worker threads do not spin). This is the precise number;
  the wall-clock difference is the end-to-end check.

Writes ``benchmarks/results/monitor_overhead.md``.
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_optim.callbacks import GradientClipping, LayerNormMonitor, LossSpikeDetector, NonFiniteGuard, ZLoss

VOCAB, SEQ = 4096, 128
BATCH = 16  # the tiny recipe's global batch; --batch changes it
OUT = Path(__file__).parent / "results" / "monitor_overhead.md"


class RandomTokens(Dataset):
    def __init__(self, n: int) -> None:
        self.data = torch.randint(0, VOCAB, (n, SEQ + 1), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i, :-1], self.data[i, 1:]


def make_model() -> tuple[L.LightningModule, str]:
    try:
        from lightning_optim.models import LanguageModel

        model = LanguageModel("tiny", arch="llama", vocab_size=VOCAB, block_size=SEQ,
                              optim={"name": "adamw", "lr": 1e-3, "scheduler": "cosine", "warmup_steps": 10})
        return model, "lightning_optim.models.LanguageModel('tiny', arch='llama')"
    except ImportError:
        return _StandIn(), "stand-in GPT (lightning_optim.models missing): 4 layers, width 192"


class _StandIn(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(192, 6, 768, batch_first=True, norm_first=True)
        self.emb = torch.nn.Embedding(VOCAB, 192)
        self.blocks = torch.nn.TransformerEncoder(layer, 4)
        self.lm_head = torch.nn.Linear(192, VOCAB, bias=False)

    def forward(self, x):
        mask = torch.nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        return self.lm_head(self.blocks(self.emb(x), mask=mask, is_causal=True))

    def training_step(self, batch, i):
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _clock() -> float:
    """Wall time on CUDA (the GPU's time is what matters), this process's CPU time on CPU."""
    return time.perf_counter() if torch.cuda.is_available() else time.process_time()


class StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []        # wall
        self.clock_times: list[float] = []  # the in-callback clock (_clock)
        self._t = self._c = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        _sync()
        self._t, self._c = time.perf_counter(), _clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        _sync()
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._t)
            self.clock_times.append(_clock() - self._c)


def instrument(cb: L.Callback, hooks: tuple[str, ...]) -> list[float]:
    """Wrap ``cb``'s hooks to accumulate the time spent in them; returns the (mutable) accumulator."""
    spent = [0.0]

    def wrap(fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            _sync()
            t = _clock()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync()
                spent[0] += _clock() - t
        return timed

    for name in hooks:
        if hasattr(cb, name):
            setattr(cb, name, wrap(getattr(cb, name)))
    return spent


HOOKS = ("on_before_optimizer_step", "on_train_batch_end", "on_before_backward", "on_train_start")


def run(config: str, steps: int, warmup: int, device: str) -> dict:
    L.seed_everything(0)
    model, model_desc = make_model()
    callbacks: list[L.Callback] = []
    if config.startswith("monitor"):
        callbacks.append(LayerNormMonitor(every_n_steps=int(config.split("@")[1])))
    elif config == "stability":
        callbacks += [LossSpikeDetector(action="skip"), NonFiniteGuard(), GradientClipping(max_norm=1.0),
                      ZLoss(alpha=1e-4)]
    elif config == "guard+spike+clip":  # the per-step decision makers alone (runs on older versions too)
        callbacks += [LossSpikeDetector(action="skip"), NonFiniteGuard(), GradientClipping(max_norm=1.0)]
    elif config in ("defaults", "defaults-off"):  # what recipes turn on by default, and the same switched off
        on = config == "defaults"
        callbacks += [NonFiniteGuard(enabled=on), LossSpikeDetector(action="skip", enabled=on),
                      GradientClipping(max_norm=1.0, enabled=on), LayerNormMonitor(every_n_steps=50, enabled=on)]
    spent = [instrument(cb, HOOKS) for cb in callbacks]
    timer = StepTimer(warmup)
    trainer = L.Trainer(accelerator=device, devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks + [timer])
    t0 = time.perf_counter()
    trainer.fit(model, DataLoader(RandomTokens(steps * BATCH), batch_size=BATCH))
    total = time.perf_counter() - t0
    timed_steps = len(timer.times)
    in_cb = sum(s[0] for s in spent)
    # hook time spent during the warm-up steps is small and counted (conservative)
    return {"median": statistics.median(timer.times), "mean": statistics.fmean(timer.times),
            "steps_time": sum(timer.clock_times), "in_callback": in_cb, "total": total, "timed_steps": timed_steps,
            "model": model_desc}


def main() -> None:
    global BATCH
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--batch", type=int, default=BATCH, help="sequences per step (smaller: the monitor's "
                        "share of the step grows, so the overhead measured is an upper bound)")
    parser.add_argument("--configs", default="baseline,monitor@50,monitor@1,stability,guard+spike+clip,defaults,defaults-off")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    BATCH = args.batch
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "gpu" if torch.cuda.is_available() else "cpu"
    configs = args.configs.split(",")
    results: dict[str, list[dict]] = {c: [] for c in configs}
    for _ in range(args.repeats):
        for c in configs:
            results[c].append(run(c, args.steps, args.warmup, device))
            print(c, {k: round(v, 5) if isinstance(v, float) else v for k, v in results[c][-1].items()})
    base = statistics.median(r["median"] for r in results["baseline"])
    rows = []
    for c in configs:
        med = statistics.median(r["median"] for r in results[c])
        frac = statistics.median(r["in_callback"] / r["steps_time"] for r in results[c]) if c != "baseline" else 0.0
        per_step = statistics.median(r["in_callback"] / r["timed_steps"] for r in results[c])
        rows.append(f"| {c} | {med * 1e3:.1f} | {100 * (med / base - 1):+.1f}% | {per_step * 1e3:.2f} | "
                    f"{100 * frac:.2f}% |")
    clock = "wall" if device == "gpu" else "CPU time"
    device_name = torch.cuda.get_device_name() if device == "gpu" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    text = "\n".join([
        "# LayerNormMonitor / stability-callback overhead",
        "",
        f"Model: {results['baseline'][0]['model']}; sequence {SEQ}, batch {BATCH}, vocabulary {VOCAB}, AdamW.",
        f"Device: {device_name}; torch {torch.__version__}, lightning {L.__version__}.",
        f"{args.steps} steps per run ({args.warmup} warm-up steps not timed), {args.repeats} interleaved repeats.",
        "",
        f"| configuration | median step, wall (ms) | wall vs baseline | in the callbacks per step ({clock}, ms) "
        f"| in the callbacks / step ({clock}) |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "`monitor@N`: LayerNormMonitor(every_n_steps=N). `stability`: LossSpikeDetector(skip) + NonFiniteGuard +",
        "GradientClipping(1.0) + ZLoss(1e-4), which act on every step; `guard+spike+clip` the same without ZLoss.",
        "`defaults`: what recipes turn on by default,",
        "NonFiniteGuard + LossSpikeDetector(skip) + GradientClipping(1.0) + LayerNormMonitor(every_n_steps=50);",
        "`defaults-off`: the same four with enabled=False. The guard and the detector share one decision round (one",
        "host sync) per step, and they and the clipping share one gradient-norm pass.",
        "The in-callback column is the precise cost; the wall column also carries the noise of the machine.",
        "Reproduce: `" + " ".join(["python benchmarks/monitor_overhead.py", *sys.argv[1:]]) + "`.",
        "",
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
