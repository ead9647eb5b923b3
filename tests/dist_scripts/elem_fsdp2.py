"""2-process FSDP2 (gloo, CPU): elementwise optimizers on DTensor shards equal the single-process run.

Every rank feeds the same batch, so the averaged sharded gradients equal the single-process gradients; the
script runs each optimizer sharded and, on every rank, unsharded, and writes the largest difference.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6
    from torch.distributed._composable.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_optim import create_optimizer  # noqa: E402
from tests.dist_utils import finish  # noqa: E402

METHODS = ["prodigy", "mars", "adopt", "sf-adamw"]
HP = {"prodigy": {"d0": 1e-2}, "mars": {"lr": 1e-2}, "adopt": {"lr": 1e-2}, "sf-adamw": {"lr": 1e-2, "warmup_steps": 2}}


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 5)).double()


def train(m, opt, steps=6):
    torch.manual_seed(1)
    for _ in range(steps):
        x = torch.randn(12, 8, dtype=torch.float64)
        opt.zero_grad()
        m(x).sin().square().mean().backward()
        opt.step()
    if hasattr(opt, "eval"):
        opt.eval()


def main(out):
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    result = {}
    for name in METHODS:
        ref = model()
        ref_opt = create_optimizer(name, ref, **HP[name])
        train(ref, ref_opt)
        sharded = model()
        for layer in sharded:
            if any(p.requires_grad for p in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        opt = create_optimizer(name, sharded, **HP[name])
        train(sharded, opt)
        diff = max(float((p.full_tensor() - q).abs().max()) for p, q in zip(sharded.parameters(), ref.parameters()))
        moved = max(float((p.full_tensor() - q).abs().max()) for p, q in zip(sharded.parameters(), model().parameters()))
        result[name] = {"max_diff": diff, "moved": moved}
        if name == "prodigy":
            result[name]["d_sharded"] = float(opt.param_groups[0]["d"])
            result[name]["d_single"] = float(ref_opt.param_groups[0]["d"])
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    finish(Path(out).parent)


if __name__ == "__main__":
    main(sys.argv[1])
