"""HSDP (FSDP2 on a 2-D (replicate, shard) mesh) for the Muon family on 4 CPU processes (2 x 2, gloo), ONE launch.

    torchrun --nproc_per_node=4 tests/dist_scripts/hsdp_muon.py OUT_DIR

* ``direct``: ``fully_shard(block, mesh=mesh)`` per block and on the root with a ``(2, 2)`` mesh
  (placements ``(Replicate(), Shard(0))``), muon, normuon and soap, K steps on the same batch on every rank.
* ``lightning``: ``Trainer(strategy=ModelParallelStrategy(data_parallel_size=4, tensor_parallel_size=1))``
  whose ``configure_model`` builds the 2-D mesh and applies ``fully_shard`` with it, muon, K steps.

Each rank records, per run, the Newton–Schulz matrices it orthogonalised and the collectives of the matrix
exchange (``CommCounter``) and the placements of the parameters; rank 0 writes the gathered full weights and
the same steps in one process. Everything is written and flushed before the process group is torn down
(:func:`tests.dist_utils.finish`), so the test never depends on a clean exit.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
warnings.filterwarnings("ignore")

from lightning_optim import create_optimizer  # noqa: E402
from lightning_optim.optim._matrix_dist import CommCounter  # noqa: E402
from lightning_optim.models.gpt import Transformer  # noqa: E402
from tests.dist_scripts.muon_dist import CFG as MUON_CFG  # noqa: E402
from tests.dist_scripts.muon_dist import K, batch, loss_of  # noqa: E402
from tests.dist_utils import finish, shard_per_block  # noqa: E402

HP = {"muon": {"lr": 0.02}, "normuon": {"lr": 3e-3}, "soap": {"lr": 3e-3, "precondition_frequency": 2}}
MATRIX_FAMILY = ("muon", "normuon")  # orthogonalised once per job; SOAP: every rank computes the whole update
MESH = (2, 2)
CFG = dataclasses.replace(MUON_CFG, mlp_hidden=71)  # 71-row MLP matrices: uneven shards (36 + 35 rows)


def make_model():
    torch.manual_seed(0)
    return Transformer(CFG)


def n_matrices(opt) -> int:
    return sum(len(g["params"]) for g in opt.param_groups if g.get("matrix"))


def full_weights(model) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def single_run(name: str) -> dict[str, torch.Tensor]:
    model = make_model()
    local = {"distributed": False} if name in MATRIX_FAMILY else {}
    opt = create_optimizer(name, model, **local, **HP[name])
    for s in range(K):
        opt.zero_grad()
        loss_of(model, batch(s)).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def counters(opt) -> dict:
    return {"ns_matrices": CommCounter.ns_matrices, "ns_calls": CommCounter.ns_calls,
            "collectives": dict(CommCounter.collectives), "matrices": n_matrices(opt)}


def direct(name: str, mesh, out: Path, record: dict) -> None:
    model = make_model()
    shard_per_block(model, mesh)
    opt = create_optimizer(name, model, **HP[name])
    CommCounter.reset()
    for s in range(K):
        opt.zero_grad()
        loss_of(model, batch(s)).backward()
        opt.step()
    record[f"direct_{name}"] = {**counters(opt), "placements": sorted(
        {repr(tuple(p.placements)) for p in model.parameters()})}
    full = full_weights(model)
    if dist.get_rank() == 0:
        torch.save(full, out / f"direct_{name}.pt")


def lightning_run(out: Path, record: dict) -> None:
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.device_mesh import init_device_mesh

    class LM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = make_model()

        def configure_model(self):
            shard_per_block(self.model, init_device_mesh("cpu", MESH, mesh_dim_names=("replicate", "shard")))

        def training_step(self, b, i):
            return loss_of(self.model, b[0])

        def configure_optimizers(self):
            return create_optimizer("muon", self.model, **HP["muon"])

        def train_dataloader(self):
            return torch.utils.data.DataLoader([(batch(s),) for s in range(K)], batch_size=None)

    lm = LM()
    trainer = L.Trainer(accelerator="cpu", devices=4, strategy=ModelParallelStrategy(data_parallel_size=4,
                        tensor_parallel_size=1), max_steps=K, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
    CommCounter.reset()
    trainer.fit(lm)
    record["lightning_muon"] = {**counters(trainer.optimizers[0]), "placements": sorted(
        {repr(tuple(p.placements)) for p in lm.model.parameters()})}
    full = full_weights(lm.model)
    if dist.get_rank() == 0:
        torch.save(full, out / "lightning_muon.pt")


def refusal(mesh) -> list[str]:
    """Layouts the matrix rule cannot assemble: a convolution weight (4-D, viewed ``out x in·kh·kw``) split along
    its input channels, ``(Replicate(), Shard(1))`` on the 2-D mesh and ``Shard(1)`` on its 1-D shard sub-mesh:
    each refused when the optimizer is built (tensor-parallel ``Shard(1)`` matrices are tests/test_tp.py's)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    messages = []
    for m, placements in ((mesh, (Replicate(), Shard(1))), (mesh["shard"], (Shard(1),))):
        layer = torch.nn.Conv2d(4, 6, 2, bias=False)
        layer.weight = torch.nn.Parameter(distribute_tensor(layer.weight.detach(), m, placements))
        try:
            create_optimizer("muon", [{"params": [("tp.weight", layer.weight)], "matrix": True}])
        except ValueError as err:
            messages.append(str(err))
        else:
            messages.append("not refused")
    return messages


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    from torch.distributed.device_mesh import init_device_mesh

    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", MESH, mesh_dim_names=("replicate", "shard"))
    record: dict = {}
    for name in HP:
        direct(name, mesh, out, record)
    lightning_run(out, record)
    record["refusal"] = refusal(mesh)
    if rank == 0:
        for name in HP:
            torch.save(single_run(name), out / f"single_{name}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    finish(out)


if __name__ == "__main__":
    main()
