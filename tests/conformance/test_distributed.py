"""Guarantee 2 — checkpoint formats under FSDP2 (2 CPU processes) and Lightning's ModelParallelStrategy.

One ``torchrun`` launch (``tests/dist_scripts/conf_fsdp2.py``) checks every registered optimizer in one
process group; each test below reads its own optimizer's cells from that run:

* ``straight``: 2K FSDP2 steps stay finite (the max difference from the same run in one process is recorded
  in the message; it is not asserted here — numerics across layouts belong to each optimizer's own tests).
* ``full`` / ``sharded``: K steps → get_*_state_dict(full_state_dict=True | False) → torch.save →
  torch.load(weights_only=True) → fresh sharded model/optimizer → set_*_state_dict → K steps equals 2K steps,
  bit for bit, on both ranks.
* ``lightning``: a Lightning checkpoint written under ``ModelParallelStrategy`` (FSDP2, 2 processes) loads back
  into a one-process Trainer run: the optimizer state after the restore equals the checkpoint's, training
  continues from the saved step and stays finite.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_optim.checkpoint import load_checkpoint

from ._helpers import (
    canonical_optimizer_state,
    diff_states,
    missing_dependency,
    nonfinite_entries,
    registered_optimizers,
)

SCRIPT = Path(__file__).resolve().parents[1] / "dist_scripts" / "conf_fsdp2.py"


@pytest.fixture(scope="session")
def fsdp2_run(tmp_path_factory) -> tuple[Path, dict[str, dict[str, str]]]:
    """Launch the FSDP2 script once for every buildable registered optimizer; merge both ranks' results.

    If the launch dies (an optimizer left the ranks' collectives mismatched, or a rank crashed), the optimizer
    it was on gets every cell failed with the log tail, and the script is launched again for the rest."""
    from tests.dist_utils import run_distributed

    out = tmp_path_factory.mktemp("conf_fsdp2")
    remaining = [n for n in registered_optimizers() if missing_dependency(n) is None]
    merged: dict[str, dict[str, str]] = {}
    while remaining:
        for f in [*out.glob("*.json"), *out.glob("current_rank*.txt")]:
            f.unlink()
        crash = None
        try:
            run_distributed(SCRIPT, str(out), *remaining, nprocs=2, timeout=600)
        except Exception as err:  # noqa: BLE001 - recorded against the optimizer in flight
            crash = f"{type(err).__name__}: {err}"
        done = _merge(out, merged)
        remaining = [n for n in remaining if n not in done]
        if crash is None or not remaining:
            break
        current = {(out / f"current_rank{r}.txt").read_text() for r in (0, 1)
                   if (out / f"current_rank{r}.txt").exists()}
        culprit = next((n for n in remaining if n in current), None)
        if culprit is None:  # died before any optimizer started (an import error ...): nobody to blame
            for n in remaining:
                merged[n] = {c: f"FAILED: the FSDP2 launch died before checking any optimizer:\n{crash[-4000:]}"
                             for c in ("straight", "full", "sharded", "lightning")}
            break
        merged[culprit] = {c: f"FAILED: the FSDP2 launch died during {culprit!r}:\n{crash[-4000:]}"
                           for c in ("straight", "full", "sharded", "lightning")}
        remaining = remaining[remaining.index(culprit) + 1:]
    return out, merged


def _merge(out: Path, merged: dict[str, dict[str, str]]) -> set[str]:
    """Fold both ranks' JSON into ``merged`` (a failure on either rank wins); the names both ranks finished."""
    finished = []
    for rank in (0, 1):
        path = out / f"rank{rank}.json"
        results = json.loads(path.read_text()) if path.exists() else {}
        finished.append(set(results))
        for name, cells in results.items():
            for cell, msg in cells.items():
                prev = merged.setdefault(name, {}).get(cell)
                if prev is None or (prev.startswith("ok") and not msg.startswith("ok")):
                    merged[name][cell] = msg if rank == 0 or msg.startswith(("ok", "skip")) else f"[rank 1] {msg}"
    return finished[0] & finished[1]


def _cell(fsdp2_run, name: str, cell: str) -> str:
    _, results = fsdp2_run
    assert name in results, f"{name}: missing from the FSDP2 run's results (did the launch die on it?)"
    msg = results[name].get(cell, "FAILED: no result recorded")
    if msg.startswith("skip"):
        pytest.skip(msg)
    assert msg.startswith("ok"), f"{name} / FSDP2 {cell}: {msg}"
    return msg


@pytest.mark.parametrize("cell", ["straight", "full", "sharded"])
def test_fsdp2(optim_name, cell, fsdp2_run):
    _cell(fsdp2_run, optim_name, cell)


def test_modelparallel_checkpoint_resumes_in_one_process(optim_name, fsdp2_run, tmp_path):
    from ._lightning import CaptureOnStart, ConfLM, trainer

    _cell(fsdp2_run, optim_name, "lightning")
    path = fsdp2_run[0] / "lightning" / f"{optim_name}.ckpt"
    ckpt = load_checkpoint(path, weights_only=False)
    saved_step = ckpt["global_step"]
    capture = CaptureOnStart()
    model = ConfLM(optimizer=optim_name, total_steps=8)
    trainer(tmp_path, max_steps=saved_step + 2, callbacks=[capture]).fit(model, ckpt_path=str(path))
    assert capture.global_step == saved_step
    problems = diff_states(canonical_optimizer_state(ckpt["optimizer_states"][0]),
                           canonical_optimizer_state(capture.optimizer_state))
    assert not problems, (
        f"{optim_name}: the optimizer state restored in one process differs from the ModelParallelStrategy "
        "checkpoint:\n  " + "\n  ".join(problems[:12])
    )
    bad = nonfinite_entries({n: p.detach() for n, p in model.named_parameters()})
    bad += nonfinite_entries(model.trainer.optimizers[0].state_dict())
    assert not bad, f"{optim_name}: non-finite after resuming the FSDP2 checkpoint in one process: {bad}"
    assert model.trainer.global_step == saved_step + 2
