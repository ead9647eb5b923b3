"""Low-precision optimizer state: ``state_dtype="bfloat16"`` with stochastic rounding on every write.

An optimizer state tensor (a momentum, a second moment) kept in bfloat16 halves its memory, but writing an EMA
back with round-to-nearest loses every increment smaller than half a bf16 ulp (``2^-9`` relative): with
β2 = 0.999 the update ``(1-β2)·(g² - v)`` is below that threshold for most entries and ``v`` stops moving.
Stochastic rounding (SR) rounds up with probability equal to the discarded fraction, so the stored value is
unbiased, ``E[SR(x)] = x``, and small increments survive on average.

The update itself is computed in float32 (state read as ``t.float()``); only the store rounds. For a float32
``x`` with bit pattern ``b``, bfloat16 keeps the upper 16 bits, so (as in torchao's ``_fp32_to_bf16_sr``, the
idea written afresh here)::

    SR(x) = bits_to_float((b + r) & 0xFFFF0000),   r uniform in [0, 2^16)

adds a uniform 16-bit integer below the kept mantissa and truncates: the kept part is incremented exactly when
``r`` reaches past the discarded fraction, i.e. with probability (discarded bits)/2^16. The pattern is
sign-magnitude, so the same addition rounds negative numbers away from zero with the same probability, and
the result is unbiased for either sign. Infinities stay infinite; NaN stays NaN.

Random bits: not torch's global RNG but a counter-based hash of (element index, seed), so the rounding is a
pure function of the seed — eager and ``torch.compile``d kernels round identically, and a resumed run
continues bit for bit without saving RNG state. The seed of each tensor mixes the optimizer's SR step count
(``group["sr_step"]``, saved in the state dict), the group index, the tensor's position and the state slot.
The element hash is Chris Wellons' two-round multiply–xorshift ("lowbias32" shape), with 31-bit multipliers so
every product fits in int64.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "STATE_DTYPE_CHOICES",
    "check_state_dtype",
    "state_torch_dtype",
    "sr_bf16",
    "sr_copy_",
    "store",
    "up",
    "mix_seed",
    "seed_tensor",
    "SR_SLOT_STRIDE",
]

_M32 = 0xFFFFFFFF
#: the seed of state slot ``k`` of a tensor is ``seed + k·SR_SLOT_STRIDE`` (on both paths, so they round alike)
SR_SLOT_STRIDE = 0x3C6EF372
_ALIASES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "torch.bfloat16": "bfloat16"}
STATE_DTYPE_CHOICES = ("None (the parameter's dtype)", "'bfloat16' (alias 'bf16')")
#: eager stochastic rounding works on slices of this many elements (bounds the int64 temporaries)
_SR_SLICE = 1 << 22


def check_state_dtype(value: Any, where: str = "state_dtype") -> str | None:
    """``None`` or ``"bfloat16"``; anything else raises ``ValueError`` naming ``where``."""
    if value is None:
        return None
    if value is torch.bfloat16:
        return "bfloat16"
    if isinstance(value, str) and value.strip().lower() in _ALIASES:
        return "bfloat16"
    raise ValueError(f"{where} must be one of {', '.join(STATE_DTYPE_CHOICES)}, got {value!r}")


def state_torch_dtype(value: str | None) -> torch.dtype | None:
    return None if value is None else torch.bfloat16


def mix_seed(*parts: int) -> int:
    """A 31-bit seed from integers (host side, exact): each part is folded in and mixed."""
    h = 0x243F6A88
    for x in parts:
        h = (h ^ (int(x) & _M32)) & _M32
        h = (h * 0x7FEB352D) & _M32
        h ^= h >> 15
        h = (h * 0x5BD1E995) & _M32
        h ^= h >> 16
    return h & 0x7FFFFFFF


def seed_tensor(seeds: list[int], device: torch.device) -> torch.Tensor:
    """Seeds as one int64 tensor on ``device`` (one host-to-device copy per bucket); index it per tensor."""
    return torch.tensor(seeds, dtype=torch.int64).to(device, non_blocking=True)


def _random_bits(n: int, offset: int, seed: torch.Tensor | int, device: torch.device) -> torch.Tensor:
    """16 uniform bits per element ``offset .. offset+n-1``: a hash of (index + seed), int64."""
    x = torch.arange(offset, offset + n, device=device, dtype=torch.int64)
    x = (x + seed) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    x = x ^ (x >> 16)
    return x & 0xFFFF


def sr_bf16(x: torch.Tensor, seed: torch.Tensor | int, offset: int = 0) -> torch.Tensor:
    """``x`` (float32, or float64 rounded to float32 first) stochastically rounded to bfloat16, elementwise.

    ``seed`` is an int (or a 0-d int64 tensor, so a compiled kernel takes it as data); ``offset`` is the flat
    index of ``x``'s first element in the tensor it belongs to (eager slicing)."""
    x32 = x.reshape(-1).to(torch.float32)
    bits = _random_bits(x32.numel(), offset, seed, x32.device)
    b = x32.view(torch.int32).to(torch.int64) + bits
    b = (b & -65536).to(torch.int32)  # truncate the 16 low bits (sign-extended mask keeps the high ones)
    y = b.view(torch.float32)
    y = torch.where(torch.isnan(x32), x32, y)  # a NaN's payload must not carry into the sign bit
    return y.to(torch.bfloat16).view(x.shape)


def sr_copy_(dst: torch.Tensor, src: torch.Tensor, seed: int) -> None:
    """``dst`` (bfloat16) ← SR(``src``), eagerly, in slices so the int64 temporaries stay small."""
    if not dst.is_contiguous() or not src.is_contiguous() or dst.numel() <= _SR_SLICE:
        dst.copy_(sr_bf16(src, seed))
        return
    d, s = dst.view(-1), src.reshape(-1)
    for start in range(0, d.numel(), _SR_SLICE):
        stop = min(start + _SR_SLICE, d.numel())
        d[start:stop].copy_(sr_bf16(s[start:stop], seed, offset=start))


def up(t: torch.Tensor) -> torch.Tensor:
    """A low-precision (bf16/fp16) tensor read as float32 for the update; others as they are."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def store(dst: torch.Tensor, value: torch.Tensor, seed: torch.Tensor | None, slot: int = 0) -> None:
    """Write an updated state (slot ``slot`` of the kernel's states): stochastic rounding when ``seed`` is
    given and ``dst`` is bfloat16 (the group asked for ``state_dtype="bfloat16"``), a plain copy (round to
    nearest) otherwise."""
    if seed is not None and dst.dtype == torch.bfloat16:
        dst.copy_(sr_bf16(value, seed + slot * SR_SLOT_STRIDE))
    else:
        dst.copy_(value)
