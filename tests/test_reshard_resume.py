"""Moving a checkpoint between world sizes: FSDP2 / HSDP checkpoints resume with any number of processes.

For every registered optimizer of the matrix family or a hybrid that runs on FSDP2
(:func:`reshard_common.reshard_optimizers`, read from the registry, so new entries are covered when they land),
a tiny ``LanguageModel`` trains under Lightning's ``ModelParallelStrategy`` (our
:class:`~lightning_optim.checkpoint_dcp.VerifiedModelParallelStrategy`, CPU, gloo) and its sharded checkpoint
is resumed in other layouts:

==================  ===========================  =========================================
leg                 resumes                      from
==================  ===========================  =========================================
``fsdp1``           1 process                    the 2-process FSDP checkpoint (step 3)
``fsdp4``           4 processes, FSDP            the 2-process FSDP checkpoint (step 3)
``hsdp2x2``         4 processes, HSDP 2×2        the 2-process FSDP checkpoint (step 3)
``hsdp2x2-fsdp2``   2 processes, FSDP            the HSDP 2×2 checkpoint (step 4)
==================  ===========================  =========================================

Each leg must (1) restore the optimizer state — every tensor gathered to its full shape by parameter name, and
every param-group setting — exactly as it was written, (2) restore the weights exactly, and (3) take a next step
that lands within bfloat16 precision of the step the run that wrote the checkpoint took next, uninterrupted
(:func:`reshard_common.step_differences`): the 2-process run for the first three legs, the HSDP 2×2 run (which
itself resumed from the 2-process checkpoint, leg ``hsdp2x2``) for the last. Why not the 2-process run there too:
two runs in different layouts hold factors that differ in the last bits, and Shampoo's direction for a gradient
outside the range of its factors (rank <= 4 after 4 steps; default damping 1e-12, below float32's eigenvalue noise)
is set by that noise once each run has refreshed its own roots (a 1e-7 relative perturbation of a factor turns the
direction completely); compared with the run whose roots it loaded, the resumed step checks the checkpoint alone. A
negative control with shard-local plain state (:class:`reshard_common.LocalRowsMuon`) shows that the comparison
catches what this file exists for, what DCP does with it on resume (a size mismatch in 4 processes), and that
``VerifiedModelParallelStrategy`` refuses to write it.

Cost: four ``torchrun`` launches for all optimizers together (2, then 4, then 2 and 1 processes side by side),
each optimizer a ``Trainer`` of its own inside them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conformance._helpers import missing_dependency
from tests.dist_scripts.reshard_common import (
    BF16_TOLERANCE,
    CONTROL,
    SAVE_STEP,
    reshard_optimizers,
    state_differences,
    step_differences,
)
from tests.dist_utils import run_distributed

SCRIPT = Path(__file__).resolve().parent / "dist_scripts" / "reshard_run.py"
NAMES = reshard_optimizers()
# leg -> (what it is, the leg that wrote the checkpoint it resumes; that leg's run is also the uninterrupted one
# its next step is compared with)
LEGS = {
    "fsdp1": ("2-process FSDP checkpoint resumed in 1 process", "fsdp2"),
    "fsdp4": ("2-process FSDP checkpoint resumed in 4 processes (FSDP)", "fsdp2"),
    "hsdp2x2": ("2-process FSDP checkpoint resumed in 4 processes (HSDP 2x2)", "fsdp2"),
    "hsdp2x2-fsdp2": ("HSDP 2x2 checkpoint resumed in 2 processes (FSDP)", "hsdp2x2"),
}
# (phase, processes) groups, in order; the phases of a group run side by side (back2 and resume1 need only what
# the earlier groups wrote; resume4 writes the HSDP checkpoint back2 reads)
PHASES = ((("save2", 2),), (("resume4", 4),), (("back2", 2), ("resume1", 1)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Every phase launched once for all optimizers (and the control); a failed launch is recorded by phase."""
    from concurrent.futures import ThreadPoolExecutor

    out = tmp_path_factory.mktemp("reshard")
    names = [n for n in NAMES if missing_dependency(n) is None]
    failed: dict[str, str] = {}

    def launch(phase: str, nprocs: int) -> None:
        try:
            run_distributed(SCRIPT, phase, str(out), *names, CONTROL, nprocs=nprocs, timeout=480,
                            out_dir=out / "done" / phase)
        except Exception as err:  # noqa: BLE001 - every leg of that phase fails with this log
            failed[phase] = f"{type(err).__name__}: {err}"[-6000:]

    for group in PHASES:
        with ThreadPoolExecutor(len(group)) as pool:
            list(pool.map(lambda job: launch(*job), group))
    return out, failed


