"""Optimizer comparison: the same model, data order, seed and token budget, one optimizer (and schedule) per run.

Usage::

    python benchmarks/compare.py                                   # every registered optimizer, CPU config
    python benchmarks/compare.py --optimizers adamw muon ademamix --schedules cosine wsd
    python benchmarks/compare.py --config gpu-124m                 # the benchmark's 124M setup (needs a GPU)
    python benchmarks/compare.py --list                            # the runs it would do, and which are done
    tensorboard --logdir benchmarks/out/compare-cpu/tb             # all runs side by side

Writes

* ``benchmarks/out/compare-<config>/runs/<optimizer>__<schedule>.json``: one file per finished run (curves,
  throughput, memory, optimizer-state bytes, skipped steps, settings);
* ``benchmarks/out/compare-<config>/tb/<run>/``: TensorBoard logs, one run per directory;
* ``benchmarks/results/compare-<config>.md`` and ``.png``: the table, and validation loss against tokens
  and against wall-clock time (``--results-dir`` changes where).

**Resuming.** A run whose JSON exists with the same settings is not run again; a run that was interrupted
has no JSON and is run again from its start. So re-running the same command after an interruption
completes the missing runs only (``--rerun`` forces them all; ``--retry-failed`` reruns runs that raised).

**Fairness.** Every run seeds the model initialisation with the same seed, and the data module's sampling is a
pure function of (data seed, step), so every optimizer sees the same batches in the same order and is
evaluated on the same validation windows. Each optimizer uses its registered defaults (the published best
settings at 124M of Semenov et al. 2025, arXiv 2509.01440) with the config's warmup, gradient clipping and schedule;
schedule-free optimizers run with a constant schedule and their own warmup set to the config's. WSD runs use ``wsd_lr_scale`` × the
peak lr (the benchmark runs WSD at half the cosine peak).

Columns: final and best validation loss; training throughput in tokens/s (wall-clock of the training steps,
validation excluded); peak memory (CUDA: ``max_memory_allocated``; CPU: the process's peak resident set
during the run, which includes the interpreter and libraries); optimizer-state bytes actually allocated
(:func:`lightning_optim.memory.measure_state_bytes`) beside the estimator's figure; steps skipped by the
stability callbacks (non-finite or spiking loss).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass
class CompareConfig:
    """One comparison setting: model, data, budget and the training recipe shared by every run."""

    preset: str = "tiny"
    arch: str = "llama"
    model_overrides: dict[str, int] = field(default_factory=dict)  # n_layer, n_embd, n_head, mlp_hidden
    seq_len: int = 128
    batch_size: int = 16  # sequences per optimizer step
    micro_batch_size: int | None = None
    tokens: int = 2048 * 150  # training budget
    warmup_fraction: float = 0.1
    val_every_n_steps: int = 25
    val_sequences: int = 32
    grad_clip: float = 0.5
    wsd_lr_scale: float = 0.5
    precision: str = "32-true"
    accelerator: str = "auto"
    compile: bool = False
    seed: int = 0
    data: dict[str, Any] = field(default_factory=lambda: {"tokenizer": "bpe:4096"})
    schedules: tuple[str, ...] = ("cosine",)
    # extra (optimizer, schedule) runs beyond optimizers × schedules: the schedule comparisons of the README
    extra_runs: tuple[tuple[str, str], ...] = (("adamw", "wsd"), ("adamw", "linear"), ("muon", "wsd"), ("d-muon", "wsd"))

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size

    @property
    def steps(self) -> int:
        steps = max(1, self.tokens // self.tokens_per_step)
        return int(math.ceil(steps / self.val_every_n_steps) * self.val_every_n_steps)  # end on a validation

    @property
    def warmup_steps(self) -> int:
        return max(1, int(round(self.warmup_fraction * self.steps))) if self.warmup_fraction > 0 else 0

    def fingerprint(self) -> str:
        data = dataclasses.asdict(self)
        for key in ("schedules", "extra_runs", "accelerator"):  # which runs, not how one run trains
            data.pop(key)
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


CONFIGS: dict[str, CompareConfig] = {
    # CPU: every registered optimizer in < 30 min on a 2-core machine. The tiny preset narrowed to 2 layers of
    # width 128 (about 1M parameters with the default 4096-token BPE), 150 steps of 16×128 tokens (307k
    # tokens) on the offline default corpus (the Python standard library's source).
    "cpu": CompareConfig(model_overrides={"n_layer": 2, "n_embd": 128, "n_head": 4}),
    # The unit tests' smoke configuration: seconds per run.
    "smoke": CompareConfig(
        model_overrides={"n_layer": 1, "n_embd": 32, "n_head": 2}, seq_len=32, batch_size=4, tokens=4 * 32 * 4,
        val_every_n_steps=2, val_sequences=4, warmup_fraction=0.25,
        data={"tokenizer": "bpe:512", "max_bytes": 400_000, "tokenizer_train_bytes": 400_000}, extra_runs=(),
    ),
    # The 124M setting of Semenov et al. 2025 (arXiv 2509.01440): Llama-style 124M, vocab 50304, sequences of
    # 512, batch 256 (131k tokens per step), warmup 2000, clipping 0.5, cosine to 0.01x, 2.1B tokens (16k
    # steps) of FineWeb with the GPT-2 tokenizer, bf16. Needs a GPU and the network (streams FineWeb).
    "gpu-124m": CompareConfig(
        preset="124m", seq_len=512, batch_size=256, micro_batch_size=64, tokens=256 * 512 * 16_000,
        warmup_fraction=2000 / 16_000, val_every_n_steps=1000, val_sequences=1024, precision="bf16-mixed",
        accelerator="gpu", compile=True,
        data={"dataset": "HuggingFaceFW/fineweb", "dataset_config": "sample-10BT", "tokenizer": "gpt2",
              "max_tokens": 2_200_000_000, "num_workers": 4},
        schedules=("cosine", "wsd"), extra_runs=(),
    ),
}


# ------------------------------------------------------------------------------------------------------------
# Which runs


def run_id(optimizer: str, schedule: str) -> str:
    return f"{optimizer}__{schedule}"


def plan_runs(cfg: CompareConfig, optimizers: list[str] | None, schedules: list[str] | None) -> list[tuple[str, str]]:
    """(optimizer, schedule) pairs: optimizers × schedules, plus the config's extra runs (for the optimizers
    asked for) unless schedules are given.
    Schedule-free optimizers always run with the constant schedule (once)."""
    from lightning_optim import available_optimizers, optimizer_info

    registered = available_optimizers()
    names = optimizers or registered
    scheds = list(schedules or cfg.schedules)
    pairs: list[tuple[str, str]] = [(o, s) for o in names for s in scheds]
    if schedules is None:  # the config's schedule comparisons, for the optimizers asked for
        wanted = {optimizer_info(o).name for o in names}
        pairs += [(o, s) for o, s in cfg.extra_runs if o in registered and o in wanted]
    out: list[tuple[str, str]] = []
    for o, s in pairs:
        spec = optimizer_info(o)  # raises for an unknown name, with close matches
        if spec.schedule_free:
            s = "constant"
        if (spec.name, s) not in out:
            out.append((spec.name, s))
    return out


# ------------------------------------------------------------------------------------------------------------
# Peak memory


class PeakMemory:
    """Peak memory during a run: CUDA's allocator peak, or on CPU the peak resident set (Linux ``VmHWM``,
    reset through ``/proc/self/clear_refs``; elsewhere the process's lifetime peak)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def reset(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def read(self) -> int:
        import torch

        if self.cuda:
            return int(torch.cuda.max_memory_allocated())
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ------------------------------------------------------------------------------------------------------------
# One run


