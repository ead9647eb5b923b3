"""Step-time cases for the Muon family on the 23M GPT shape (6 layers, width 512, vocab 8192).

``CASES``: one record per measured optimizer, consumed by ``benchmarks/step_time.py`` (which discovers
``benchmarks/cases_*.py``). Each record: ``name`` (row label), ``family``, ``ours`` (True for lightning-optim,
False for a peer), ``build(model) -> optimizer``, ``note``. Peers get what they support (torch.optim.Muon:
the matrix parameters only, as the issue's 478 ms figure). ``python benchmarks/cases_matrix_muon.py`` runs the
cases stand-alone (2 threads, gradients fixed, optimizer.step() timed) and writes
``benchmarks/results/step_time_matrix_muon.md``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_optim import create_optimizer, param_groups  # noqa: E402


def _matrices(model):
    return [p for g in param_groups(model, split_matrices=True) if g["matrix"] for p in g["params"]]


def _ours(name, matrices_only=False, **hp):
    def build(model):
        if matrices_only:
            return create_optimizer(name, [{"params": _matrices(model), "matrix": True, "name": "matrix"}], **hp)
        return create_optimizer(name, model, **hp)
    return build


def _heavyball_muon(model):
    import heavyball

    return heavyball.Muon(_matrices(model), lr=0.01)


CASES = [
    {"name": "muon (matrices only)", "family": "matrix", "ours": True, "build": _ours("muon", matrices_only=True),
     "note": "same parameters as torch.optim.Muon"},
    {"name": "muon (hybrid, whole model)", "family": "matrix", "ours": True, "build": _ours("muon"), "note": ""},
    {"name": "d-muon", "family": "matrix", "ours": True, "build": _ours("d-muon"), "note": ""},
    {"name": "normuon", "family": "matrix", "ours": True, "build": _ours("normuon"), "note": ""},
    {"name": "sf-normuon", "family": "matrix", "ours": True, "build": _ours("sf-normuon"), "note": ""},
    {"name": "muon polar_express (matrices only)", "family": "matrix", "ours": True,
     "build": _ours("muon", matrices_only=True, ns_coefficients="polar_express"), "note": ""},
    {"name": "torch.optim.Muon (matrices only)", "family": "matrix", "ours": False,
     "build": lambda m: torch.optim.Muon(_matrices(m), lr=0.01, weight_decay=0.0), "note": "peer"},
    {"name": "heavyball Muon (matrices only)", "family": "matrix", "ours": False, "build": _heavyball_muon,
     "note": "peer (needs the bench extra)"},
]


def _model():
    from lightning_optim.models.gpt import ModelConfig, Transformer

    torch.manual_seed(0)
    return Transformer(ModelConfig(n_layer=6, n_embd=512, n_head=8, vocab_size=8192, block_size=256, arch="llama"))


def main(warmup: int = 2, iters: int = 5) -> str:
    torch.set_num_threads(2)
    rows = ["| optimizer | ms / step (median) | vs torch.optim.Muon |", "|---|---|---|"]
    times = {}
    for case in CASES:
        model = _model()
        try:
            opt = case["build"](model)
        except Exception as err:  # noqa: BLE001 (a missing peer is reported, not fatal)
            times[case["name"]] = None
            rows.append(f"| {case['name']} | unavailable: {type(err).__name__} | |")
            continue
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        ts = []
        for i in range(warmup + iters):
            t = time.perf_counter()
            opt.step()
            ts.append(time.perf_counter() - t)
        times[case["name"]] = sorted(ts[warmup:])[iters // 2]
    ref = times.get("torch.optim.Muon (matrices only)")
    rows = rows[:2] + [
        f"| {n} | {t * 1e3:.0f} | {t / ref:.2f}× |" if t and ref else f"| {n} | {'—' if t is None else f'{t * 1e3:.0f}'} | |"
        for n, t in times.items()]
    text = ("Step time of `optimizer.step()` on the 23M GPT shape (6×512, vocab 8192, Llama-style), "
            f"{torch.get_num_threads()} CPU threads, median of {iters} after {warmup} warm-up steps.\n\n" + "\n".join(rows) + "\n")
    out = Path(__file__).parent / "results" / "step_time_matrix_muon.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    return text


if __name__ == "__main__":
    print(main())
