"""What a new user meets on first contact with the recipes: short runs, errors once before launch, resume with
``--ckpt_path last``, the batch geometry block, effective settings in config.yaml and hparams, the progress bar
in optimizer steps, no logger, more devices than cores, schedule-free with a decaying schedule."""

from __future__ import annotations

import logging

import pytest
import torch
import yaml

from tests.recipe_runner import RECIPES, cheap_cell, run_command, run_recipe, size_override

import _cli  # noqa: E402  (recipes/ is on sys.path once tests.recipe_runner is imported)

TINY = RECIPES / "tiny.py"
LLAMA124M = RECIPES / "llama124m.py"


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def caplog():
    """The recipe's rank-zero messages, collected on Lightning's own logger (pytest's caplog relies on propagation
    to the root logger, which other tests' Lightning runs may have turned off)."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    handler, level, disabled = _Collect(), logger.level, logger.disabled
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.disabled = False

    class _Log:
        records = handler.records

        @staticmethod
        def at_level(_level):
            import contextlib

            return contextlib.nullcontext()

    try:
        yield _Log
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.disabled = disabled


def test_short_run_needs_no_warmup_flag_on_a_benchmark_recipe(cache, in_tmp, caplog):
    """--trainer.max_steps 3 alone on a 124M recipe (warmup 2000): the warmup is capped, with a message."""
    with caplog.at_level("INFO"):
        cli = run_recipe(LLAMA124M, [*cheap_cell(cache), "--trainer.max_steps", "3"])
    assert cli.trainer.global_step == 3
    assert cli.model.optim_config().warmup_steps == 0  # floor(0.25 * 3)
    assert sum("warmup_steps 2000 is more than 0.25" in r.getMessage() for r in caplog.records) == 1
    cli = run_recipe(LLAMA124M, [*cheap_cell(cache), "--trainer.max_steps", "40"])
    assert cli.model.optim_config().warmup_steps == 10
    sched = cli.trainer.lr_scheduler_configs[0].scheduler
    assert sched.schedule.warmup_steps == 10 and sched.schedule.total_steps == 40


def test_configuration_error_is_reported_once_before_any_process_starts(cache, in_tmp):
    proc = run_command(["python", "recipes/llama124m.py", *size_override(cache), "--optim.lr", "-1",
                        "--trainer.accelerator", "cpu", "--trainer.devices", "2"], cwd=in_tmp, timeout=240)
    assert proc.returncode == 2
    assert proc.stderr.count("optim") >= 1 and proc.stderr.count("must be >= 0") == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "Initializing distributed" not in proc.stdout + proc.stderr


def test_ckpt_path_last_resumes_the_newest_verified_checkpoint(cache, in_tmp, caplog):
    args = [*size_override(cache), "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--checkpoint.every_n_train_steps", "1", "--data.val_every_n_steps", "1000"]
    first = run_recipe(TINY, [*args, "--trainer.max_steps", "2"])
    ckpt_dir = in_tmp / "lightning_logs" / "llama-tiny" / "version_0" / "checkpoints"
    assert (ckpt_dir / "last.ckpt").is_file() and first.trainer.global_step == 2
    with caplog.at_level("INFO"):
        resumed = run_recipe(TINY, [*args, "--trainer.max_steps", "4", "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 4
    assert any("resuming from" in r.getMessage() and "version_0" in r.getMessage() for r in caplog.records)
    # the newest file is corrupt: it is skipped, with the reason, and the next newest is used
    newest = max(ckpt_dir.parent.parent.glob("version_*/checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=f"skipping .*{newest.name}"):
        again = run_recipe(TINY, [*args, "--trainer.max_steps", "5", "--ckpt_path", "last"])
    assert again.trainer.global_step == 5


def test_ckpt_path_last_without_a_checkpoint_is_an_error(cache, in_tmp, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_recipe(TINY, [*cheap_cell(cache), "--ckpt_path", "last"])
    assert exit_info.value.code == 2
    assert "no usable checkpoint" in capsys.readouterr().err


def test_batch_geometry_is_printed_recorded_and_the_progress_bar_counts_optimizer_steps(cache, in_tmp, caplog):
    args = [*size_override(cache, steps=3, global_batch=8), "--data.micro_batch_size", "2",
            "--trainer.accelerator", "cpu", "--data.val_every_n_steps", "1000"]
    with caplog.at_level("INFO"):
        cli = run_recipe(TINY, args)
    block = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("run:"))
    for text in ("devices                 1", "micro-batch             2", "gradient accumulation   4",
                 "8 sequences x 32 tokens = 256 tokens per optimizer step", "768 tokens in 3 steps"):
        assert text in block, block
    assert cli.trainer.accumulate_grad_batches == 4
    log_dir = cli.trainer.logger.log_dir
    saved = yaml.safe_load(open(f"{log_dir}/config.yaml"))
    assert saved["trainer"]["accumulate_grad_batches"] == 4
    assert saved["optim"]["lr"] == 3e-3 and saved["optim"]["betas"] == [0.9, 0.99]  # the effective values
    hparams = yaml.safe_load(open(f"{log_dir}/hparams.yaml"))
    assert hparams["optim"]["name"] == "adamw" and hparams["optim"]["lr"] == 3e-3
    assert hparams["geometry"]["accumulate_grad_batches"] == 4 and hparams["geometry"]["tokens_per_step"] == 256
    bar = cli.trainer.progress_bar_callback
    assert type(bar).__name__ == "StepProgressBar"
    assert bar.train_progress_bar.n == 3 and bar.train_progress_bar.total == 3


def test_logger_false_works(cache, in_tmp):
    cli = run_recipe(TINY, [*cheap_cell(cache), "--trainer.logger", "false"])
    assert cli.trainer.logger is None and cli.trainer.global_step == 2


def test_more_devices_than_cpu_cores_warns(cache, in_tmp, monkeypatch):
    monkeypatch.setattr(_cli, "_cpu_cores", lambda: 0)  # one device on "zero cores": the check, without 8 processes
    with pytest.warns(UserWarning, match="processes on a machine with 0 CPU cores"):
        run_recipe(TINY, cheap_cell(cache))


def test_schedule_free_gets_constant_and_warns_with_a_decaying_schedule(cache, in_tmp):
    cli = run_recipe(TINY, [*cheap_cell(cache), "--optim.name", "sf-adamw"])
    assert cli.model.optim_config().scheduler == "constant"
    with pytest.warns(UserWarning, match="schedule-free"):
        run_recipe(TINY, [*cheap_cell(cache), "--optim.name", "sf-adamw", "--optim.scheduler", "cosine"])


def test_trainer_clipping_and_callback_clipping_together_are_refused(cache, in_tmp, capsys):
    with pytest.raises(SystemExit):
        run_recipe(TINY, [*cheap_cell(cache), "--trainer.gradient_clip_val", "1.0"])
    assert "clip twice" in capsys.readouterr().err


def test_stability_callbacks_are_on_by_default_and_each_can_be_switched_off(cache, in_tmp):
    from lightning_optim.callbacks import GradientClipping, LayerNormMonitor, LossSpikeDetector, NonFiniteGuard

    wanted = (NonFiniteGuard, LossSpikeDetector, GradientClipping, LayerNormMonitor)
    cli = run_recipe(TINY, cheap_cell(cache))
    present = [type(cb) for cb in cli.trainer.callbacks]
    assert all(cls in present for cls in wanted)
    assert present.index(NonFiniteGuard) < present.index(GradientClipping)
    assert present.index(LossSpikeDetector) < present.index(GradientClipping)
    clip = next(cb for cb in cli.trainer.callbacks if isinstance(cb, GradientClipping))
    assert clip.max_norm == 1.0 and cli.trainer.gradient_clip_val is None  # the recipe's max_grad_norm
    off = ["--nonfinite.enabled", "false", "--spike.enabled", "false", "--clipping.enabled", "false",
           "--norms.enabled", "false"]
    cli = run_recipe(TINY, [*cheap_cell(cache), *off])
    assert not any(isinstance(cb, wanted) for cb in cli.trainer.callbacks)


def test_diverging_run_stops_with_an_error_and_keeps_only_finite_checkpoints(cache, in_tmp):
    proc = run_command(["python", "recipes/tiny.py", *size_override(cache, steps=20), "--trainer.accelerator", "cpu",
                        "--checkpoint.every_n_train_steps", "2", "--optim.lr", "1e30", "--optim.warmup_steps", "1",
                        "--data.val_every_n_steps", "1000",
                        "--trainer.enable_progress_bar", "false"], cwd=in_tmp, timeout=300)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "TrainingUnstableError: NonFiniteGuard" in proc.stderr, proc.stderr[-3000:]
    ckpts = sorted((in_tmp / "lightning_logs" / "llama-tiny").glob("version_*/checkpoints/*.ckpt"))
    assert ckpts, "no checkpoint was kept"
    for path in ckpts:
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path


def test_info_schedule_and_optimizer():
    from lightning_optim.cli import main as cli_main

    assert cli_main(["info", "wsd"]) == 0
    assert cli_main(["info", "muon"]) == 0


def test_print_config_shows_the_effective_settings(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_recipe(LLAMA124M, ["--optim.name", "lion", "--trainer.max_steps", "40", "--print_config"])
    assert exit_info.value.code == 0
    optim = yaml.safe_load(capsys.readouterr().out)["optim"]
    assert optim["name"] == "lion" and optim["lr"] == 1e-3 and optim["betas"] == [0.9, 0.99]
    assert optim["eps"] is None  # the recipe's AdamW eps does not leak into Lion
    assert optim["warmup_steps"] == 10 and optim["scheduler"] == "cosine"  # capped to a quarter of 40 steps


def test_qk_clip_is_off_by_default_and_clips_when_enabled(cache, in_tmp):
    from lightning_optim.callbacks import QKClip

    cli = run_recipe(TINY, cheap_cell(cache))
    assert not any(isinstance(cb, QKClip) for cb in cli.trainer.callbacks)
    # a threshold far below the tiny model's logits: every step clips some heads, and the run still trains
    cli = run_recipe(TINY, [*cheap_cell(cache), "--qk_clip.enabled", "true", "--qk_clip.threshold", "0.05"])
    clip = next(cb for cb in cli.trainer.callbacks if isinstance(cb, QKClip))
    assert clip.clipper.threshold == 0.05
    metrics = cli.trainer.callback_metrics
    assert float(metrics["train/qk_clipped_heads"]) > 0 and torch.isfinite(metrics["train/loss"])


def test_a_setting_a_callback_refuses_is_a_configuration_error(cache, in_tmp, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_recipe(TINY, [*cheap_cell(cache), "--spike.threshold", "-1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "threshold must be > 0" in err and "Traceback" not in err


def test_a_mup_base_width_the_model_cannot_take_is_refused_before_the_data_is_built(cache, in_tmp, capsys):
    from lightning_optim.data import datamodule

    built = []
    original = datamodule.TokenDataModule.setup
    datamodule.TokenDataModule.setup = lambda self, *a, **k: built.append(1) or original(self, *a, **k)
    try:
        with pytest.raises(SystemExit) as exit_info:  # tiny: 6 heads, and 64 is not a multiple of 6
            run_recipe(TINY, [*cheap_cell(cache), "--model.n_embd", "48", "--model.n_head", "6",
                                 "--optim.mup_base_width", "64"])
    finally:
        datamodule.TokenDataModule.setup = original
    assert exit_info.value.code == 2 and not built
    assert "mup_base_width=64 is not divisible by n_head=6" in capsys.readouterr().err