def _recorder_class():
    import lightning as L
    import torch

    class Recorder(L.Callback):
        """Validation loss against tokens and training wall-clock; train loss; throughput."""

        def __init__(self, tokens_per_step: int, peak: PeakMemory) -> None:
            self.tokens_per_step = tokens_per_step
            self.peak = peak
            self.val: list[dict[str, float]] = []
            self.train: list[dict[str, float]] = []
            self.train_time = 0.0
            self._t: float | None = None
            self._sync = torch.cuda.synchronize if peak.cuda else (lambda: None)

        def on_train_start(self, trainer, pl_module) -> None:
            self.peak.reset()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self._t is None:
                self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self._t is not None and (batch_idx + 1) % max(trainer.accumulate_grad_batches, 1) == 0:
                self._sync()
                self.train_time += time.perf_counter() - self._t
                self._t = None
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                if loss is not None and (trainer.global_step % 5 == 0 or trainer.global_step == 1):
                    self.train.append({"step": trainer.global_step, "loss": float(loss)})

        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            if trainer.sanity_checking:
                return
            value = trainer.callback_metrics.get("val/loss")
            if value is None:
                return
            step = trainer.global_step
            self.val.append({"step": step, "tokens": step * self.tokens_per_step, "time": self.train_time,
                             "loss": float(value)})

    return Recorder


