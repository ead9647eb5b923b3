"""Scion on 2 CPU ranks, one launch: DDP replicas and Lightning FSDP2 against the same steps in one process.

    torchrun --nproc_per_node=2 tests/dist_scripts/scion_dist.py OUT_DIR

The Muon family's harness (``muon_dist.py``: its batches, loss and Lightning module) on a model whose shards are
uneven on 2 ranks (97-row embedding and head, 75-row MLP matrices) and with every Scion rule in use: hidden
matrices ``spectral`` (the hybrid's Newton–Schulz), the untied embedding ``rms_rows``, the head ``sign``, the
RMSNorm gains ``bias_rms``. Files: ``ddp_scion_rank<r>.pt``, ``ddp_scion_single.pt``, ``fsdp_scion.pt``,
``fsdp_scion_single.pt`` and ``report.json`` (as ``muon_dist.py`` writes them, read by
``tests/test_optim_scion_dist.py``), plus ``ns_rank<r>.json``: the matrices each rank orthogonalised
(``CommCounter.ns_matrices``) in the DDP and the FSDP2 run, how many spectral matrices the model has, the
FSDP2 matrices' layouts and the rows of this rank's embedding shard.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning as L  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from lightning_optim import create_optimizer  # noqa: E402
from lightning_optim.models.gpt import ModelConfig, Transformer  # noqa: E402
from lightning_optim.optim._matrix_dist import CommCounter  # noqa: E402
from tests.dist_scripts.muon_dist import K, batch, loss_of  # noqa: E402
from tests.dist_utils import finish, shard_per_block  # noqa: E402

NAME = "scion"
HP = {"lr": 3.6e-4}
# vocab 97 >= the harness's 96 token ids; odd row counts give uneven Shard(0) blocks on 2 ranks
CFG = ModelConfig(n_layer=2, n_embd=40, n_head=4, vocab_size=97, block_size=16, arch="llama", mlp_hidden=75,
                  tie_embeddings=False)


def make_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(CFG)


def scion_groups(model: torch.nn.Module) -> list[dict]:
    """Hidden matrices → spectral, the embedding → rms_rows (radius 50), the head → sign, gains → bias_rms."""
    named = list(model.named_parameters())
    pick = {
        "hidden": [(n, p) for n, p in named if n.startswith("blocks.") and p.ndim == 2],
        "embedding": [(n, p) for n, p in named if n == "tok_emb.weight"],
        "head": [(n, p) for n, p in named if n == "lm_head.weight"],
        "gains": [(n, p) for n, p in named if p.ndim == 1],
    }
    assert sum(len(v) for v in pick.values()) == len(named)
    extra = {"hidden": {"matrix": True}, "embedding": {"norm": "rms_rows", "radius": 50.0},
             "head": {"matrix": False}, "gains": {"matrix": False}}
    return [{"params": [p for _, p in v], "param_names": [n for n, _ in v], "name": k, **extra[k]}
            for k, v in pick.items()]


def n_spectral() -> int:
    return len(scion_groups(make_model())[0]["params"])


def single_run() -> dict:
    model = make_model()
    opt = create_optimizer(NAME, scion_groups(model), distributed=False, **HP)
    for s in range(K):
        opt.zero_grad()
        loss_of(model, batch(s)).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class LM(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = make_model()

    def configure_model(self):
        shard_per_block(self.model, self.device_mesh["data_parallel"])

    def training_step(self, b, i):
        return loss_of(self.model, b[0])

    def configure_optimizers(self):
        return create_optimizer(NAME, scion_groups(self.model), **HP)

    def train_dataloader(self):
        return torch.utils.data.DataLoader([(batch(s),) for s in range(K)], batch_size=None)


def main():
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    counts = {"matrices": n_spectral()}
    # --- DDP replicas: each matrix orthogonalised by one owner rank
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    opt = create_optimizer(NAME, scion_groups(model.module), **HP)
    CommCounter.reset()
    for s in range(K):
        opt.zero_grad()
        loss_of(model, batch(s)).backward()
        opt.step()
    counts["ddp"] = CommCounter.ns_matrices
    torch.save(model.module.state_dict(), out / f"ddp_{NAME}_rank{rank}.pt")
    if rank == 0:
        torch.save(single_run(), out / f"ddp_{NAME}_single.pt")
    # --- Lightning FSDP2 (uneven shards)
    from lightning.pytorch.strategies import ModelParallelStrategy

    lm = LM()
    # the sizes explicitly: "auto" makes the 2 devices a tensor-parallel dimension and data_parallel a 1-rank mesh
    # (fully_shard would then hold whole matrices on each rank, nothing sharded)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=K,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False)
    CommCounter.reset()
    trainer.fit(lm)
    counts["fsdp"] = CommCounter.ns_matrices
    fopt = trainer.optimizers[0]
    counts["layouts"] = sorted({m.kind for m in fopt._metas.values()})
    counts["embedding_rows"] = lm.model.tok_emb.weight.to_local().shape[0]
    st = [t for s in fopt.state.values() for t in s.values() if t.dim() > 0]
    report = {NAME: {"state_dtensor": all(isinstance(t, DTensor) for t in st),
                     "params_dtensor": all(isinstance(p, DTensor) for p in lm.model.parameters())}}
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in lm.model.state_dict().items()}
    if rank == 0:
        torch.save(full, out / f"fsdp_{NAME}.pt")
        torch.save(single_run(), out / f"fsdp_{NAME}_single.pt")
        (out / "report.json").write_text(json.dumps(report))
    (out / f"ns_rank{rank}.json").write_text(json.dumps(counts))
    dist.barrier()
    finish(out)


if __name__ == "__main__":
    main()
