"""Resharding resume: one launch per phase, every optimizer under test in a loop (``tests/test_reshard_resume.py``).

Usage::

    torchrun --nproc_per_node=W tests/dist_scripts/reshard_run.py PHASE OUT_DIR name [name ...]

Each optimizer gets its own Lightning ``Trainer`` on
:class:`~lightning_optim.checkpoint_dcp.VerifiedModelParallelStrategy` (accelerator cpu, gloo) training
:class:`reshard_common.ReshardLM`. Phases, in the order the test runs them:

``save2``    (W=2, FSDP) the uninterrupted run: ``SAVE_STEP + 2`` steps, a sharded checkpoint after step
             ``SAVE_STEP`` (``ModelCheckpoint``), the optimizer state as written and the weights after every step.
``resume4``  (W=4) from the 2-process checkpoint: FSDP over 4 ranks, one step; then HSDP 2×2, two steps
             with a checkpoint after the first (for ``back2``; the second is the uninterrupted step ``back2``
             is compared with).
``back2``    (W=2, FSDP) from the HSDP 2×2 checkpoint, one step.
``resume1``  (W=1) from the 2-process checkpoint, one step.

A resumed run records the optimizer state right after Lightning restored it (``on_train_start``) and the
weights then and after its step. Rank 0 writes ``OUT_DIR/<leg>/<name>.pt`` (see :mod:`reshard_common` for what
is gathered); an exception in one optimizer's run is written to ``OUT_DIR/<leg>/<name>.error`` and the loop
goes on. The script ends with :func:`tests.dist_utils.finish`, its markers in ``OUT_DIR/done/<PHASE>``.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.distributed.checkpoint.api import CheckpointException

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.dist_scripts.reshard_common import (  # noqa: E402
    CONTROL,
    SAVE_STEP,
    ReshardLM,
    full_optimizer_state,
    full_params,
    register_control,
    trainer,
)
from tests.dist_utils import finish  # noqa: E402


class Record(L.Callback):
    """Gathers what the test compares: the optimizer state when a checkpoint is written (``saved``) and when
    training (re)starts (``loaded``), and the weights at the start and after every step (``params[step]``)."""

    def __init__(self) -> None:
        self.result: dict = {"params": {}}

    def on_train_start(self, trainer, pl_module):
        self.result["start_step"] = trainer.global_step
        self.result["loaded"] = full_optimizer_state(pl_module, trainer.optimizers[0])
        self.result["params"][trainer.global_step] = full_params(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.result["params"][trainer.global_step] = full_params(pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        # inside Trainer.save_checkpoint, before the strategy writes: exactly the state that goes to disk
        self.result["saved_step"] = trainer.global_step
        self.result["saved"] = full_optimizer_state(pl_module, trainer.optimizers[0])
        self.result["saved_params"] = full_params(pl_module)


def ckpt_dir(out: Path, leg: str, name: str) -> Path:
    return out / "ckpt" / leg / name


def run_leg(out: Path, leg: str, name: str, layout: str, max_steps: int, resume: Path | None = None,
            save_every: int | None = None, check_replicated_state: bool = True) -> None:
    record = Record()
    callbacks: list[L.Callback] = [record]
    if save_every is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir(out, leg, name), filename="step{step}",
                                         auto_insert_metric_name=False, every_n_train_steps=save_every,
                                         save_top_k=-1))
    tr = trainer(layout, out / "runs" / leg / name, max_steps, callbacks, check_replicated_state)
    tr.fit(ReshardLM(name), ckpt_path=resume)
    if dist.get_rank() == 0:
        (out / leg).mkdir(parents=True, exist_ok=True)
        torch.save(record.result, out / leg / f"{name}.pt")


def checkpoint(out: Path, leg: str, name: str, step: int) -> Path:
    return ckpt_dir(out, leg, name) / f"step{step}.ckpt"


PHASES = {
    "save2": [("fsdp2", dict(layout="fsdp2", max_steps=SAVE_STEP + 2, save_every=SAVE_STEP))],
    "resume4": [("fsdp4", dict(layout="fsdp4", max_steps=SAVE_STEP + 1, resume=("fsdp2", SAVE_STEP))),
                ("hsdp2x2", dict(layout="hsdp2x2", max_steps=SAVE_STEP + 2, resume=("fsdp2", SAVE_STEP),
                                 save_every=SAVE_STEP + 1))],
    "back2": [("hsdp2x2-fsdp2", dict(layout="fsdp2", max_steps=SAVE_STEP + 2, resume=("hsdp2x2", SAVE_STEP + 1)))],
    "resume1": [("fsdp1", dict(layout="fsdp1", max_steps=SAVE_STEP + 1, resume=("fsdp2", SAVE_STEP)))],
}
# the negative control (reshard_common.CONTROL): saved once without the strategy's check (to show that this
# harness catches its state, and what a resume from it does) and once with it (refused)
CONTROL_PHASES = {
    "save2": [("fsdp2", dict(layout="fsdp2", max_steps=SAVE_STEP + 1, save_every=SAVE_STEP,
                             check_replicated_state=False)),
              ("fsdp2-checked", dict(layout="fsdp2", max_steps=SAVE_STEP + 1, save_every=SAVE_STEP))],
    "resume4": [("fsdp4", dict(layout="fsdp4", max_steps=SAVE_STEP + 1, resume=("fsdp2", SAVE_STEP)))],
}


def main() -> None:
    phase, out, names = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if CONTROL in names:
        register_control()
    for name in names:
        for leg, spec in (CONTROL_PHASES if name == CONTROL else PHASES).get(phase, []):
            kw = dict(spec)
            if "resume" in kw:
                kw["resume"] = checkpoint(out, kw["resume"][0], name, kw["resume"][1])
            try:
                run_leg(out, leg, name, **kw)
            except (Exception, CheckpointException) as err:  # noqa: BLE001 - recorded, the other optimizers go on
                # (torch.distributed.checkpoint's CheckpointException is a BaseException)
                if dist.is_initialized() and dist.get_rank() == 0 or not dist.is_initialized():
                    (out / leg).mkdir(parents=True, exist_ok=True)
                    (out / leg / f"{name}.error").write_text(
                        f"{type(err).__name__}: {err}\n{traceback.format_exc()[-4000:]}")
            if dist.is_initialized():
                dist.barrier()
    if not dist.is_initialized():  # every run failed before Lightning set up the process group
        dist.init_process_group("gloo")
    done = out / "done" / phase  # one folder of end markers per phase: phases may run side by side
    done.mkdir(parents=True, exist_ok=True)
    finish(done)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