def run_one(cfg: CompareConfig, optimizer: str, schedule: str, out_dir: Path) -> dict[str, Any]:
    """Train one (optimizer, schedule) run and return its record (also the JSON's content)."""
    import logging

    import lightning as L
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    from lightning_optim import OptimConfig, optimizer_info
    from lightning_optim.callbacks import LossSpikeDetector, NonFiniteGuard
    from lightning_optim.data import TokenDataModule
    from lightning_optim.memory import estimate_memory, measure_state_bytes
    from lightning_optim.models import LanguageModel

    spec = optimizer_info(optimizer)
    lr = spec.defaults.get("lr")
    if schedule == "wsd" and lr is not None:
        lr = lr * cfg.wsd_lr_scale
    steps, warmup = cfg.steps, cfg.warmup_steps
    extra: dict[str, Any] = {}
    if spec.schedule_free and "warmup_steps" in spec.defaults:
        # the optimizer warms up itself (its default is the benchmark's 2000 steps): give it the run's warmup
        # and no external warmup on top
        extra["warmup_steps"], warmup = warmup, 0
    optim = OptimConfig(name=optimizer, scheduler=schedule, warmup_steps=warmup, total_steps=steps,
                        lr=lr if schedule == "wsd" else None, extra=extra)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    data = dict(cfg.data)
    dm = TokenDataModule(seq_len=cfg.seq_len, global_batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size,
                         val_every_n_steps=cfg.val_every_n_steps, val_sequences=cfg.val_sequences, seed=cfg.seed + 1234,
                         show_progress=False, **data)
    dm.prepare_data()
    model = LanguageModel(cfg.preset, arch=cfg.arch, optim=optim, tokenizer_vocab_size=dm.vocab_size,
                          block_size=cfg.seq_len, compile=cfg.compile, **cfg.model_overrides)
    accelerator = cfg.accelerator
    cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    peak = PeakMemory(cuda)
    recorder = _recorder_class()(cfg.tokens_per_step, peak)
    guard = NonFiniteGuard(max_consecutive=10, on_give_up="stop")
    spikes = LossSpikeDetector(action="skip", window=50, threshold=6.0, on_give_up="stop")
    name = run_id(optimizer, schedule)
    logger = TensorBoardLogger(save_dir=str(out_dir / "tb"), name=name, version="", default_hp_metric=False)
    trainer = L.Trainer(
        max_steps=steps, accelerator="gpu" if cuda else "cpu", devices=1, precision=cfg.precision,
        gradient_clip_val=cfg.grad_clip or None, logger=logger, callbacks=[recorder, guard, spikes],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        log_every_n_steps=5,
    )
    started = time.perf_counter()
    trainer.fit(model, dm)
    wall = time.perf_counter() - started
    opt = trainer.optimizers[0]
    state_bytes = measure_state_bytes(opt)
    est = estimate_memory(optimizer, module=model.model, weight_dtype=next(model.parameters()).dtype)
    vals = [v["loss"] for v in recorder.val]
    finite = [v for v in vals if math.isfinite(v)]
    trained_steps = trainer.global_step
    return {
        "run": name, "optimizer": optimizer, "schedule": schedule, "status": "ok" if trained_steps >= steps else
        f"stopped at step {trained_steps}", "lr": opt.param_groups[0].get("initial_lr", lr),
        "fingerprint": cfg.fingerprint(), "config": dataclasses.asdict(cfg),
        "steps": trained_steps, "tokens": trained_steps * cfg.tokens_per_step, "warmup_steps": warmup,
        "n_params": sum(p.numel() for p in model.parameters()),
        "optimizer_warmup_steps": extra.get("warmup_steps"),
        "final_val_loss": vals[-1] if vals else float("nan"), "best_val_loss": min(finite) if finite else float("nan"),
        "tokens_per_s": trained_steps * cfg.tokens_per_step / max(recorder.train_time, 1e-9),
        "train_time_s": recorder.train_time, "wall_s": wall, "peak_memory_bytes": peak.read(),
        "peak_memory_kind": "cuda max_memory_allocated" if cuda else "cpu peak RSS",
        "state_bytes": state_bytes, "state_bytes_estimate": est.state_total,
        "skipped_steps": int(guard.total) + int(spikes.skipped),
        "val": recorder.val, "train": recorder.train, "device": "cuda" if cuda else "cpu",
        "torch_threads": torch.get_num_threads(),
    }


