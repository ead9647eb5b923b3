"""GPU readiness check: everything this package says about GPUs, measured on one GPU in under 8 minutes.

    python benchmarks/gpu_check.py                    # on a CUDA machine: writes benchmarks/results/gpu_check.md
    python benchmarks/gpu_check.py --smoke --out /tmp/g   # CPU, toy sizes, < 60 s: keeps every part from rotting

Parts (each runs under its own time budget; a part that fails is reported in the file and the others still
run; the exit status is 1 if any part failed):

1. **GPU tests** — ``pytest -m gpu tests`` (the tests marked ``gpu``; on CPU they are collected and skipped).
2. **Step times** — every case of ``benchmarks/cases_*.py`` (ours as ``create_optimizer`` builds it, i.e. the
   default ``compiled="auto"`` path, against every installed peer) on the GPT-shaped 23.6M-parameter set of
   ``benchmarks/step_time.py``, with torch's fused AdamW as the floor; also written as ``gpu_step_time.md``.
3. **Training** — the ``gpt124m`` recipe in-process (``recipes/_cli.py``'s ``main("124m", arch="gpt2",
   name="gpt124m", args=[...])``) for ``--train-steps`` (100) steps in ``bf16-mixed``, offline corpus:
   tokens/s and MFU from the recipe's own ``TokenThroughput`` callback, first and last loss.
4. **Compiled kernels on Triton** — for every optimizer whose default is ``compiled="auto"``: ``compiled=True``
   against ``compiled=False`` on the device, float64 (rtol 1e-10), 6 steps on one large and one small tensor;
   and the bf16-state kernel against the eager bf16 state (same rounding seeds; the stored states must agree
   to one bf16 ulp on ≥ 99% of elements).

``--smoke`` runs the same code on CPU at toy sizes: the gpu tests collected and skipped, step times on a
1-layer 64-wide parameter set without third-party peers, the recipe at 1 layer × 32 wide for 3 steps on a
300 kB corpus, and the kernel check for ``lion`` only. ``tests/test_gpu_check_smoke.py`` runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE), str(ROOT / "recipes")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

SECTIONS = ("Environment", "GPU tests", "Step times", "Training", "Compiled kernels")
BUDGET_S = {"GPU tests": 150, "Step times": 150, "Training": 150, "Compiled kernels": 60}  # 8.5 min with setup
SMOKE_SCALE = {"n_layer": 1, "width": 64, "vocab": 256, "block": 64}


class Section:
    """One part's output: markdown lines and whether it passed."""

    def __init__(self, title: str) -> None:
        self.title, self.lines, self.ok, self.seconds = title, [], True, 0.0

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def markdown(self) -> str:
        status = "passed" if self.ok else "**FAILED**"
        return "\n".join([f"## {self.title}", "", f"Status: {status} ({self.seconds:.0f} s)", "", *self.lines, ""])


def run_part(title: str, fn: Callable[[Section, dict], None], ctx: dict) -> Section:
    sec = Section(title)
    t0 = time.perf_counter()
    try:
        fn(sec, ctx)
    except Exception as err:  # a part's failure is reported, not fatal for the others
        sec.ok = False
        sec.add("```", "".join(traceback.format_exception(err))[-3000:], "```")
    sec.seconds = time.perf_counter() - t0
    print(f"[gpu_check] {title}: {'ok' if sec.ok else 'FAILED'} in {sec.seconds:.1f} s", flush=True)
    return sec


# ---------------------------------------------------------------------------------------------------------
# 0. environment


def environment(sec: Section, ctx: dict) -> None:
    from lightning_optim.optim._elementwise import compile_available

    dev = ctx["device"]
    ok, why = compile_available(torch.device(dev).type)
    sec.add(f"- device: `{dev}`" + (f" ({torch.cuda.get_device_name(0)})" if dev.startswith("cuda") else ""),
            f"- torch {torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}",
            f"- `compiled='auto'` resolves to: {'compiled' if ok else 'eager (' + why + ')'}",
            f"- mode: {'smoke (CPU, toy sizes)' if ctx['smoke'] else 'full'}")
    try:
        import triton  # noqa: F401

        sec.add(f"- triton {triton.__version__}")
    except Exception:
        sec.add("- triton: not installed")


