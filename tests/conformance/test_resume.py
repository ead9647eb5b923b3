"""Guarantee 1 — resume exactness, and guarantee 2 (one process) — torch.distributed.checkpoint formats.

For every registered optimizer: 2k steps straight equal k steps → save → a fresh model, optimizer and
schedule → load → k steps, bit for bit on CPU (weights, optimizer state and the schedule's lr), through
  * ``state_dict`` → ``torch.save`` → ``torch.load(weights_only=True)`` → ``load_state_dict``, and
  * ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` / ``set_optimizer_state_dict`` with
    ``StateDictOptions(full_state_dict=True)`` and ``(full_state_dict=False)``, saved and loaded the same way.
"""

from __future__ import annotations

import pytest
import torch

import lightning_optim as lo
from lightning_optim.checkpoint import atomic_save, load_checkpoint

from ._helpers import build, diff_states, make_model, nonfinite_entries, params_of, train_steps

K = 3  # steps before and after the checkpoint
WARMUP = 2


def _setup(name: str):
    model = make_model(seed=0)
    opt = build(name, model)
    sched = lo.create_scheduler("cosine", opt, total_steps=2 * K, warmup_steps=WARMUP)
    return model, opt, sched


def _straight(name: str):
    model, opt, sched = _setup(name)
    train_steps(model, opt, sched, 0, 2 * K)
    return model, opt, sched


def _assert_same(name, ref, resumed, how):
    (m1, o1, s1), (m2, o2, s2) = ref, resumed
    problems = diff_states(params_of(m1), params_of(m2))
    problems += [f"optimizer state {p}" for p in diff_states(o1.state_dict(), o2.state_dict())]
    if s1.get_last_lr() != s2.get_last_lr():
        problems.append(f"scheduled lr {s1.get_last_lr()} vs {s2.get_last_lr()}")
    assert not problems, f"{name}: {2 * K} steps straight != {K} + {how} + {K} steps:\n  " + "\n  ".join(problems[:20])
    bad = nonfinite_entries(params_of(m1)) + nonfinite_entries(o1.state_dict())
    assert not bad, f"{name}: non-finite values after {2 * K} plain steps: {bad}"


def test_resume_exact_torch_save(optim_name, tmp_path):
    ref = _straight(optim_name)

    model, opt, sched = _setup(optim_name)
    train_steps(model, opt, sched, 0, K)
    path = tmp_path / "ckpt.pt"
    atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, path)
    # torch.load(weights_only=True) is the contract: state_dicts hold tensors and plain Python values only
    ckpt = torch.load(path, weights_only=True)
    assert diff_states(ckpt, load_checkpoint(path)) == []

    model2 = make_model(seed=123)  # different init: everything must come from the checkpoint
    model2.load_state_dict(ckpt["model"])
    opt2 = build(optim_name, model2)
    sched2 = lo.create_scheduler("cosine", opt2, total_steps=2 * K, warmup_steps=WARMUP)
    opt2.load_state_dict(ckpt["optimizer"])
    sched2.load_state_dict(ckpt["scheduler"])
    train_steps(model2, opt2, sched2, K, K)
    _assert_same(optim_name, ref, (model2, opt2, sched2), "torch.save/torch.load(weights_only=True)")


@pytest.mark.parametrize("full", [True, False], ids=["full", "sharded"])
def test_resume_exact_dcp_state_dict(optim_name, full, tmp_path):
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=full)
    ref = _straight(optim_name)

    model, opt, sched = _setup(optim_name)
    train_steps(model, opt, sched, 0, K)
    osd = get_optimizer_state_dict(model, opt, options=options)
    msd = get_model_state_dict(model, options=options)
    path = tmp_path / "dcp.pt"
    atomic_save({"model": msd, "optimizer": osd, "scheduler": sched.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)

    model2 = make_model(seed=123)
    opt2 = build(optim_name, model2)
    sched2 = lo.create_scheduler("cosine", opt2, total_steps=2 * K, warmup_steps=WARMUP)
    set_model_state_dict(model2, ckpt["model"], options=options)
    set_optimizer_state_dict(model2, opt2, ckpt["optimizer"], options=options)
    sched2.load_state_dict(ckpt["scheduler"])
    # the state dict read back from the fresh optimizer is the one that was saved
    again = get_optimizer_state_dict(model2, opt2, options=options)
    assert diff_states(again, osd) == [], f"{optim_name}: get(set(state)) != state"
    train_steps(model2, opt2, sched2, K, K)
    _assert_same(optim_name, ref, (model2, opt2, sched2), f"get/set_optimizer_state_dict(full_state_dict={full})")