def _write_json(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=float))
    os.replace(tmp, path)  # atomic: a run is either finished (JSON present) or not


def load_done(runs_dir: Path, cfg: CompareConfig) -> dict[str, dict[str, Any]]:
    done = {}
    for p in sorted(runs_dir.glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if rec.get("fingerprint") == cfg.fingerprint():
            done[rec["run"]] = rec
    return done


# ------------------------------------------------------------------------------------------------------------
# Table and plots


def _fmt_bytes(n: float | None) -> str:
    if n is None or not math.isfinite(n):
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _fmt_loss(x: float) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) and math.isfinite(x) else "nan"


def write_table(records: list[dict[str, Any]], cfg: CompareConfig, config_name: str, path: Path,
                missing: list[str]) -> str:
    ok = [r for r in records if "final_val_loss" in r]
    ok.sort(key=lambda r: (not math.isfinite(r["final_val_loss"]), r["final_val_loss"]))
    n_params = ok[0]["n_params"] if ok else 0
    mem_kind = ok[0]["peak_memory_kind"] if ok else ""
    lines = [
        f"# Optimizer comparison: `{config_name}`",
        "",
        f"Model `{cfg.preset}` ({cfg.arch}{', ' + ', '.join(f'{k}={v}' for k, v in cfg.model_overrides.items()) if cfg.model_overrides else ''}; "
        f"{n_params:,} parameters), {cfg.steps} steps × {cfg.tokens_per_step:,} tokens = "
        f"{cfg.steps * cfg.tokens_per_step:,} tokens, warmup {cfg.warmup_steps}, clip {cfg.grad_clip}, seed {cfg.seed}, "
        f"data {json.dumps(cfg.data)}. Same initialisation and batches for every run; each optimizer at its "
        f"registered defaults; WSD at {cfg.wsd_lr_scale}× peak lr; schedule-free optimizers with a constant "
        "schedule and their own warmup set to the run's. Sorted by final validation loss.",
        "",
        "| # | optimizer | schedule | lr | final val loss | best val loss | tokens/s | peak memory | "
        "optimizer state (measured / estimated) | skipped steps | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(ok, 1):
        lr = r.get("lr")
        lines.append(
            f"| {i} | {r['optimizer']} | {r['schedule']} | {lr:.3g} | {_fmt_loss(r['final_val_loss'])} | "
            f"{_fmt_loss(r['best_val_loss'])} | {r['tokens_per_s']:,.0f} | {_fmt_bytes(r['peak_memory_bytes'])} | "
            f"{_fmt_bytes(r['state_bytes'])} / {_fmt_bytes(r['state_bytes_estimate'])} | {r['skipped_steps']} | "
            f"{r['status']} |" if lr is not None else
            f"| {i} | {r['optimizer']} | {r['schedule']} | – | {_fmt_loss(r['final_val_loss'])} | "
            f"{_fmt_loss(r['best_val_loss'])} | {r['tokens_per_s']:,.0f} | {_fmt_bytes(r['peak_memory_bytes'])} | "
            f"{_fmt_bytes(r['state_bytes'])} / {_fmt_bytes(r['state_bytes_estimate'])} | {r['skipped_steps']} | "
            f"{r['status']} |"
        )
    failed = [r for r in records if "final_val_loss" not in r]
    for r in failed:
        lines.append(f"| – | {r['optimizer']} | {r['schedule']} | – | – | – | – | – | – | – | {r['status']} |")
    lines += ["", f"Peak memory: {mem_kind}. tokens/s: training steps only (validation excluded); throughput and "
              "peak memory depend on the machine and on its load while each run ran, the losses do not."]
    if ok:
        dev = ok[0].get("device", "?")
        lines.append(f"Device: {dev}, {ok[0].get('torch_threads', '?')} torch threads.")
    if missing:
        lines += ["", f"Not run yet (rerun the same command to complete): {', '.join(missing)}."]
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend (a notebook's) alone

    ok = sorted([r for r in records if r.get("val")], key=lambda r: r["final_val_loss"] if math.isfinite(
        r["final_val_loss"]) else 1e9)
    fig = Figure(figsize=(13, 5))
    axes = fig.subplots(1, 2, sharey=True)
    cmap = colormaps["tab20"]
    finals = [r["final_val_loss"] for r in ok if math.isfinite(r["final_val_loss"])]
    for i, r in enumerate(ok):
        xs_tok = [v["tokens"] / 1e6 for v in r["val"]]
        xs_t = [v["time"] for v in r["val"]]
        ys = [v["loss"] for v in r["val"]]
        style = "-" if r["schedule"] in ("cosine", "constant") else "--"
        label = f"{r['optimizer']} ({r['schedule']})"
        axes[0].plot(xs_tok, ys, style, marker=".", color=cmap(i % 20), label=label)
        axes[1].plot(xs_t, ys, style, marker=".", color=cmap(i % 20), label=label)
    axes[0].set(xlabel="training tokens (M)", ylabel="validation loss", title=f"{title}: validation loss vs tokens")
    axes[1].set(xlabel="training wall-clock (s, validation excluded)", title="vs wall-clock")
    if finals:
        lo, hi = min(finals), sorted(finals)[len(finals) // 2]
        axes[0].set_ylim(lo - 0.1, max(hi + 1.0, lo + 0.5))
    axes[1].legend(fontsize=7, ncol=2, loc="upper right")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------------------------
# Driver


def compare(
    config: str | CompareConfig = "cpu",
    optimizers: list[str] | None = None,
    schedules: list[str] | None = None,
    out_dir: str | Path | None = None,
    results_dir: str | Path | None = None,
    rerun: bool = False,
    retry_failed: bool = False,
    max_runs: int | None = None,
    tokens: int | None = None,
    val_every: int | None = None,
    verbose: bool = True,
    name: str | None = None,
) -> list[dict[str, Any]]:
    """Run the comparison (skipping finished runs), then write the table and the PNG. Returns the records.

    ``name`` names the output directory and the results files (default: the config's name, with the token
    budget appended when ``tokens`` or ``val_every`` change it)."""
    if isinstance(config, str):
        config_name, cfg = config, dataclasses.replace(CONFIGS[config])
    else:
        config_name, cfg = "custom", config
    if tokens is not None:
        cfg = dataclasses.replace(cfg, tokens=int(tokens))
    if val_every is not None:
        cfg = dataclasses.replace(cfg, val_every_n_steps=int(val_every))
    if name:
        config_name = name
    elif tokens is not None or val_every is not None:
        config_name = f"{config_name}-{cfg.steps}steps"
    out = Path(out_dir) if out_dir else ROOT / "benchmarks" / "out" / f"compare-{config_name}"
    results = Path(results_dir) if results_dir else ROOT / "benchmarks" / "results"
    runs_dir = out / "runs"
    pairs = plan_runs(cfg, optimizers, schedules)
    done = {} if rerun else load_done(runs_dir, cfg)
    if retry_failed:
        done = {k: v for k, v in done.items() if "final_val_loss" in v}
    todo = [p for p in pairs if run_id(*p) not in done]
    if verbose:
        print(f"compare[{config_name}]: {len(pairs)} runs, {len(pairs) - len(todo)} already done, "
              f"{len(todo)} to run ({cfg.steps} steps of {cfg.tokens_per_step} tokens each)", flush=True)
    ran = 0
    for optimizer, schedule in todo:
        if max_runs is not None and ran >= max_runs:
            break
        name = run_id(optimizer, schedule)
        t0 = time.perf_counter()
        try:
            record = run_one(cfg, optimizer, schedule, out)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # recorded so the table shows it; --retry-failed runs it again
            record = {"run": name, "optimizer": optimizer, "schedule": schedule, "fingerprint": cfg.fingerprint(),
                      "status": f"error: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}",
                      "traceback": traceback.format_exc()}
        _write_json(runs_dir / f"{name}.json", record)
        done[name] = record
        ran += 1
        if verbose:
            print(f"  {name:<28} {record['status']:<10} final val {_fmt_loss(record.get('final_val_loss', float('nan')))}"
                  f"  ({time.perf_counter() - t0:.0f}s)", flush=True)
    records = [done[run_id(*p)] for p in pairs if run_id(*p) in done]
    missing = [run_id(*p) for p in pairs if run_id(*p) not in done]
    table = write_table(records, cfg, config_name, results / f"compare-{config_name}.md", missing)
    if any(r.get("val") for r in records):
        plot(records, results / f"compare-{config_name}.png", f"{config_name}")
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="cpu", choices=sorted(CONFIGS))
    parser.add_argument("--optimizers", nargs="+", default=None, help="registry names (default: every one)")
    parser.add_argument("--schedules", nargs="+", default=None, help="default: the config's (cosine)")
    parser.add_argument("--tokens", type=float, default=None, help="override the token budget")
    parser.add_argument("--val-every", type=int, default=None, help="override the validation interval (steps)")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--results-dir", default=None)
    parser.add_argument("--rerun", action="store_true", help="run everything again")
    parser.add_argument("--retry-failed", action="store_true", help="run again the runs that raised")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    parser.add_argument("--name", default=None, help="names the output directory and results files")
    parser.add_argument("--list", action="store_true", help="print the planned runs and which are done")
    args = parser.parse_args(argv)
    if args.list:
        cfg = CONFIGS[args.config]
        name = args.name or args.config
        if args.tokens:
            cfg = dataclasses.replace(cfg, tokens=int(args.tokens))
        if args.val_every:
            cfg = dataclasses.replace(cfg, val_every_n_steps=args.val_every)
        if (args.tokens or args.val_every) and not args.name:
            name = f"{args.config}-{cfg.steps}steps"
        out = Path(args.out_dir) if args.out_dir else ROOT / "benchmarks" / "out" / f"compare-{name}"
        done = load_done(out / "runs", cfg)
        for p in plan_runs(cfg, args.optimizers, args.schedules):
            print(f"{run_id(*p):<30} {'done' if run_id(*p) in done else 'to run'}")
        return 0
    records = compare(args.config, args.optimizers, args.schedules, args.out_dir, args.results_dir, args.rerun,
                      args.retry_failed, args.max_runs, int(args.tokens) if args.tokens else None, args.val_every,
                      name=args.name)
    results = Path(args.results_dir) if args.results_dir else ROOT / "benchmarks" / "results"
    table = sorted(results.glob("compare-*.md"), key=lambda p: p.stat().st_mtime)
    if records and table:
        print(table[-1].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
