"""Recipes: --help, a command-line run, exact resume, 2-process DDP / FSDP2 on CPU (the YAML × optimizer matrix is
in test_recipe_matrix.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.recipe_runner import STRATEGY_YAMLS

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
sys.path.insert(0, str(RECIPES))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "lo_cache")


def small(cache):
    return ["--model.n_layer", "1", "--model.n_embd", "32", "--model.n_head", "2", "--data.seq_len", "32",
            "--data.global_batch_size", "4", "--data.max_bytes", "300000", "--data.tokenizer", "bpe:512",
            "--data.tokenizer_train_bytes", "300000", "--data.cache_dir", cache, "--data.show_progress", "false",
            "--data.val_every_n_steps", "3", "--data.val_sequences", "4", "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.num_sanity_val_steps", "0", "--optim.warmup_steps", "2", "--optim.total_steps", "6",
            "--checkpoint.every_n_train_steps", "3", "--throughput.log_every_n_steps", "2"]


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT),
            "TOKENIZERS_PARALLELISM": "false"}


def _scalars(log_dir, tag="train/loss"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(log_dir))
    ea.Reload()
    return {e.step: e.value for e in ea.Scalars(tag)}


def test_help_shows_devices_and_optimizer_options():
    out = subprocess.run([sys.executable, str(RECIPES / "gpt124m.py"), "--help"], capture_output=True, text=True,
                         env=_env(), timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    for flag in ("--trainer.devices", "--optim.name", "--optim.lr", "--optim.scheduler", "--optim.extra",
                 "--ckpt_path", "--data.global_batch_size", "--checkpoint.every_n_train_steps"):
        assert flag in out.stdout, flag


def test_command_line_run_and_exact_resume(tmp_path, cache):
    # uninterrupted run of 6 steps, from the command line
    proc = subprocess.run([sys.executable, str(RECIPES / "tiny.py"), *small(cache), "--trainer.max_steps", "6"],
                          capture_output=True, text=True, env=_env(), timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    full_dir = tmp_path / "lightning_logs" / "llama-tiny" / "version_0"
    full = _scalars(full_dir)
    assert sorted(full) == list(range(6))
    assert (full_dir / "checkpoints" / "last.ckpt").exists()
    assert (full_dir / "checkpoints" / "step0000003.ckpt").exists()
    assert _scalars(full_dir, "throughput/tokens_per_sec")
    assert _scalars(full_dir, "val/loss")
    # stop at step 3, resume with --ckpt_path (in-process: same code path, faster)
    from _cli import main

    os.chdir(tmp_path)
    first = main("tiny", args=[*small(cache), "--trainer.max_steps", "3"])
    ckpt = Path(first.trainer.logger.log_dir) / "checkpoints" / "last.ckpt"
    resumed = main("tiny", args=[*small(cache), "--trainer.max_steps", "6", "--ckpt_path", str(ckpt)])
    part1, part2 = _scalars(first.trainer.logger.log_dir), _scalars(resumed.trainer.logger.log_dir)
    assert sorted(part2) == [3, 4, 5]
    for step in range(6):
        got = part1[step] if step < 3 else part2[step]
        assert got == pytest.approx(full[step], abs=1e-6), step


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [p.stem for p in STRATEGY_YAMLS])
def test_two_process_cpu_matches_one_process(tmp_path, cache, strategy):
    config = yaml.safe_load((RECIPES / "configs" / f"{strategy}.yaml").read_text())
    if config["trainer"].get("accelerator") == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip(f"{strategy}.yaml needs 2 CUDA GPUs (on CPU it must stop before launching: test_recipe_matrix)")
    from tests.dist_utils import run_distributed

    args = [*small(cache), "--trainer.max_steps", "3", "--optim.lr", "0.01"]
    # one process builds the cache first, so the two ranks only read it
    from _cli import main

    os.chdir(tmp_path)
    ref = main("tiny", args=[*args, "--trainer.devices", "1", "--trainer.accelerator", "cpu"])
    ref_state = {k: v.detach().clone() for k, v in ref.model.model.state_dict().items()}
    run_distributed(ROOT / "tests" / "dist_scripts" / "recipe_train.py", str(tmp_path),
                    str(RECIPES / "configs" / f"{strategy}.yaml"), *args, env={"HF_HUB_OFFLINE": "1"}, timeout=300, out_dir=tmp_path)
    out = torch.load(tmp_path / "final.pt", weights_only=True)
    assert out["step"] == 3 and out["micro"] == 2 and out["accumulate"] == 1
    for name, value in ref_state.items():
        torch.testing.assert_close(out["state"][name], value, atol=2e-5, rtol=1e-4, msg=name)


