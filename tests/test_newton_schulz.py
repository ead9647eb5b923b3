"""The shared Newton–Schulz kernel: orthogonality band, batching, tall transposition, coefficient tables."""

import pytest
import torch

from lightning_optim.optim.newton_schulz import JORDAN, POLAR_EXPRESS, newton_schulz, resolve_coefficients


def _reference_ns(G, table, scale=1.0, eps=1e-7):
    """Plain per-matrix rendition of the algorithm box (Keller Jordan's zeropower_via_newtonschulz5)."""
    X = G.bfloat16()
    tall = G.size(0) > G.size(1)
    if tall:
        X = X.T
    X = X / (X.norm() * scale + eps)
    for a, b, c in table:
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.T if tall else X


@pytest.mark.parametrize("shape", [(32, 96), (128, 48)])
def test_singular_values_in_band(shape):
    # rectangular Gaussian matrices are well conditioned; five steps bring every singular value into the band
    torch.manual_seed(0)
    G = torch.randn(*shape)
    s = torch.linalg.svdvals(newton_schulz(G, 5, "jordan").float())
    assert s.min() > 0.6 and s.max() < 1.25, s  # Jordan's quintic: roughly [0.7, 1.2]
    s_pe = torch.linalg.svdvals(newton_schulz(G, 5, "polar_express").float())
    assert s_pe.min() > 0.8 and s_pe.max() < 1.2, s_pe  # Polar Express: tighter band


def test_square_bulk_in_band():
    torch.manual_seed(0)
    s = torch.linalg.svdvals(newton_schulz(torch.randn(64, 64), 5, "jordan").float())
    assert (s > 0.6).float().mean() > 0.85 and s.max() < 1.25


def test_batched_equals_per_matrix_and_reference():
    torch.manual_seed(1)
    G = torch.randn(4, 48, 80)
    batched = newton_schulz(G, 5, "jordan")
    for i in range(4):
        single = newton_schulz(G[i], 5, "jordan")
        torch.testing.assert_close(batched[i].float(), single.float(), atol=4e-2, rtol=0)
        torch.testing.assert_close(single.float(), _reference_ns(G[i], [JORDAN] * 5).float(), atol=4e-2, rtol=0)
    pe = newton_schulz(G, 5, "polar_express")
    torch.testing.assert_close(pe[2].float(), _reference_ns(G[2], POLAR_EXPRESS, 1.02).float(), atol=4e-2, rtol=0)


def test_tall_is_transpose_of_wide():
    torch.manual_seed(2)
    G = torch.randn(96, 32)
    out = newton_schulz(G, 5)
    assert out.shape == (96, 32) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), newton_schulz(G.T.contiguous(), 5).T.float(), atol=1e-2, rtol=0)
    s = torch.linalg.svdvals(out.float())
    assert s.min() > 0.6 and s.max() < 1.25  # columns near-orthonormal


def test_coefficient_specs():
    assert resolve_coefficients("jordan", 3) == ((JORDAN,) * 3, 1.0)
    table, scale = resolve_coefficients("polar_express", 7)
    assert table[:5] == POLAR_EXPRESS and table[5] == POLAR_EXPRESS[-1] and scale == 1.02
    assert resolve_coefficients((1.0, 2.0, 3.0), 2)[0] == ((1.0, 2.0, 3.0),) * 2
    with pytest.raises(ValueError, match="ns_coefficients"):
        resolve_coefficients("cubic", 5)
    with pytest.raises(ValueError, match="ns_steps"):
        resolve_coefficients("jordan", 0)
    with pytest.raises(ValueError):
        newton_schulz(torch.randn(3), 5)
