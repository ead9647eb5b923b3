"""2-process FSDP2 (gloo, CPU): ``cautious=True`` on DTensor shards equals the single-process run, because the
mask's mean is over the whole tensor (an all-reduce of the counts); with a per-shard mean instead (patched in for
the comparison) it does not. Every rank feeds the same batch; uneven shards (5 rows: 3 + 2)."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_optim import create_optimizer  # noqa: E402
from lightning_optim.optim import _cautious  # noqa: E402
from lightning_optim.optim.torch_builtin import adamw  # noqa: E402
from tests.dist_utils import finish  # noqa: E402

MAKERS = {
    "lion": lambda m: create_optimizer("lion", m, cautious=True, lr=1e-2),
    "adamw": lambda m: adamw([{"params": list(m.parameters())}], cautious=True, lr=1e-2),
    "muon": lambda m: create_optimizer("muon", m, cautious=True, lr=0.05, adamw_lr=1e-2),
    "lamb": lambda m: create_optimizer("lamb", m, cautious=True, lr=1e-2),
}


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5)).double()


def train(m, opt, steps=6):
    torch.manual_seed(1)
    for _ in range(steps):
        x = torch.randn(12, 8, dtype=torch.float64)
        opt.zero_grad()
        m(x).sin().square().mean().backward()
        opt.step()


def sharded_run(name, mesh):
    m = model()
    for layer in m:
        if any(p.requires_grad for p in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    train(m, MAKERS[name](m))
    return [p.full_tensor() for p in m.parameters()]


def main(out):
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    result = {}
    global_means = _cautious.mask_means
    for name in MAKERS:
        ref = model()
        train(ref, MAKERS[name](ref))
        ref_ps = [p.detach() for p in ref.parameters()]
        got = sharded_run(name, mesh)
        _cautious.mask_means = lambda masks, param_objs=None: global_means(masks)  # each shard its own mean
        try:
            per_shard = sharded_run(name, mesh)
        finally:
            _cautious.mask_means = global_means
        result[name] = {
            "max_diff": max(float((a - b).abs().max()) for a, b in zip(got, ref_ps)),
            "per_shard_diff": max(float((a - b).abs().max()) for a, b in zip(per_shard, ref_ps)),
            "moved": max(float((a - b).abs().max()) for a, b in zip(got, model().parameters())),
        }
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    finish(Path(out).parent)


if __name__ == "__main__":
    main(sys.argv[1])