# ---------------------------------------------------------------------------------------------------------
# 1. the gpu-marked tests


def _gpu_test_files() -> list[str]:
    """Test files that mark something ``gpu`` (collecting only those keeps the part fast)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if "mark.gpu" in p.read_text(errors="replace"))


def gpu_tests(sec: Section, ctx: dict) -> None:
    files = _gpu_test_files()
    if not files:
        sec.add("no test is marked `gpu`")
        return
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", *files, "-q", "-p", "no:cacheprovider", "-rs"]
    if ctx["smoke"]:
        cmd += ["--collect-only"]
    env = {k: v for k, v in os.environ.items() if k != "LIGHTNING_OPTIM_COMPILE"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=BUDGET_S["GPU tests"], env=env)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    # exit 5: no test selected, which is a pass for a machine where nothing is marked
    sec.ok = proc.returncode in (0, 5)
    sec.add(f"`{' '.join(cmd[1:])}` → exit {proc.returncode}", "", "```", *tail, "```")


# ---------------------------------------------------------------------------------------------------------
# 2. step times against the peers


def step_times(sec: Section, ctx: dict) -> None:
    import step_time

    dev, smoke = ctx["device"], ctx["smoke"]
    cases = [c for c in step_time.load_cases() if not c.label.endswith(("-eager", "-bf16state"))]
    if smoke:  # ours only (peers are not ours to keep working), one case per family
        cases = [type(c)(c.label, c.ours, {}, c.matrices_only) for c in cases
                 if c.label in ("lion", "adopt", "prodigy", "muon", "soap")]
    deadline = time.perf_counter() + BUDGET_S["Step times"]
    rows, skipped = [], []
    for case in cases:
        if time.perf_counter() > deadline:
            skipped.append(case.label)
            continue
        rows += step_time.run({case.label}, 3 if smoke else 10, 1 if smoke else 3, dev,
                              SMOKE_SCALE if smoke else None, cases=[case])
    out = ctx["out"] / "gpu_step_time"
    shape = "toy 1×64" if smoke else "GPT 6×512, vocab 8192, 23.6M parameters"
    step_time.write(rows, out, f"{shape}, float32, {dev}, torch {torch.__version__}; ours = default path "
                               f"({step_time._default_path(dev)}); median of alternating rounds.")
    sec.add(f"{len(rows)} cases timed (table: `{out.with_suffix('.md').name}`)"
            + (f"; over the time budget, not timed: {', '.join(skipped)}" if skipped else ""), "",
            "| optimizer | ours ms | best peer | best peer ms | ours / best peer | ours / fused AdamW |",
            "|---|---:|---|---:|---:|---:|")
    for r in rows:
        ratio = r["ours"] / r["best_ms"] if r["best_peer"] else float("nan")
        sec.add(f"| {r['label']} | {r['ours']:.2f} | {r['best_peer'] or '—'} | {r['best_ms']:.2f} | {ratio:.2f} | "
                f"{r['ours'] / r['adamw']:.2f} |")
    sec.ok = bool(rows)


# ---------------------------------------------------------------------------------------------------------
# 3. gpt124m in bf16-mixed


def _recipe_args(ctx: dict) -> list[str]:
    out = ctx["out"]
    common = ["--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "0",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              "--checkpoint.every_n_train_steps", "1000000", "--checkpoint.save_last", "false",
              "--trainer.logger.init_args.save_dir", str(out / "tb"), "--throughput.log_every_n_steps", "1"]
    if ctx["smoke"]:
        return [*common, "--model.n_layer", "1", "--model.n_embd", "32", "--model.n_head", "2",
                "--data.seq_len", "32", "--data.global_batch_size", "4", "--data.micro_batch_size", "4",
                "--data.max_bytes", "300000", "--data.tokenizer", "bpe:512", "--data.tokenizer_train_bytes", "300000",
                "--data.cache_dir", str(out / "cache"), "--data.show_progress", "false",
                "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
                "--trainer.max_steps", "3", "--optim.warmup_steps", "1"]
    return [*common, "--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.precision", "bf16-mixed",
            "--trainer.max_steps", str(ctx["train_steps"]), "--optim.warmup_steps", "10",
            "--throughput.log_every_n_steps", "10"]


def training(sec: Section, ctx: dict) -> None:
    from _cli import main as recipe_main
    from lightning_optim.models.throughput import TokenThroughput

    args = _recipe_args(ctx)
    t0 = time.perf_counter()
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        cli = recipe_main("124m", arch="gpt2", name="gpt124m", args=args)
    wall = time.perf_counter() - t0
    trainer, model = cli.trainer, cli.model
    tput = next((cb for cb in trainer.callbacks if isinstance(cb, TokenThroughput)), None)
    tps = getattr(tput, "mean_tokens_per_sec", None)
    n_params = sum(p.numel() for p in model.parameters())
    fpt = getattr(model, "flops_per_token", None)
    mfu = None
    if tps and fpt and trainer.strategy.root_device.type == "cuda":
        from lightning.fabric.utilities.throughput import get_available_flops

        peak = get_available_flops(trainer.strategy.root_device, torch.bfloat16)
        mfu = tps * fpt / peak if peak else None
    loss = trainer.callback_metrics.get("train/loss")
    sec.add(f"`main(\"124m\", arch=\"gpt2\", name=\"gpt124m\", args=[...])` with `{' '.join(args)}`", "",
            "| steps | parameters | wall s | tokens/s | MFU | last train/loss |", "|---:|---:|---:|---:|---:|---:|",
            f"| {trainer.global_step} | {n_params:,} | {wall:.1f} | {tps:,.0f} | "
            f"{'—' if mfu is None else f'{mfu:.1%}'} | {float(loss) if loss is not None else float('nan'):.3f} |"
            if tps else f"| {trainer.global_step} | {n_params:,} | {wall:.1f} | — | — | — |")
    expected = 3 if ctx["smoke"] else ctx["train_steps"]
    sec.ok = trainer.global_step == expected and loss is not None and bool(torch.isfinite(torch.as_tensor(loss)))


# ---------------------------------------------------------------------------------------------------------
# 4. compiled kernels vs eager on the device


def _kernel_case(name: str, dev: str, state_dtype: str | None) -> tuple[float, str]:
    import lightning_optim as lo
    from lightning_optim.optim._elementwise import COMPILED_MIN_NUMEL

    dtype = torch.float64 if state_dtype is None else torch.float32
    shapes = [(256, COMPILED_MIN_NUMEL // 256 + 3), (48,)]
    hp = {"ademamix": {"alpha_warmup": 4, "beta3_warmup": 4}, "sf-adamw": {"warmup_steps": 2}}.get(name, {})

    def build(compiled: bool):
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter((torch.randn(s, generator=g, dtype=dtype) * 0.1).to(dev)) for s in shapes]
        opt = lo.create_optimizer(name, ps, compiled=compiled, state_dtype=state_dtype, **hp)
        if callable(getattr(opt, "train", None)):
            opt.train()
        return ps, opt

    (pe, oe), (pc, oc) = build(False), build(True)
    for step in range(6):
        g = torch.Generator().manual_seed(100 + step)
        for a, b in zip(pe, pc):
            grad = (torch.randn(a.shape, generator=g, dtype=dtype) * 0.01).to(dev)
            a.grad, b.grad = grad.clone(), grad.clone()
        oe.step()
        oc.step()
    if state_dtype is None:
        err = max(((a - b).abs() / (a.abs() + 1e-12)).max().item() for a, b in zip(pe, pc))
        return err, "max relative difference of the weights"
    # bf16 state: the kernels round the same float32 value with the same seed; they may differ where the
    # float32 intermediates differ in the last bit (fused vs foreach arithmetic) — one bf16 ulp at most
    worst = 1.0
    for p, q in zip(pe, pc):
        for key, ve in oe.state[p].items():
            vc = oc.state[q][key]
            if not torch.is_tensor(ve) or ve.ndim == 0 or ve.dtype != torch.bfloat16:
                continue
            assert vc.dtype == torch.bfloat16, f"{name}: compiled state {key} is {vc.dtype}"
            ulp = (ve.float().abs() * 2 ** -7).clamp_min(1e-30)
            same = ((ve.float() - vc.float()).abs() <= ulp * 1.01).float().mean().item()
            worst = min(worst, same)
    return 1.0 - worst, "fraction of bf16 state entries more than 1 ulp apart"


def kernels(sec: Section, ctx: dict) -> None:
    import lightning_optim as lo
    from lightning_optim.optim._elementwise import compile_available

    dev = ctx["device"]
    ok, why = compile_available(torch.device(dev).type)
    if not ok:
        sec.add(f"no compiler for `{dev}`: {why}")
        sec.ok = ctx["smoke"]
        return
    names = [n for n in lo.available_optimizers() if lo.optimizer_info(n).defaults.get("compiled") == "auto"]
    if ctx["smoke"]:
        names = ["lion"]
    deadline = time.perf_counter() + BUDGET_S["Compiled kernels"] * (1 if ctx["smoke"] else 4)
    sec.add("| optimizer | state | measure | value | limit | result |", "|---|---|---|---:|---:|---|")
    for name in names:
        for state_dtype, limit in ((None, 1e-10), ("bfloat16", 0.01)):
            if time.perf_counter() > deadline:
                sec.add(f"| {name} | {state_dtype or 'param dtype'} | (over the time budget) | | | skipped |")
                continue
            value, what = _kernel_case(name, dev, state_dtype)
            good = value <= limit
            sec.ok &= good
            sec.add(f"| {name} | {state_dtype or 'param dtype'} | {what} | {value:.2e} | {limit:g} | "
                    f"{'ok' if good else 'FAIL'} |")


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, toy sizes, < 60 s")
    ap.add_argument("--out", default=str(HERE / "results"), help="directory for gpu_check.md / gpu_step_time.md")
    ap.add_argument("--train-steps", type=int, default=100)
    ap.add_argument("--skip", default="", help="comma-separated sections to skip (e.g. 'GPU tests')")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --smoke for the CPU dry run", file=sys.stderr)
        return 2
    os.environ.pop("LIGHTNING_OPTIM_COMPILE", None)  # the default path is what is checked
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx: dict[str, Any] = {"smoke": args.smoke, "device": "cpu" if args.smoke else "cuda", "out": out,
                           "train_steps": args.train_steps}
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    t0 = time.perf_counter()
    parts = [("Environment", environment), ("GPU tests", gpu_tests), ("Step times", step_times),
             ("Training", training), ("Compiled kernels", kernels)]
    sections = [run_part(title, fn, ctx) for title, fn in parts if title not in skip]
    total = time.perf_counter() - t0
    ok = all(s.ok for s in sections)
    head = [f"# GPU check{' (smoke run on CPU)' if args.smoke else ''}", "",
            f"`python benchmarks/gpu_check.py{' --smoke' if args.smoke else ''}`: {total:.0f} s in all, "
            f"{'every part passed' if ok else 'some part FAILED'}.", ""]
    (out / "gpu_check.md").write_text("\n".join(head) + "\n" + "\n".join(s.markdown() for s in sections))
    print(f"wrote {out / 'gpu_check.md'} ({total:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