def _result(out: Path, failed: dict[str, str], leg: str, name: str) -> dict:
    path = out / leg / f"{name}.pt"
    if not path.exists():
        error = out / leg / f"{name}.error"
        why = error.read_text() if error.exists() else "\n".join(f"[{p}] {log}" for p, log in failed.items())
        pytest.fail(f"{name}: leg {leg!r} left no result:\n{why[-6000:]}")
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("leg", list(LEGS))
@pytest.mark.parametrize("name", NAMES)
def test_resume_in_another_world_size(runs, name: str, leg: str) -> None:
    missing = missing_dependency(name)
    if missing:
        pytest.skip(missing)
    out, failed = runs
    what, source_leg = LEGS[leg]
    source = _result(out, failed, source_leg, name)  # wrote the checkpoint, and went on uninterrupted
    resumed = _result(out, failed, leg, name)

    assert source["saved_step"] == resumed["start_step"], (
        f"{name}, {what}: resumed at step {resumed['start_step']}, the checkpoint was written at "
        f"{source['saved_step']}")
    problems = state_differences(source["saved"], resumed["loaded"])
    assert not problems, (f"{name}, {what}: the optimizer state after the restore is not the state that was "
                          "saved:\n  " + "\n  ".join(problems[:20]))
    start = resumed["start_step"]
    weights = [n for n, w in source["saved_params"].items() if not torch.equal(w, resumed["params"][start][n])]
    assert not weights, f"{name}, {what}: weights not restored exactly: {weights[:10]}"

    after = start + 1
    far, _ = step_differences(resumed["params"][after], source["params"][after], source["params"][start])
    assert not far, (f"{name}, {what}: step {after} is not within bf16 precision (relative {BF16_TOLERANCE:g}) "
                     f"of the uninterrupted {source_leg} run:\n  " + "\n  ".join(far[:20]))


def test_optimizers_under_test_come_from_the_registry() -> None:
    from lightning_optim.registry import get_optimizer_spec

    assert {"muon", "normuon", "soap"} <= set(NAMES), NAMES
    for name in NAMES:
        spec = get_optimizer_spec(name)
        assert (spec.family == "matrix" or spec.hybrid) and spec.supports_dtensor, name
    assert CONTROL not in NAMES  # the control is registered only inside the launched scripts


def test_shard_local_plain_state_is_caught(runs) -> None:
    """The negative control: a plain ``local_rows × 1`` tensor in the optimizer state."""
    out, failed = runs
    unchecked = _result(out, failed, "fsdp2", CONTROL)  # written with check_replicated_state=False
    flagged = unchecked["saved"]["rank_dependent"]
    assert flagged and all(label.endswith(".row_sq") for label in flagged), flagged
    assert any("shard-dependent" in p for p in state_differences(unchecked["saved"], unchecked["saved"]))

    resumed = out / "fsdp4" / f"{CONTROL}.error"  # DCP loads a plain tensor whole: 96 saved rows into 48
    assert resumed.exists() and "Size mismatch" in resumed.read_text(), (
        resumed.read_text()[-3000:] if resumed.exists() else "the 4-process resume of the control did not fail")

    refused = out / "fsdp2-checked" / f"{CONTROL}.error"
    assert refused.exists(), "VerifiedModelParallelStrategy wrote the control's shard-dependent state"
    text = refused.read_text()
    assert "CheckpointError" in text and "differ between the ranks" in text and "row_sq" in text, text[-3000:]
    assert not (out / "ckpt" / "fsdp2-checked" / CONTROL / f"step{SAVE_STEP}.ckpt").exists()


def test_fingerprints_tell_tensors_apart() -> None:
    """The strategy's check compares two integer sums of the raw bits; they must separate what differs."""
    from lightning_optim.checkpoint_dcp import rank_dependent_entries, tensor_fingerprint

    x = torch.randn(37, 5)
    assert tensor_fingerprint(x) == tensor_fingerprint(x.clone())
    assert tensor_fingerprint(x) != tensor_fingerprint(x.flip(0))  # same values, other order
    y = x.clone()
    y[3, 2] = torch.nextafter(y[3, 2], torch.tensor(float("inf")))  # one ulp
    assert tensor_fingerprint(x) != tensor_fingerprint(y)
    assert tensor_fingerprint(torch.tensor([0.0])) != tensor_fingerprint(torch.tensor([-0.0]))
    big = torch.arange(3_000_000, dtype=torch.float32)  # several chunks
    assert tensor_fingerprint(big) != tensor_fingerprint(big.roll(1))
    for t in (torch.tensor([True, False]), torch.zeros(3, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.complex64)):
        assert tensor_fingerprint(t) == tensor_fingerprint(t.clone())

    same = {"a": ((2,), "torch.float32", (1, 2))}
    assert rank_dependent_entries([same, dict(same)]) == []
    assert rank_dependent_entries([same, {"a": ((2,), "torch.float32", (1, 3))}]) == ["a (values differ)"]
    assert rank_dependent_entries([same, {"a": ((3,), "torch.float32", (1, 2))}]) == ["a (shapes [(2,), (3,)] differ)"]
    assert rank_dependent_entries([same, {}]) == ["a exists on ranks [0] only"]


def test_step_comparison_can_fail() -> None:
    """The tolerance separates bf16 noise from a lost state: a resumed step twice as long fails."""
    origin = {"w": torch.zeros(4, 4)}
    reference = {"w": torch.full((4, 4), 1e-3)}
    noisy = {"w": reference["w"] * (1 + BF16_TOLERANCE / 2)}
    assert step_differences(noisy, reference, origin)[0] == []
    assert step_differences({"w": reference["w"] * 2}, reference, origin)[0]
    assert step_differences({}, reference, origin)[0] == ["w: missing from the resumed run"]
