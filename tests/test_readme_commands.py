"""Every command the README tells people to type runs here, as a user types it (a subprocess from a fresh
folder), read from the README itself so a new command is covered without touching this file.

Recipe commands (``python recipes/<r>.py ...``: tiny.py, gpt124m.py, llama124m.py and the rest) get the size
override of :func:`tests.recipe_runner.size_override` (a 1-layer, 32-wide model, a few steps) appended; a command
that sets ``--trainer.max_steps`` keeps its own. They run in README order in one folder, as a user would, so
``--ckpt_path last`` finds what the commands before it wrote (it is given two more steps than the newest
checkpoint holds). On a machine without CUDA a command documented as "CUDA only" must stop with its message and
exit status 2 before launching anything. ``lightning-optim ...`` lines run as written.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from tests.recipe_runner import ROOT, run_command, size_override

README = (ROOT / "README.md").read_text()


def _commands(prefix: str) -> list[str]:
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():  # join continuation lines
            if line.startswith(prefix):
                lines.append(line)
    return lines


RECIPE_COMMANDS = _commands("python recipes/")
CLI_COMMANDS = _commands("lightning-optim ")
EXAMPLE_COMMANDS = _commands("python examples/")


def _argv(line: str) -> tuple[list[str], str]:
    command, _, comment = line.partition("#")
    return shlex.split(command), comment


def _newest_step(folder: Path, name: str) -> int:
    steps = [int(m.group(1)) for p in (folder / "lightning_logs" / name).glob("version_*/checkpoints/step*.ckpt")
             if (m := re.search(r"step(\d+)", p.name))]
    return max(steps)


def test_readme_lists_recipe_and_cli_commands():
    assert len(RECIPE_COMMANDS) >= 8 and any("--ckpt_path last" in c for c in RECIPE_COMMANDS)
    assert len(CLI_COMMANDS) >= 4


def test_every_readme_recipe_command_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme_user")
    cache = str(tmp_path_factory.mktemp("readme_cache"))
    ran = []
    for line in RECIPE_COMMANDS:
        argv, comment = _argv(line)
        recipe = Path(argv[1]).stem
        extra = size_override(cache, steps=2, global_batch=8)
        if "--trainer.max_steps" in argv:
            i = extra.index("--trainer.max_steps")
            del extra[i:i + 2]
        extra += ["--checkpoint.every_n_train_steps", "1"]
        name = {"tiny": "llama-tiny"}.get(recipe, recipe)
        if "--ckpt_path" in argv and argv[argv.index("--ckpt_path") + 1] == "last":
            i = extra.index("--trainer.max_steps")
            extra[i + 1] = str(_newest_step(folder, name) + 2)
        if "--help" in argv:
            extra = []
        proc = run_command([*argv, *extra], cwd=folder, timeout=420)
        out = proc.stdout + proc.stderr
        if "CUDA only" in comment and not torch.cuda.is_available():
            assert proc.returncode == 2, (line, out[-3000:])
            assert proc.stderr.count("needs CUDA") == 1 and "Traceback" not in proc.stderr, (line, out[-3000:])
            ran.append(line)
            continue
        assert proc.returncode == 0, (line, out[-4000:])
        if "--help" in argv:
            for flag in ("--trainer.devices", "--optim.name", "--ckpt_path", "--data.global_batch_size",
                         "--nonfinite.enabled", "--clipping.max_norm", "--max_warmup_fraction"):
                assert flag in proc.stdout, flag
        else:
            assert "`Trainer.fit` stopped" in out, (line, out[-3000:])
            assert "run:\n  devices" in out, (line, out[-3000:])
        if "--trainer.devices 8" in line:
            assert "8 processes on a machine with" in out or torch.cuda.device_count() >= 8
        if "--ckpt_path last" in line:
            assert "resuming from" in out, out[-3000:]
        ran.append(line)
    assert ran == RECIPE_COMMANDS


@pytest.mark.parametrize("line", EXAMPLE_COMMANDS)
def test_every_readme_example_command_runs(line, tmp_path):
    argv, _ = _argv(line)
    proc = run_command([*argv[:1], str(ROOT / argv[1]), *argv[2:]], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "`Trainer.fit` stopped" in proc.stdout + proc.stderr


@pytest.mark.parametrize("line", CLI_COMMANDS)
def test_every_readme_cli_command_runs(line, tmp_path):
    argv, _ = _argv(line)
    if argv[1] == "compare-runs":  # give it a run to read: a few logged steps, as a recipe writes them
        from torch.utils.tensorboard import SummaryWriter

        for folder in (a for a in argv[2:] if not a.startswith("-")):
            writer = SummaryWriter(str(tmp_path / folder / "version_0"))
            for step in range(5):
                writer.add_scalar("train/loss", 6.0 - 0.1 * step, step)
            writer.close()
    proc = run_command(["python", "-m", "lightning_optim.cli", *argv[1:]], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()
