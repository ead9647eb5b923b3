"""The notebooks execute cleanly from a fresh checkout (nbclient, the repository's own kernel).

Each notebook keeps its budget tiny (a few dozen steps of a narrowed tiny preset), so each runs in about a
minute or less on two CPU cores once the small default-corpus tokenizer is cached.
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def test_the_notebooks_are_there_with_outputs() -> None:
    names = [p.name for p in NOTEBOOKS]
    for expected in ("01_quickstart.ipynb", "02_compare_optimizers.ipynb", "03_memory_budget.ipynb",
                     "04_schedules.ipynb", "05_mup.ipynb"):
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


def _markdown_outputs(path: Path) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    return [o["data"]["text/markdown"] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "text/markdown" in o.get("data", {})]


def test_mup_notebook_multipliers_are_the_current_rule() -> None:
    """05_mup's committed table of muP multipliers (tiny model, 2 layers, 4 heads, base width 64 -> 256) is what
    the current rule gives: a change to lightning_optim/mup.py must come with a re-executed notebook."""
    from lightning_optim import OptimConfig, routing_table
    from lightning_optim.models import LanguageModel

    table = next(t for t in _markdown_outputs(NOTEBOOK_DIR / "05_mup.ipynb") if "AdamW lr ×" in t)
    header, _, *lines = table.splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    committed = {}
    for line in lines:
        cells = dict(zip(columns, (c.strip() for c in line.strip("|").split("|"))))
        committed[cells["parameter"].strip("`")] = cells

    model = LanguageModel("tiny", arch="llama", optim=OptimConfig(name="adamw", total_steps=100, mup_base_width=64),
                          vocab_size=512, n_layer=2, n_embd=256, n_head=4, block_size=64).model
    roles = {info.name: info.role for _, info in model.mup_params()}
    for optimizer, column in (("adamw", "AdamW lr ×"), ("muon", "Muon lr ×")):
        rows = routing_table(model, optimizer=optimizer)
        assert sorted(r.name for r in rows) == sorted(committed), "05_mup.ipynb lists other parameters: re-execute it"
        for r in rows:
            cells = committed[r.name]
            assert cells["muP role"] == roles[r.name], (r.name, cells["muP role"], roles[r.name])
            assert float(cells[column]) == pytest.approx(r.lr_multiplier, rel=1e-3), (optimizer, r.name)
    for name, cells in committed.items():  # init std of the muP model: base std / sqrt(m_in) for hidden matrices
        if cells["init std muP"] != "ones":
            ratio = float(cells["init std muP"]) / float(cells["init std SP"])
            assert ratio == pytest.approx(float(cells["m_in"]) ** -0.5, rel=0.02), name
