"""Extra cost of Sophia-G's Gauss–Newton–Bartlett pass, on a small Llama-style model on CPU.

Times a training step (forward, backward, optimizer step) and the Hessian pass the SophiaHessian callback runs
every ``hessian_interval`` steps (forward, sampling ŷ ~ softmax(logits), backward, ``update_hessian``), then
reports the amortised overhead ``hessian_pass / (hessian_interval · train_step)``. The pass costs about one
training step (a forward and a backward of the same batch), so at the default interval of 10 the overhead is
about 10%.

    python benchmarks/sophia_cost.py                   # → benchmarks/results/sophia_cost.md
    python benchmarks/sophia_cost.py --threads 2 --steps 10 --batch 8 --seq 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_optim import create_optimizer  # noqa: E402
from lightning_optim.models.gpt import build_model  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--interval", type=int, default=10)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sophia_cost.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=args.vocab, block_size=args.seq)
    n_params = sum(p.numel() for p in model.parameters())
    opt = create_optimizer("sophia", model, bs=args.batch * args.seq, hessian_interval=args.interval)
    x = torch.randint(0, args.vocab, (args.batch, args.seq))
    y = torch.randint(0, args.vocab, (args.batch, args.seq))

    def train_step() -> None:
        logits = model(x)
        F.cross_entropy(logits.reshape(-1, args.vocab).float(), y.reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def hessian_pass() -> None:  # what SophiaHessian.hessian_pass does, without a Trainer
        logits = model(x)
        flat = logits.reshape(-1, args.vocab).float()
        with torch.no_grad():
            sampled = torch.multinomial(torch.softmax(flat, dim=-1), 1).squeeze(-1)
        F.cross_entropy(flat, sampled).backward()
        opt.update_hessian()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        train_step()
        hessian_pass()
    ts, hs = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        train_step()
        t1 = time.perf_counter()
        hessian_pass()
        t2 = time.perf_counter()
        ts.append(t1 - t0)
        hs.append(t2 - t1)
    t, h = statistics.median(ts) * 1e3, statistics.median(hs) * 1e3
    amortised = h / args.interval
    text = "\n".join([
        "# Sophia-G: cost of the Gauss–Newton–Bartlett pass", "",
        f"Llama-style `tiny` model ({n_params / 1e6:.1f}M parameters, vocab {args.vocab}), batch {args.batch}×{args.seq} "
        f"tokens, CPU {args.threads} threads, torch {torch.__version__}; medians of {args.steps} steps.", "",
        "| training step ms | Hessian pass ms | pass / step | amortised over interval | overhead |",
        "|---:|---:|---:|---:|---:|",
        f"| {t:.1f} | {h:.1f} | {h / t:.2f} | {args.interval} steps: +{amortised:.1f} ms/step | "
        f"{100 * amortised / t:.1f}% |", "",
    ])
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
