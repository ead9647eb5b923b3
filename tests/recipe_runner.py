"""Run a recipe file the way a user does, in this process (no interpreter start-up per cell) or as a subprocess.

``run_recipe(path, args)`` executes ``recipes/<name>.py`` as ``__main__`` with ``sys.argv`` set, exactly as
``python recipes/<name>.py ARGS`` would, and returns the ``RecipeCLI`` it built. ``TINY`` is the size override
that makes any recipe a seconds-long run: a 1-layer, 32-wide model on a 300 kB slice of the default corpus with
a 512-token BPE (cached once per test session), 2 optimizer steps, no validation, no checkpoint files.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
RECIPE_FILES = sorted(p for p in RECIPES.glob("*.py") if not p.name.startswith("_"))
OPTIM_YAMLS = sorted((RECIPES / "configs" / "optim").glob("*.yaml"))
STRATEGY_YAMLS = sorted((RECIPES / "configs").glob("*.yaml"))

if str(RECIPES) not in sys.path:
    sys.path.insert(0, str(RECIPES))


def size_override(cache: str, steps: int = 2, global_batch: int = 4) -> list[str]:
    """Flags that shrink any recipe to a tiny model and a short run (the README commands take these too)."""
    return ["--model.n_layer", "1", "--model.n_embd", "32", "--model.n_head", "2", "--data.seq_len", "32",
            "--data.global_batch_size", str(global_batch), "--data.max_bytes", "300000",
            "--data.tokenizer", "bpe:512", "--data.tokenizer_train_bytes", "300000", "--data.cache_dir", cache,
            "--data.show_progress", "false", "--data.val_sequences", "4", "--trainer.max_steps", str(steps),
            "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0"]


def cheap_cell(cache: str) -> list[str]:
    """``size_override`` plus: a 512-row vocabulary, one CPU process, no logger, no checkpoint files, no progress bar,
    no validation."""
    return [*size_override(cache), "--model.vocab_size", "512", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--checkpoint.save_top_k", "0", "--checkpoint.save_last", "false", "--data.val_every_n_steps", "1000"]


def run_recipe(path: Path, args: list[str]) -> Any:
    """``python <path> <args>`` in this process; returns the ``RecipeCLI``. ``SystemExit`` propagates."""
    import _cli

    built: list[Any] = []
    original = _cli.main

    def recording_main(*a: Any, **kw: Any) -> Any:
        cli = original(*a, **kw)
        built.append(cli)
        return cli

    _cli.main = recording_main
    argv = sys.argv
    sys.argv = [str(path), *args]
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        _cli.main = original
        sys.argv = argv
    assert built, f"{path.name} did not call _cli.main"
    return built[0]


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT),
            "TOKENIZERS_PARALLELISM": "false"}


def run_command(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """A command line as a user types it (``python recipes/x.py ...``), from ``cwd``."""
    if argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    argv = [str(ROOT / a) if a.startswith("recipes/") else a for a in argv]
    return subprocess.run(argv, capture_output=True, text=True, env=env(), timeout=timeout, cwd=cwd)
