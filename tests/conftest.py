"""Suite-wide settings.

``LIGHTNING_OPTIM_COMPILE=0``: the elementwise optimizers default to ``compiled="auto"``, which compiles a
kernel (~10 s each on CPU) the first time a tensor of >= 65,536 elements is updated. Most tests build small
models and never reach that size, but the ones that do would each pay for a compile; here ``"auto"`` means the
eager path. Tests that check the default (compiled) path clear the variable themselves
(``tests/conformance/test_default_path.py``, ``tests/test_optim_compiled.py``). A value already set in the
environment is kept (``LIGHTNING_OPTIM_COMPILE=1 pytest ...`` runs the default path everywhere).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("LIGHTNING_OPTIM_COMPILE", "0")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """A data cache (tokenizer, token shards) shared by the recipe runs of one test module."""
    return str(tmp_path_factory.mktemp("recipe_cache"))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run from a fresh folder, as a user would (recipes write lightning_logs/ under the working directory)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def one_rank_mesh(tmp_path):
    """A one-process gloo mesh: DTensor parameters without a second process."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``gpu`` are skipped, with the reason, where CUDA is not available."""
    import pytest
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
