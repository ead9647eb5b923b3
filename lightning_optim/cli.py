"""``lightning-optim`` console command.

    lightning-optim list                                   every optimizer and schedule
    lightning-optim info muon                              one optimizer's spec
    lightning-optim info wsd                               one schedule's defaults
    lightning-optim compare-runs lightning_logs/llama124m  loss vs tokens / wall-clock, lr, grad norm: PNG + table
    lightning-optim memory --params 7e9 --optimizer adamw  parameters / gradients / state / total
    lightning-optim memory --preset 124m --optimizer muon --weight-dtype bf16 --state-dtype fp32 --shard 8
"""

from __future__ import annotations

import argparse
import sys

from lightning_optim.memory import estimate_memory
from lightning_optim.registry import (
    available_optimizers,
    available_schedulers,
    get_optimizer_spec,
    get_scheduler_spec,
)


def _list(_: argparse.Namespace) -> int:
    rows = []
    for name in available_optimizers():
        spec = get_optimizer_spec(name)
        state = spec.state.describe() + (f" (others: {spec.other_state.describe()})" if spec.other_state else "")
        rows.append((name, spec.family, state, spec.reference or spec.paper))
    widths = [max(len(r[i]) for r in rows + [("optimizer", "family", "state/param", "reference")]) for i in range(3)]
    print(f"{'optimizer':<{widths[0]}}  {'family':<{widths[1]}}  {'state/param':<{widths[2]}}  reference")
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}")
    print()
    print("schedule      description")
    for name in available_schedulers():
        spec = get_scheduler_spec(name)
        print(f"{name:<12}  {spec.description}  (warmup_steps; {', '.join(f'{k}={v}' for k, v in spec.defaults.items()) or 'no options'})")
    return 0


def _schedule_info(name: str) -> int:
    spec = get_scheduler_spec(name)
    print(f"name:        {spec.name} (schedule)" + (f" (aliases: {', '.join(spec.aliases)})" if spec.aliases else ""))
    print(f"description: {spec.description}")
    print(f"horizon:     {'needs total_steps (default: the Trainer' + chr(39) + 's max_steps)' if spec.needs_total_steps else 'none needed'}")
    print("defaults:")
    print("  warmup_steps = 0")
    for k, v in spec.defaults.items():
        print(f"  {k} = {v!r}")
    return 0


def _info(args: argparse.Namespace) -> int:
    if args.name.strip().lower().replace("_", "-") in available_schedulers():
        return _schedule_info(args.name)
    spec = get_optimizer_spec(args.name)
    print(f"name:        {spec.name}" + (f" (aliases: {', '.join(spec.aliases)})" if spec.aliases else ""))
    print(f"family:      {spec.family}")
    print(f"description: {spec.description}")
    print(f"state:       {spec.state.describe()}" + (f"; non-matrix parameters: {spec.other_state.describe()}" if spec.other_state else ""))
    print(f"routing:     {spec.routing}")
    print(f"paper:       {spec.paper}")
    print(f"reference:   {spec.reference}")
    if spec.callbacks:
        print(f"callbacks:   {', '.join(spec.callbacks)} (added by OptimizerMixin)")
    if spec.requires:
        print(f"requires:    pip install 'lightning-optim[{spec.requires}]'")
    print("defaults:")
    for k, v in spec.defaults.items():
        print(f"  {k} = {v!r}")
    return 0


def _memory(args: argparse.Namespace) -> int:
    names = available_optimizers() if args.optimizer == "all" else [args.optimizer]
    kwargs = dict(weight_dtype=args.weight_dtype, grad_dtype=args.grad_dtype, state_dtype=args.state_dtype,
                  master_dtype=args.master_dtype, shard=args.shard, sharding=args.sharding)
    if args.preset:
        from lightning_optim.memory import preset_shapes

        source = {"shapes": preset_shapes(args.preset, args.arch)}  # meta device: nothing is allocated
    elif args.params:
        source = {"n_params": float(args.params)}
    else:
        print("memory: give --params N or --preset NAME", file=sys.stderr)
        return 2
    for i, name in enumerate(names):
        if i:
            print()
        print(estimate_memory(name, **source, **kwargs).table())
    return 0


def _compare_runs(args: argparse.Namespace) -> int:
    from lightning_optim.compare_runs import write_comparison

    png, md = write_comparison(args.dirs, args.out)
    print(md.read_text())
    print(f"wrote {png} and {md}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-optim", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every registered optimizer and schedule").set_defaults(func=_list)
    info = sub.add_parser("info", help="one optimizer's or schedule's spec")
    info.add_argument("name")
    info.set_defaults(func=_info)
    mem = sub.add_parser("memory", help="parameters / gradients / optimizer state / total")
    mem.add_argument("--params", help="parameter count, e.g. 7e9")
    mem.add_argument("--preset", help="a model preset (tiny, 124m, 210m, 583m, 720m) or llama2-7b, llama3-8b, ...")
    mem.add_argument("--arch", default="llama", help="model family for --preset: llama or gpt2")
    mem.add_argument("--optimizer", default="adamw", help="registry name, or 'all'")
    mem.add_argument("--weight-dtype", default="float32")
    mem.add_argument("--grad-dtype", default=None, help="default: the weight dtype")
    mem.add_argument("--state-dtype", default=None,
                     help="default: the weight dtype. For optimizers with a state_dtype option (lion, signum, adopt, "
                          "ademamix, mars, prodigy, the Muon family) only the tensors that option stores in low "
                          "precision, e.g. bf16; the rest keep the weight dtype (each row shows its dtype)")
    mem.add_argument("--master-dtype", default=None, help="add a master copy of the weights in this dtype")
    mem.add_argument("--shard", type=int, default=1, help="FSDP sharding factor (ranks)")
    mem.add_argument("--sharding", default="full", choices=["full", "grad_op", "optimizer"],
                     help="what the ranks split: full (FSDP/ZeRO-3), grad_op (ZeRO-2), optimizer (ZeRO-1)")
    mem.set_defaults(func=_memory)
    cmp = sub.add_parser("compare-runs", help="runs side by side from TensorBoard event files: a PNG and a table")
    cmp.add_argument("dirs", nargs="+", help="run folders or folders above them (lightning_logs/<name>)")
    cmp.add_argument("--out", default="compare-runs", help="folder for compare-runs.png and compare-runs.md")
    cmp.set_defaults(func=_compare_runs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, ImportError) as err:
        print(f"lightning-optim: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
