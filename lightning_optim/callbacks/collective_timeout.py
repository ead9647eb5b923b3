"""``CollectiveTimeoutReport``: when a collective times out, say which one, on which rank, at which step.

A rank that dies or stops (OOM-killed, ``SIGSTOP``, a hung data loader) leaves the others blocked in their next
collective until the process group's timeout (Lightning's default is 30 minutes; the recipes pass
``--dist_timeout``, 600 s by default, to the strategy). The backend's error then says only
``Timed out waiting 600000ms for recv operation to complete`` (gloo) or names a sequence number (NCCL). This
callback catches that exception in ``on_exception`` and prints, on the rank that raised it, one line that names
the collective from the Python stack it was raised in (DDP's gradient all-reduce in ``backward``, a stability
callback's decision all-reduce, an optimizer's all-to-all, a barrier ...), the step and the timeout, then lets
the exception end the run with a non-zero exit.

Usage::

    trainer = L.Trainer(strategy=DDPStrategy(timeout=timedelta(seconds=600)), callbacks=[CollectiveTimeoutReport()])
"""

from __future__ import annotations

import sys
import traceback
from typing import Any

from lightning.pytorch.callbacks import Callback

__all__ = ["CollectiveTimeoutReport", "describe_collective"]

# (substring of a function name or file on the stack, description), most specific first
_WHERE = (
    ("all_to_all", "an optimizer's all-to-all (matrix owners exchanging shards)"),
    ("any_rank", "the stability callbacks' skip/stop decision all-reduce"),
    ("reduce_boolean_decision", "a decision all-reduce"),
    ("barrier", "a barrier"),
    ("all_gather", "an all-gather"),
    ("broadcast", "a broadcast"),
    ("clip_grad", "the gradient clipping norm all-reduce"),
    ("backward", "DDP's gradient all-reduce (in backward)"),
    ("reduce", "an all-reduce"),
)


def _is_timeout(err: BaseException) -> bool:
    text = str(err).lower()
    return "timed out" in text or "timeout" in text or type(err).__name__ == "DistBackendError" and "time" in text


def describe_collective(err: BaseException) -> str:
    """Which collective the exception was raised in, from the names on its Python stack."""
    names = [f"{frame.name} {frame.filename}" for frame in traceback.extract_tb(err.__traceback__)]
    for needle, description in _WHERE:
        if any(needle in n for n in reversed(names)):
            return description
    return "a collective"


class CollectiveTimeoutReport(Callback):
    """Names the collective that timed out (see the module docstring)."""

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if not _is_timeout(exception):
            return
        timeout = getattr(trainer.strategy, "_timeout", None)
        limit = f"{timeout.total_seconds():g} s" if timeout is not None else "the process group's timeout"
        print(f"lightning-optim: rank {trainer.global_rank} of {trainer.world_size} gave up after {limit} waiting in "
              f"{describe_collective(exception)} at optimizer step {trainer.global_step}: another rank is stuck, "
              "stopped or dead (see its log). The checkpoints already written are unchanged.",
              file=sys.stderr, flush=True)
