"""FSDP2: grouping a fully_shard-ed model gives the same groups as the plain model (DTensor global shapes)."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lightning_optim import param_groups  # noqa: E402
from tests.dist_utils import finish  # noqa: E402
from tests.test_param_groups import TinyLM, by_name  # noqa: E402

dist.init_process_group("gloo")
mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (dist.get_world_size(),))
model = TinyLM(tied=False)
fully_shard(model.attn, mesh=mesh)
fully_shard(model, mesh=mesh)
assert isinstance(model.attn.weight, DTensor)
groups = param_groups(model, split_matrices=True)
Path(sys.argv[1], f"rank{dist.get_rank()}.txt").write_text(repr(sorted(by_name(groups).items())) + "\n")
finish(sys.argv[1])
