"""The notebooks execute cleanly from a fresh checkout (nbclient, the repository's own kernel).

Each notebook keeps its budget tiny (a few dozen steps of a narrowed tiny preset), so all four run in well
under a minute on two CPU cores once the small default-corpus tokenizer is cached.
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_four_notebooks_are_there_with_outputs() -> None:
    names = [p.name for p in NOTEBOOKS]
    for expected in ("01_quickstart.ipynb", "02_compare_optimizers.ipynb", "03_memory_budget.ipynb",
                     "04_schedules.ipynb"):
        assert expected in names
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(c.get("outputs") for c in code), f"{path.name} is committed without outputs"
        assert not any(o.get("output_type") == "error" for c in code for o in c["outputs"]), path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError with the failing cell and its traceback
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
