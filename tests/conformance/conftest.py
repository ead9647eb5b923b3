"""Fixtures of the conformance suite: every registry entry, discovered when the tests are collected.

Any test taking ``optim_name`` runs once per ``lightning_optim.available_optimizers()`` entry, so an optimizer
registered later (a new module under ``lightning_optim/optim`` or a third-party entry point) is covered
without touching these files. ``LIGHTNING_OPTIM_CONFORMANCE=name1,name2`` narrows the run (debugging only).

An entry whose optional dependency is missing (``adamw8bit`` without bitsandbytes) is skipped with the
reason; any other construction error fails its tests.
"""

from __future__ import annotations

import pytest

from ._helpers import missing_dependency, registered_optimizers


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "optim_name" in metafunc.fixturenames:
        metafunc.parametrize("optim_name", registered_optimizers(), indirect=True)


@pytest.fixture
def optim_name(request: pytest.FixtureRequest) -> str:
    name = request.param
    reason = missing_dependency(name)
    if reason:
        pytest.skip(reason)
    return name


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add contention (25x slower on a loaded 2-core CI box)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
