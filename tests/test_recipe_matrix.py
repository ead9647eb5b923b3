"""The recipe matrix, generated from the files: every recipe × every optimizer YAML, every recipe × every
registered optimizer by ``--optim.name``, every strategy YAML. A new recipe, YAML or registry entry is a new cell
without touching this file. Each cell runs the recipe file as a user does (``python recipes/<r>.py ...``, here
in-process) with only the tiny size override, for 2 optimizer steps, and checks that the optimizer got the
settings the layering promises: registry defaults, the recipe's own values only for the optimizer they were
written for, then the YAML, then flags.
"""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from lightning_optim import available_optimizers, create_optimizer
from lightning_optim.registry import get_optimizer_spec, normalize_name
from tests.recipe_runner import OPTIM_YAMLS, RECIPE_FILES, STRATEGY_YAMLS, cheap_cell, run_recipe, run_command

TORCH_FIELDS = ("lr", "betas", "eps", "weight_decay", "momentum", "nesterov")


def _needs(key: str) -> None:
    try:  # an optional dependency (bitsandbytes for adamw8bit) may be absent: skip with the reason
        create_optimizer(key, [torch.nn.Parameter(torch.zeros(2, 2))])
    except ImportError as err:
        pytest.skip(f"{key}: optional dependency missing ({err})")


def _recipe_of(cli):
    return cli.recipe


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-12)
    return a == b


def _check_trained(cli, steps: int = 2) -> None:
    assert cli.trainer.global_step == steps
    weights = list(cli.model.parameters())
    assert all(torch.isfinite(w).all() for w in weights)


def _check_effective(cli, name: str, explicit: dict) -> None:
    """Every hyperparameter of the effective config is the explicit value, else the recipe's (for its own
    optimizer only), else the registry default; nothing else leaked in."""
    config = cli.model.optim_config()
    spec = get_optimizer_spec(name)
    recipe = _recipe_of(cli)
    own = normalize_name(name) == normalize_name(recipe["optimizer"])
    extra_explicit = dict(explicit.get("extra") or {})
    for field in TORCH_FIELDS:
        got = getattr(config, field)
        if got is None and field in config.extra:  # a default that is not OptimConfig's type (Adafactor's eps pair)
            got = config.extra[field]
        if field in explicit:
            want = explicit[field]
        elif own and field in recipe["optimizer_settings"]:
            want = recipe["optimizer_settings"][field]
        else:
            want = spec.defaults.get(field)
        assert _same(got, want), f"{name}: {field} is {got!r}, expected {want!r}"
    for key, want in extra_explicit.items():
        got = config.extra.get(key)
        if key == "warmup_steps" and spec.schedule_free:  # capped to the 2-step horizon
            assert got <= want
            continue
        assert _same(got, want), f"{name}: extra.{key} is {got!r}, expected {want!r}"
    assert set(config.extra) <= set(spec.defaults) or spec.accepts_extra
    if "scheduler" in explicit:
        assert config.scheduler == explicit["scheduler"]
    elif spec.schedule_free:
        assert config.scheduler == "constant"
    # the schedule's warmup was capped to fit the 2-step run (the recipe's and the YAMLs' warmups are 20-2000)
    assert cli.trainer.lr_scheduler_configs[0].scheduler.schedule.warmup_steps == 0


@pytest.mark.parametrize("recipe", RECIPE_FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("optim_yaml", OPTIM_YAMLS, ids=lambda p: p.stem)
def test_every_recipe_runs_every_optimizer_yaml(recipe, optim_yaml, cache, in_tmp):
    section = yaml.safe_load(optim_yaml.read_text())["optim"]
    assert normalize_name(section["name"]) in available_optimizers(), f"{optim_yaml.name} names an unregistered optimizer"
    _needs(section["name"])
    cli = run_recipe(recipe, ["--config", str(optim_yaml), *cheap_cell(cache)])
    _check_trained(cli)
    _check_effective(cli, section["name"], section)


@pytest.mark.parametrize("recipe", RECIPE_FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("key", available_optimizers())
def test_every_recipe_runs_every_registered_optimizer_by_name(recipe, key, cache, in_tmp):
    _needs(key)
    cli = run_recipe(recipe, ["--optim.name", key, *cheap_cell(cache)])
    _check_trained(cli)
    _check_effective(cli, key, {})


def test_every_registered_optimizer_has_a_yaml():
    names = {normalize_name(yaml.safe_load(p.read_text())["optim"]["name"]) for p in OPTIM_YAMLS}
    assert set(available_optimizers()) - names == set(), "registered optimizers without recipes/configs/optim/*.yaml"


def test_explicit_setting_the_optimizer_does_not_take_is_refused_naming_it(cache, in_tmp, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_recipe(RECIPE_FILES[0], ["--optim.name", "muon", "--optim.betas", "[0.9, 0.95]", *cheap_cell(cache)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'betas'" in err and "muon" in err


@pytest.mark.parametrize("strategy", [p for p in STRATEGY_YAMLS], ids=lambda p: p.stem)
def test_every_strategy_yaml_one_process(strategy, cache, in_tmp):
    """Each strategy YAML parses; on CPU, one that needs CUDA stops before launching with its message."""
    data = yaml.safe_load(strategy.read_text())
    needs_cuda = data["trainer"].get("accelerator") == "cuda"
    args = ["--config", str(strategy), *cheap_cell(cache)]
    if needs_cuda and not torch.cuda.is_available():
        proc = run_command(["python", "recipes/tiny.py", *args], cwd=in_tmp, timeout=240)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert proc.stderr.count("needs CUDA") == 1, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        assert "Initializing distributed" not in proc.stderr + proc.stdout  # nothing was launched
        return
    cli = run_recipe(RECIPE_FILES[0], args)
    _check_trained(cli)
