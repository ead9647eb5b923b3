"""2 CPU ranks (gloo): VerifiedModelParallelStrategy's sharded checkpoints in real Trainer runs.

Run by ``tests/test_checkpoint_io.py`` under ``torch.distributed.run``; writes ``result_rank{r}.json`` under
``argv[1]`` with what each rank saw:

1. a 4-step fit saving sharded checkpoints every 2 steps (``save_last=True``, so ``last.ckpt`` is replaced
   once): every folder verifies against its manifest, no staging folder is left;
2. a shard of ``last.ckpt`` gets a flipped byte: resuming from it raises ``CheckpointError`` naming the
   folder on both ranks;
3. ``newest_verified_checkpoint`` skips it and picks ``step4.ckpt``; resuming from that reaches step 6, and so
   does resuming it with an optimizer whose param groups carry a setting the checkpoint lacks (kept, warned);
4. rank 1 alone holds a NaN in its shard at a save step: both ranks raise ``NonFiniteCheckpointError``
   (no rank is left waiting) and the earlier checkpoints are intact;
5. with ``save_distributed_checkpoint=False`` the full file is written by rank 0 with its SHA-256 sidecar
   and a 2-rank resume from it reaches step 4.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_optim.checkpoint import CheckpointError, verify_checkpoint
from lightning_optim.checkpoint_dcp import VerifiedModelParallelStrategy
from lightning_optim.checkpoint_io import NonFiniteCheckpointError, newest_verified_checkpoint
from tests.conformance._lightning import ConfLM, trainer
from tests.dist_utils import finish


def strategy(sharded: bool = True) -> VerifiedModelParallelStrategy:
    return VerifiedModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                         save_distributed_checkpoint=sharded)


class PoisonShard(Callback):
    """At ``step``, rank 1 writes a NaN into its local shard of ``fc1.weight``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == self.step and trainer.global_rank == 1:
            with torch.no_grad():
                pl_module.model.fc1.weight.to_local()[0, 0] = float("nan")


def main() -> None:
    out = Path(sys.argv[1])
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    folder = out / "ckpt"
    result: dict = {}

    def checkpoints(**kw) -> ModelCheckpoint:
        return ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_top_k=-1, filename="step{step}",
                               auto_insert_metric_name=False, **kw)

    tr = trainer(out / "run1", max_steps=4, devices=2, strategy=strategy(), enable_checkpointing=True,
                 callbacks=[checkpoints(save_last=True)])
    tr.fit(ConfLM(optimizer="adamw", total_steps=8))
    rank = dist.get_rank()
    if rank == 0:
        result["files"] = sorted(p.name for p in folder.iterdir())
        result["verified"] = {p.name: verify_checkpoint(p) for p in sorted(folder.glob("*.ckpt"))}
        shard = sorted((folder / "last.ckpt").glob("*.distcp"))[0]
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x10
        shard.write_bytes(bytes(data))
    dist.barrier()

    last = folder / "last.ckpt"
    try:
        trainer(out / "run2", max_steps=6, devices=2, strategy=strategy()).fit(ConfLM(optimizer="adamw",
                                                                                     total_steps=8), ckpt_path=last)
        result["corrupt_resume"] = "loaded"
    except CheckpointError as err:
        result["corrupt_resume"] = str(err)
        result["corrupt_path"] = err.path

    found = newest_verified_checkpoint(folder)
    result["newest"] = os.fspath(found.path)
    result["skipped"] = [[os.fspath(p), reason] for p, reason in found.skipped]
    tr = trainer(out / "run3", max_steps=6, devices=2, strategy=strategy())
    tr.fit(ConfLM(optimizer="adamw", total_steps=8), ckpt_path=found.path)
    result["resumed_step"] = tr.global_step

    # 3b. the running optimizer has a param-group setting the checkpoint lacks (added by a later release):
    # the resume keeps the running value, warns, and still loads every tensor
    class NewerLM(ConfLM):
        def configure_optimizers(self):
            config = super().configure_optimizers()
            for group in self.optimizers_of(config).param_groups:
                group["setting_added_later"] = 7
            return config

        @staticmethod
        def optimizers_of(config):
            return config["optimizer"] if isinstance(config, dict) else config[0][0]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = trainer(out / "run3b", max_steps=6, devices=2, strategy=strategy())
        tr.fit(NewerLM(optimizer="adamw", total_steps=8), ckpt_path=found.path)
    result["newer_resumed_step"] = tr.global_step
    result["newer_setting"] = sorted({g.get("setting_added_later") for g in tr.optimizers[0].param_groups})
    result["newer_warned"] = any("setting_added_later=7" in str(w.message) for w in caught)
    warnings.filterwarnings("ignore")

    poisoned = folder / "poisoned"
    try:
        tr = trainer(out / "run4", max_steps=4, devices=2, strategy=strategy(), enable_checkpointing=True,
                     callbacks=[PoisonShard(4), ModelCheckpoint(dirpath=poisoned, every_n_train_steps=2,
                                                                save_top_k=1, filename="step{step}",
                                                                auto_insert_metric_name=False)])
        tr.fit(ConfLM(optimizer="adamw", total_steps=8))
        result["non_finite"] = "saved"
    except NonFiniteCheckpointError as err:
        result["non_finite"] = str(err)
        result["non_finite_tensor"] = err.tensor
    dist.barrier()
    if rank == 0:
        result["poisoned_files"] = sorted(p.name for p in poisoned.iterdir())
        result["poisoned_verified"] = verify_checkpoint(poisoned / "step2.ckpt")

    full = folder / "full"
    tr = trainer(out / "run5", max_steps=2, devices=2, strategy=strategy(sharded=False), enable_checkpointing=True,
                 callbacks=[ModelCheckpoint(dirpath=full, every_n_train_steps=2, filename="step{step}",
                                            auto_insert_metric_name=False)])
    tr.fit(ConfLM(optimizer="adamw", total_steps=8))
    dist.barrier()
    if rank == 0:
        result["full_files"] = sorted(p.name for p in full.iterdir())
        result["full_verified"] = verify_checkpoint(full / "step2.ckpt")
    tr = trainer(out / "run6", max_steps=4, devices=2, strategy=strategy(sharded=False))
    tr.fit(ConfLM(optimizer="adamw", total_steps=8), ckpt_path=full / "step2.ckpt")
    result["full_resumed_step"] = tr.global_step
    (out / f"result_rank{rank}.json").write_text(json.dumps(result, indent=1))
    finish(out)


if __name__ == "__main__":
    main()
