"""The one Newton–Schulz kernel every orthogonalising optimizer (Muon, D-Muon, NorMuon, SF-NorMuon) shares.

``newton_schulz(G, ns_steps, ns_coefficients)`` approximates the polar factor ``U·Vᵀ`` of ``G = U·S·Vᵀ``
for one matrix ``(m, n)`` or a stack ``(B, m, n)`` of same-shape matrices, in bfloat16::

    X = G.bfloat16();  transpose if m > n (so X·Xᵀ is the small Gram matrix)
    X /= ‖X‖_F·s + 1e-7                       (s = 1 for Jordan, 1.02 for Polar Express; per matrix)
    repeat ns_steps times with (a, b, c) of that iteration:
        A = X·Xᵀ;  B = b·A + c·A·A;  X = a·X + B·X
    transpose back

Coefficients (``ns_coefficients``):

* ``"jordan"`` — Keller Jordan's quintic (3.4445, -4.7750, 2.0315), the same triple every iteration
  (github.com/KellerJordan/Muon; torch.optim.Muon). The result has singular values in roughly [0.7, 1.2].
* ``"polar_express"`` — Amsel et al. 2025 (arXiv 2505.16932): one triple per iteration, the 5-step table
  of microsoft/dion and modded-nanogpt; more steps repeat the last triple. Normalises by ‖X‖_F·1.02.
* an explicit triple ``(a, b, c)`` (repeated) or a sequence of ``ns_steps`` triples.

The stack is processed with batched matmuls (``torch.baddbmm``), so a model's same-shape matrices cost one
kernel launch per matmul instead of one per matrix.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

__all__ = ["JORDAN", "POLAR_EXPRESS", "resolve_coefficients", "newton_schulz", "ns_flops"]

JORDAN: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)

POLAR_EXPRESS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

EPS = 1e-7

Coefficients = Union[str, Sequence[float], Sequence[Sequence[float]]]


def resolve_coefficients(ns_coefficients: Coefficients, ns_steps: int) -> tuple[tuple[tuple[float, float, float], ...], float]:
    """``(per-iteration triples, normalisation scale)`` for a coefficient spec; raises ``ValueError`` if malformed."""
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or not 1 <= ns_steps < 100:
        raise ValueError(f"ns_steps must be an integer in [1, 100), got {ns_steps!r}")
    if isinstance(ns_coefficients, str):
        key = ns_coefficients.strip().lower().replace("-", "_")
        if key in ("jordan", "keller_jordan", "quintic", "muon"):
            return (JORDAN,) * ns_steps, 1.0
        if key in ("polar_express", "polarexpress", "polar"):
            table = POLAR_EXPRESS[:ns_steps] + (POLAR_EXPRESS[-1],) * max(0, ns_steps - len(POLAR_EXPRESS))
            return table, 1.02
        raise ValueError(f"ns_coefficients must be 'jordan', 'polar_express' or numbers, got {ns_coefficients!r}")
    try:
        seq = list(ns_coefficients)
    except TypeError:
        raise ValueError(f"ns_coefficients must be a name, a triple or a list of triples, got {ns_coefficients!r}")
    if len(seq) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in seq):
        return (tuple(float(x) for x in seq),) * ns_steps, 1.0  # type: ignore[return-value]
    triples = []
    for t in seq:
        t = list(t) if not isinstance(t, (int, float)) else [t]
        if len(t) != 3:
            raise ValueError(f"ns_coefficients: each entry must be an (a, b, c) triple, got {t!r}")
        triples.append(tuple(float(x) for x in t))
    if len(triples) != ns_steps:
        raise ValueError(f"ns_coefficients lists {len(triples)} triples but ns_steps={ns_steps}")
    return tuple(triples), 1.0  # type: ignore[return-value]


@torch.no_grad()
def newton_schulz(
    G: Tensor,
    ns_steps: int = 5,
    ns_coefficients: Coefficients = "jordan",
    eps: float = EPS,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Orthogonalise ``G`` (``(m, n)`` or ``(B, m, n)``); returns a tensor of ``dtype`` (bf16) and ``G``'s shape."""
    if G.ndim not in (2, 3):
        raise ValueError(f"newton_schulz takes a matrix (m, n) or a stack (B, m, n), got shape {tuple(G.shape)}")
    table, scale = resolve_coefficients(ns_coefficients, ns_steps)
    single = G.ndim == 2
    X = G.to(dtype)
    if single:
        X = X.unsqueeze(0)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X.contiguous()
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    if scale != 1.0:
        norm = norm * scale
    X = X / (norm + eps)
    for a, b, c in table:
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    if tall:
        X = X.mT
    return X[0] if single else X


def ns_flops(m: int, n: int, ns_steps: int = 5) -> int:
    """Multiply-adds of one Newton–Schulz run on an ``m×n`` matrix (used to balance work across ranks)."""
    small, large = min(m, n), max(m, n)
    return ns_steps * (2 * small * small * large + small ** 3)
