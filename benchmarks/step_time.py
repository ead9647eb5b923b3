"""Median optimizer step time of ours against every installed peer implementation, on a GPT-shaped parameter
set on CPU (6 layers, width 512, vocabulary 8192: about 23.6M parameters, tied head).

Cases come from every ``benchmarks/cases_*.py`` module (each exposes ``CASES``: records with ``label``,
``ours``, ``peers``, ``matrices_only``). For each case, ours, each peer and torch's fused AdamW are built on
their own copies of the parameters (same gradients), warmed up, then stepped in alternation — one step of each
per round — so load changes on the machine hit all alike; the median over rounds is reported.

    python benchmarks/step_time.py                       # all cases → benchmarks/results/step_time.md/.png
    python benchmarks/step_time.py --only lion,adopt --steps 20 --threads 2 --out /tmp/st
    python benchmarks/step_time.py --device cuda --only lion --out /tmp/st_gpu     # on a GPU (gpu_check.py does)

Unset ``LIGHTNING_OPTIM_COMPILE`` (``=0`` makes the default path eager): the table is meant to show the default.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def gpt_params(n_layer: int = 6, width: int = 512, vocab: int = 8192, block: int = 1024, seed: int = 0,
               matrices_only: bool = False, device: str | torch.device = "cpu") -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes: list[tuple[int, ...]] = [] if matrices_only else [(vocab, width), (block, width)]
    for _ in range(n_layer):
        layer = [(3 * width, width), (width, width), (4 * width, width), (width, 4 * width)]
        if not matrices_only:
            layer += [(width,), (width,), (3 * width,), (width,), (width,), (width,), (4 * width,), (width,)]
        shapes += layer
    if not matrices_only:
        shapes += [(width,), (width,)]
    ps = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(device)) for s in shapes]
    for p in ps:
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(device)
    return ps


def load_cases() -> list:
    cases = []
    for path in sorted(HERE.glob("cases_*.py")):
        spec = importlib.util.spec_from_file_location(f"_bench_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        cases += list(getattr(module, "CASES", []))
    return cases


def _restore_grads(opt: torch.optim.Optimizer, grads: dict[int, torch.Tensor]) -> None:
    """Put back gradients an implementation cleared after its step (heavyball sets ``p.grad = None``), so
    every timed step does the full work; untimed."""
    for group in getattr(opt, "param_groups", []):  # wrappers that restore grads themselves have none
        for p in group["params"]:
            if p.grad is None and id(p) in grads:
                p.grad = grads[id(p)]


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _time_round(opts: dict, rounds: int, warmup: int, device: str = "cpu") -> dict[str, float]:
    grads = {name: {id(p): p.grad for g in getattr(opt, "param_groups", []) for p in g["params"] if p.grad is not None}
             for name, opt in opts.items()}
    for _ in range(warmup):
        for name, opt in opts.items():
            _restore_grads(opt, grads[name])
            opt.step()
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(rounds):
        for name, opt in opts.items():
            _restore_grads(opt, grads[name])
            _sync(device)
            t0 = time.perf_counter()
            opt.step()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def run(only: set[str] | None, steps: int, warmup: int, device: str = "cpu", scale: dict | None = None,
        cases: list | None = None) -> list[dict]:
    """Time every case (``only``: labels to keep; ``cases``: instead of :func:`load_cases`) on ``device``;
    ``scale`` overrides :func:`gpt_params`' shape (``gpu_check.py --smoke`` uses a toy one)."""
    rows = []
    for case in load_cases() if cases is None else cases:
        if only and case.label not in only:
            continue
        opts = {}
        for name, build in [("ours", case.ours), *case.peers.items(), ("fused AdamW", None)]:
            try:
                ps = gpt_params(matrices_only=case.matrices_only, device=device, **(scale or {}))
                opts[name] = torch.optim.AdamW(ps, lr=1e-3, fused=True) if build is None else build(ps)
            except Exception as err:  # a peer not installed, or one that fails on CPU: reported, not fatal
                if name == "ours":
                    traceback.print_exc()
                print(f"  [{case.label}] skipped {name}: {type(err).__name__}: {str(err).splitlines()[0][:100]}",
                      file=sys.stderr)
        if "ours" not in opts:
            continue
        ms = _time_round(opts, steps, warmup, device)
        peers = {k: v for k, v in ms.items() if k not in ("ours", "fused AdamW")}
        best = min(peers.items(), key=lambda kv: kv[1]) if peers else (None, float("nan"))
        row = dict(label=case.label, ours=ms["ours"], best_peer=best[0], best_ms=best[1], peers=peers,
                   adamw=ms["fused AdamW"], matrices_only=case.matrices_only)
        rows.append(row)
        print(f"{case.label:>12}: ours {row['ours']:8.1f} ms | best peer {best[0]} {best[1]:8.1f} ms | "
              f"fused AdamW {row['adamw']:7.1f} ms", flush=True)
    return rows


def write(rows: list[dict], out: Path, meta: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Optimizer step time (median ms per step, lower is better)", "",
        meta, "",
        "| optimizer | ours ms | best peer | best peer ms | ours / best peer | ours / fused AdamW | all peers (ms) |",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = r["ours"] / r["best_ms"] if r["best_peer"] else float("nan")
        peers = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["peers"].items(), key=lambda kv: kv[1])) or "—"
        lines.append(f"| {r['label']}{' (matrices)' if r['matrices_only'] else ''} | {r['ours']:.1f} | "
                     f"{r['best_peer'] or '—'} | {r['best_ms']:.1f} | {ratio:.2f} | {r['ours'] / r['adamw']:.2f} | {peers} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4))
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["ours"] for r in rows], 0.4, label="lightning-optim")
        ax.bar([x + 0.2 for x in xs], [r["best_ms"] for r in rows], 0.4, label="best peer")
        if rows:
            ax.axhline(statistics.median(r["adamw"] for r in rows), color="k", ls="--", lw=1, label="torch fused AdamW")
        ax.set_xticks(list(xs), [r["label"] for r in rows], rotation=30, ha="right")
        ax.set_ylabel("median ms / step")
        ax.set_title("Optimizer step time, GPT 23.6M parameters, CPU")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
    except Exception as err:  # pragma: no cover
        print(f"plot skipped: {err}", file=sys.stderr)


def _default_path(device: str = "cpu") -> str:
    """What ``compiled="auto"`` resolves to here (the elementwise methods' default)."""
    from lightning_optim.optim._elementwise import compile_available

    ok, why = compile_available(torch.device(device).type)
    return "compiled='auto' → compiled kernels (the first warm-up step compiles)" if ok else f"compiled='auto' → eager ({why})"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated case labels")
    ap.add_argument("--steps", type=int, default=15, help="timed rounds (one step of each optimizer per round)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the reference figures use 2)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", default=str(HERE / "results" / "step_time"), help="output path without suffix")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    only = {s.strip() for s in args.only.split(",") if s.strip()} or None
    rows = run(only, args.steps, args.warmup, args.device)
    meta = (f"GPT shape 6×512, vocab 8192 (23.6M parameters, float32), "
            f"{'CPU, ' + str(args.threads) + ' threads' if args.device == 'cpu' else args.device}, torch "
            f"{torch.__version__}; median of {args.steps} alternating rounds after {args.warmup} warm-up rounds. "
            f"Ours as built by create_optimizer(name, params): {_default_path(args.device)}.")
    write(rows, Path(args.out), meta)
    print(f"wrote {Path(args.out).with_suffix('.md')}")


if __name__ == "__main__":
    main()
