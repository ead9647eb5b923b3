"""QK-clip on 2 CPU ranks (gloo), one launch:

    torchrun --nproc_per_node=2 tests/dist_scripts/qk_clip_dist.py OUT_DIR

* ``ddp``: a tiny GPT-2 (biases) wrapped in DDP; each rank runs a forward on its own batch, then ``clip()``
  (the per-head maxima are max-all-reduced): both ranks' weights must be equal, and equal to one process that
  recorded both batches (``ddp_single.pt``).
* ``fsdp``: the same model under ``fully_shard`` (qkv rows 45 → shards of 23 and 22: the shard boundary splits
  a key head); each rank's forward on its batch, ``clip()`` rescales the rows of the local shard at its row
  offset; the full weights (``fsdp_rank0.pt``) must equal the one-process clip (``fsdp_single.pt``).
* ``lightning``: the ``QKClip`` callback in a Lightning ``Trainer(strategy=ModelParallelStrategy())`` with the same
  ``fully_shard`` layout, one optimizer step of SGD at lr 0 (the weights move only by the clip) on each rank's
  batch; the full weights (``lightning_rank0.pt``) must equal the one-process clip too (``lightning_single.pt``).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
warnings.filterwarnings("ignore")

from torch.distributed.tensor import DTensor  # noqa: E402

from lightning_optim.callbacks.qk_clip import QKClip, QKClipper  # noqa: E402
from lightning_optim.models.gpt import ModelConfig, Transformer  # noqa: E402
from tests.dist_utils import finish, shard_per_block  # noqa: E402

# gpt2 arch (biases, no RoPE), head_dim 5: qkv has 45 rows, sharded 23 + 22
CFG = ModelConfig(arch="gpt2", n_layer=2, n_embd=15, n_head=3, vocab_size=32, block_size=8)
TAU = 0.5


def make_model():
    torch.manual_seed(0)
    model = Transformer(CFG)
    with torch.no_grad():
        for b in model.blocks:
            b.attn.qkv.weight.mul_(6.0)
            b.attn.qkv.bias.normal_(0, 0.3)
    return model


def batch(rank):
    return torch.randint(0, CFG.vocab_size, (2, CFG.block_size), generator=torch.Generator().manual_seed(rank))


def full_state(model):
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in model.state_dict().items() if "qkv" in k}


def single():
    model = make_model()
    clipper = QKClipper(threshold=TAU).attach(model)
    with torch.no_grad():
        model(batch(0))
        model(batch(1))
    stats = clipper.clip()
    return full_state(model), int(stats["qk_clipped_heads"])


class LM(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = make_model()

    def configure_model(self):
        shard_per_block(self.model, self.device_mesh["data_parallel"])

    def training_step(self, b, i):
        logits = self.model(b[0])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), b[0].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader([(batch(dist.get_rank()),)], batch_size=None)


def lightning_run(out, rank):
    from lightning.pytorch.strategies import ModelParallelStrategy

    lm = LM()
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)  # "auto" would be dp=1, tp=2
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[QKClip(threshold=TAU)])
    trainer.fit(lm)
    state = full_state(lm.model)
    clipped = int(trainer.callback_metrics["train/qk_clipped_heads"])
    if rank == 0:
        torch.save(state, out / "lightning_rank0.pt")
    return clipped


def main():
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    reference = single() if os.environ["RANK"] == "0" else None  # one process, before the group exists
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = {}
    # --- DDP replicas
    ddp = torch.nn.parallel.DistributedDataParallel(make_model())
    clipper = QKClipper(threshold=TAU).attach(ddp.module)
    with torch.no_grad():
        ddp(batch(rank))
    clipper.clip()
    mine = full_state(ddp.module)
    other = [None, None]
    dist.all_gather_object(other, mine)
    report["ddp_ranks_equal"] = all(torch.equal(other[0][k], other[1][k]) for k in mine)
    # --- FSDP2 row shards
    from torch.distributed.device_mesh import init_device_mesh

    model = make_model()
    shard_per_block(model, init_device_mesh("cpu", (2,)))
    clipper = QKClipper(threshold=TAU).attach(model)
    with torch.no_grad():
        model(batch(rank))
    clipper.clip()
    rows = [None, None]
    dist.all_gather_object(rows, model.blocks[0].attn.qkv.weight.to_local().shape[0])
    report["fsdp_local_rows"] = rows
    fsdp = full_state(model)
    report["lightning_clipped"] = lightning_run(out, rank)
    if rank == 0:
        torch.save(mine, out / "ddp_rank0.pt")
        torch.save(fsdp, out / "fsdp_rank0.pt")
        want, clipped = reference
        torch.save(want, out / "ddp_single.pt")
        torch.save(want, out / "fsdp_single.pt")
        torch.save(want, out / "lightning_single.pt")
        report["ddp_clipped"] = report["fsdp_clipped"] = clipped
        report["lightning_single_clipped"] = clipped
        (out / "report.json").write_text(json.dumps(report))
    dist.barrier()
    finish(out)


if __name__ == "__main__":
    main()
