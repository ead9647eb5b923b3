"""Muon family on 2 CPU ranks, ONE launch: DDP replicas and Lightning ModelParallelStrategy (FSDP2).

    torchrun --nproc_per_node=2 tests/dist_scripts/muon_dist.py OUT_DIR

For each of muon, d-muon, normuon, sf-normuon:

* ``ddp``: a tiny Llama-style GPT wrapped in torch DDP, K steps on the same batch on both ranks (the NS work is
  split between the ranks and exchanged). Rank r saves its weights to ``ddp_<name>_rank<r>.pt``; rank 0 also
  runs the same steps in one process with ``distributed=False`` and saves ``ddp_<name>_single.pt``.
* ``fsdp``: Lightning ``Trainer(strategy=ModelParallelStrategy(...), devices=2)`` with ``fully_shard`` per block
  and on the root trains K steps; the full weights go to ``fsdp_<name>.pt`` (rank 0), and rank 0 computes
  the single-process run on the same batches (``fsdp_<name>_single.pt``). The optimizer's state must be
  DTensor shards laid out like the parameters (recorded in ``report.json``).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
warnings.filterwarnings("ignore")

import lightning as L  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from lightning_optim import create_optimizer  # noqa: E402
from lightning_optim.models.gpt import ModelConfig, Transformer  # noqa: E402
from tests.dist_utils import finish, shard_per_block  # noqa: E402

K = 4
NAMES = ["muon", "d-muon", "normuon", "sf-normuon"]
HP = {"muon": {"lr": 0.02}, "d-muon": {"lr": 3e-3}, "normuon": {"lr": 3e-3}, "sf-normuon": {"lr": 3e-3, "warmup_steps": 2}}
CFG = ModelConfig(n_layer=2, n_embd=48, n_head=4, vocab_size=96, block_size=16, arch="llama", mlp_hidden=72)


def make_model():
    torch.manual_seed(0)
    return Transformer(CFG)


def batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, CFG.vocab_size, (4, CFG.block_size + 1), generator=g)


def loss_of(model, b):
    logits = model(b[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), b[:, 1:].reshape(-1))


def single_run(name, distributed=False):
    model = make_model()
    opt = create_optimizer(name, model, distributed=distributed, **HP[name])
    for s in range(K):
        opt.zero_grad()
        loss_of(model, batch(s)).backward()
        opt.step()
    if hasattr(opt, "eval"):
        opt.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class LM(L.LightningModule):
    def __init__(self, name):
        super().__init__()
        self.name_ = name
        self.model = make_model()

    def configure_model(self):
        shard_per_block(self.model, self.device_mesh["data_parallel"])

    def training_step(self, b, i):
        return loss_of(self.model, b[0])

    def configure_callbacks(self):
        """sf-normuon refuses to step in a Trainer without ScheduleFreeSwitch (none of the others needs one)."""
        from lightning_optim.callbacks import ScheduleFreeSwitch

        return [ScheduleFreeSwitch()] if self.name_ == "sf-normuon" else []

    def configure_optimizers(self):
        return create_optimizer(self.name_, self.model, **HP[self.name_])

    def train_dataloader(self):
        return torch.utils.data.DataLoader([(batch(s),) for s in range(K)], batch_size=None)


def main():
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    report = {}
    for name in NAMES:
        # --- DDP replicas
        model = torch.nn.parallel.DistributedDataParallel(make_model())
        opt = create_optimizer(name, model.module, **HP[name])
        for s in range(K):
            opt.zero_grad()
            loss_of(model, batch(s)).backward()
            opt.step()
        if hasattr(opt, "eval"):
            opt.eval()
        torch.save(model.module.state_dict(), out / f"ddp_{name}_rank{rank}.pt")
        if rank == 0:
            torch.save(single_run(name), out / f"ddp_{name}_single.pt")
        # --- Lightning FSDP2
        from lightning.pytorch.strategies import ModelParallelStrategy

        lm = LM(name)
        # data_parallel_size=2 explicitly: "auto" gives (dp=nodes=1, tp=devices=2), a mesh this script's
        # configure_model does not shard over
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=K, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            use_distributed_sampler=False)
        trainer.fit(lm)
        fopt = trainer.optimizers[0]
        if hasattr(fopt, "eval"):
            fopt.eval()
        st = [t for s in fopt.state.values() for t in s.values() if t.dim() > 0]
        report[name] = {
            "state_dtensor": all(isinstance(t, DTensor) for t in st),
            "params_dtensor": all(isinstance(p, DTensor) for p in lm.model.parameters()),
            # how the optimizer saw its matrices: "sharded" (row blocks exchanged with owners), not "local"
            "matrix_layouts": sorted({m.kind for m in getattr(fopt, "_metas", {}).values()}),
        }
        full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                for k, v in lm.model.state_dict().items()}
        if rank == 0:
            torch.save(full, out / f"fsdp_{name}.pt")
            torch.save(single_run(name), out / f"fsdp_{name}_single.pt")
        dist.barrier()
    if rank == 0:
        (out / "report.json").write_text(json.dumps(report))
    finish(out)


if __name__ == "__main__":
    main()
