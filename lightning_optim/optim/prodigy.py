"""Prodigy (Mishchenko & Defazio 2023, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner",
arXiv 2306.06101): Adam whose step size ``d`` is estimated on the fly; ``lr`` stays near 1::

    dlr = d·lr·bc                       (bc = sqrt(1-β2^t)/(1-β1^t) with use_bias_correction)
    num = β3·num + (d/d0)·dlr·Σ<g, p0 - p>;     s = β3·s + (d/d0)·dlr·g
    d̂ = d_coef·num / Σ‖s‖₁;   while d == d0: d = max(d, d̂);   d_max = max(d_max, d̂);   d = min(d_max, d·growth_rate)
    m = β1·m + d(1-β1)·g;   v = β2·v + d²(1-β2)·g²
    p -= wd·dlr·p;   p -= dlr·m/(sqrt(v) + d·eps)

``cautious=True`` (Liang et al. 2024, arXiv 2411.16085): the applied ``m`` is masked where it disagrees with the
gradient ``g`` (with the L2 term under ``decouple=False``) and rescaled, ``m ⊙ 1[m ⊙ g > 0] / max(mean(1[m ⊙ g > 0]),
1e-3)``, as C-AdamW masks its first moment; the state, the weight decay and the ``d`` estimate (its sums use ``g``,
``s`` and ``p0``, not the update) are not masked (:mod:`lightning_optim.optim._cautious`).

``β3 = sqrt(β2)`` unless given. State 4×P (``s``, ``p0``, ``exp_avg``, ``exp_avg_sq``); ``d``, ``d_max``,
``d_numerator`` live in every group (as in prodigyopt) as 0-d float64 device tensors.

Speed and distribution: the sums run on the device (no ``.item()``: prodigyopt syncs twice per parameter);
under FSDP2 (DTensor shards) the two sums are stacked and all-reduced once per step across the shards.
Under DDP the parameters are replicated and need no reduction.

Defaults (best 124M settings of Semenov et al. 2025): lr 1.0, betas (0.9, 0.999), bias correction on
(needed for stability), eps 1e-8, weight decay 0.1 (decoupled), d0 1e-6, d_coef 1, growth_rate inf.

Differences from prodigyopt: groups may have different lr (each group's dlr uses its own lr; prodigyopt
requires all equal or 0; with equal lr the two agree); when every gradient is zero (Σ‖s‖₁ = 0) prodigyopt
returns before updating the parameters, here ``d`` is kept and the step proceeds (the update is then the
decayed momentum). ``slice_p`` is not offered (the full sums are cheap on the device).

``state_dtype="bfloat16"`` keeps ``s``, ``exp_avg`` and ``exp_avg_sq`` in bfloat16 (updated in float32, written
back with stochastic rounding); ``p0`` stays in the parameter's dtype: the numerator ``Σ<g, p0 - p>`` starts
from ``p0 - p = 0``, and a bf16 ``p0`` would put a fixed rounding error of ~2^-9·|p| there, far larger than
the first steps' movement (``d0`` = 1e-6), which the running max of ``d̂`` would turn into a spurious step size.
So the state is 3×P in bf16 plus 1×P in the parameter dtype. ``compiled="auto"`` (default) compiles the two
passes where a compiler is present.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch

from lightning_optim.optim._closure import evaluate_closure
from lightning_optim._dtensor import is_sharded
from lightning_optim.optim._cautious import cautious, cautious_, cautious_tensor, check_cautious
from lightning_optim.optim._elementwise import ElementwiseOptimizer, check_betas, check_nonneg, local
from lightning_optim.optim._low_precision import store, up

__all__ = ["Prodigy"]

_SCALARS = ("d", "d_max", "d_numerator")


def prodigy_sums_kernel(p: torch.Tensor, g: torch.Tensor, s: torch.Tensor, p0: torch.Tensor, beta3: torch.Tensor,
                        s_coef: torch.Tensor, seed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """First pass over one tensor, for the compiled path: ``s = β3·s + s_coef·g``; returns (<g, p0 - p>,
    ‖s‖₁) in float64; ``seed``: stochastic rounding of a bf16 ``s``."""
    g = up(g)
    dot = ((up(p0) - up(p)) * g).sum(dtype=torch.float64)
    s_new = up(s) * beta3 + s_coef * g
    store(s, s_new, seed, 0)
    return dot, s_new.abs().sum(dtype=torch.float64)


def prodigy_update_kernel(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, beta1: torch.Tensor,
                          c_m: torch.Tensor, beta2: torch.Tensor, c_v: torch.Tensor, c_eps: torch.Tensor,
                          decay: torch.Tensor, neg_dlr: torch.Tensor, seed: torch.Tensor | None = None,
                          cautious: bool = False) -> None:
    """Second pass over one tensor, for the compiled path: ``c_m = d(1-β1)``, ``c_v = d²(1-β2)``,
    ``c_eps = d_new·eps``, ``decay = 1 - wd·dlr`` (decoupled) or 1; ``seed``: stochastic rounding of bf16 m/v;
    ``cautious``: mask the applied ``m``."""
    g = up(g)
    m_new = up(m) * beta1 + g * c_m
    v_new = up(v) * beta2 + g * c_v * g
    m_app = cautious_tensor(m_new, g) if cautious else m_new
    p.copy_(up(p) * decay + neg_dlr * m_app / (torch.sqrt(v_new) + c_eps))
    store(m, m_new, seed, 2)  # slots: indices in state_names (s, p0, exp_avg, exp_avg_sq)
    store(v, v_new, seed, 3)


def prodigy_update_cautious_kernel(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                                   beta1: torch.Tensor, c_m: torch.Tensor, beta2: torch.Tensor, c_v: torch.Tensor,
                                   c_eps: torch.Tensor, decay: torch.Tensor, neg_dlr: torch.Tensor,
                                   seed: torch.Tensor | None = None) -> None:
    """:func:`prodigy_update_kernel` with the cautious mask."""
    prodigy_update_kernel(p, g, m, v, beta1, c_m, beta2, c_v, c_eps, decay, neg_dlr, seed, cautious=True)


class Prodigy(ElementwiseOptimizer):
    """Prodigy with decoupled weight decay; device-side d estimate, one all-reduce per step under FSDP2."""

    state_names = ("s", "p0", "exp_avg", "exp_avg_sq")
    lowp_names = ("s", "exp_avg", "exp_avg_sq")  # p0 stays in the parameter's dtype (module docstring)
    counts_steps = False
    #: None: Python-float coefficients on CPU, device tensors elsewhere; tests force either path
    _host_scalars: bool | None = None

    def __init__(self, params: Any, lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.999),
                 beta3: float | None = None, eps: float = 1e-8, weight_decay: float = 0.1,
                 use_bias_correction: bool = True, safeguard_warmup: bool = False, d0: float = 1e-6,
                 d_coef: float = 1.0, growth_rate: float = math.inf, decouple: bool = True,
                 compiled: bool | str = "auto", state_dtype: str | None = None, cautious: bool = False) -> None:
        check_nonneg(lr=lr, weight_decay=weight_decay, d_coef=d_coef)
        if d0 <= 0 or growth_rate <= 0 or eps <= 0:
            raise ValueError(f"d0, growth_rate and eps must be > 0, got {d0}, {growth_rate}, {eps}")
        if beta3 is not None:
            check_betas((beta3,), 1, "beta3")
        super().__init__(params, dict(
            lr=lr, betas=check_betas(betas, 2), beta3=beta3, eps=eps, weight_decay=weight_decay,
            use_bias_correction=bool(use_bias_correction), safeguard_warmup=bool(safeguard_warmup), d0=d0,
            d_coef=d_coef, growth_rate=growth_rate, decouple=bool(decouple), k=0,
            cautious=check_cautious(cautious, "Prodigy"),
        ), compiled, state_dtype)
        for group in self.param_groups:
            self._init_d(group)

    @staticmethod
    def _init_d(group: dict[str, Any]) -> None:
        """The d estimate's scalars, on the device of the group's first parameter (float64; float32 on MPS)."""
        dev = next((local(p).device for p in group["params"]), torch.device("cpu"))
        dtype = torch.float32 if dev.type == "mps" else torch.float64
        group["d"] = torch.tensor(float(group["d0"]), device=dev, dtype=dtype)
        group["d_max"] = torch.tensor(float(group["d0"]), device=dev, dtype=dtype)
        group["d_numerator"] = torch.tensor(0.0, device=dev, dtype=dtype)

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        st = super()._init_state(p, group)
        st["p0"] = p.detach().clone(memory_format=torch.preserve_format)
        return st

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = evaluate_closure(closure)
        if all(p.grad is None for group in self.param_groups for p in group["params"]):
            return loss  # no parameter takes a step: no step count, no decay of the d estimate's sums
        for group in self.param_groups:  # built over meta parameters, then materialised in place (FSDP2 to_empty)
            if group["d"].is_meta:
                self._init_d(group)
        g0 = self.param_groups[0]
        beta1, beta2 = g0["betas"]
        beta3 = g0["beta3"] if g0["beta3"] is not None else math.sqrt(beta2)
        k = g0["k"]
        bc = math.sqrt(1 - beta2 ** (k + 1)) / (1 - beta1 ** (k + 1)) if g0["use_bias_correction"] else 1.0
        dev = g0["d"].device
        d, d_max = g0["d"], g0["d_max"]
        d0 = g0["d0"]
        # On CPU the "device" scalars are host memory: reading them is not a synchronisation, and Python-float
        # coefficients let foreach ops fuse the scaling into the add (fewer passes over memory).
        host = dev.type == "cpu" if self._host_scalars is None else self._host_scalars

        work = []  # (group, buckets, dlr)
        dots: list[torch.Tensor] = []
        l1s: list[torch.Tensor] = []
        sharded_ref = None
        for group in self.param_groups:
            for name in _SCALARS:  # a checkpoint loaded onto another device
                if group[name].device != dev:
                    group[name] = group[name].to(dev)
            buckets = self._buckets(group)
            dlr = d * (group["lr"] * bc)
            work.append((group, buckets, dlr))
            if group["lr"] == 0:
                continue
            coef = (d / d0) * dlr
            s_coef = (d / d0) * d if group["safeguard_warmup"] else coef
            for b in buckets:
                for p in b.param_objs:
                    if sharded_ref is None and is_sharded(p):
                        sharded_ref = p
                grads = b.grads
                if group["weight_decay"] != 0 and not group["decouple"]:
                    grads = b.grads = torch._foreach_add(grads, b.params, alpha=group["weight_decay"])
                sums: list[tuple[torch.Tensor, torch.Tensor]] = []
                b = self._run_kernel(b, prodigy_sums_kernel, (beta3, s_coef), ("s", "p0"), results=sums,
                                     seeds=self._sr_seeds(group, b))
                for dot, l1 in sums:
                    dots.append(coef.to(torch.float64) * dot.to(dev))
                    l1s.append(l1.to(dev))
                if not b.params:
                    continue

                def eager_sums(group: dict[str, Any], b: Any, s_coef: Any = s_coef) -> None:
                    grads = b.grads
                    diff = torch._foreach_sub(b.state["p0"], b.params)
                    dots.append(coef.to(torch.float64) * _sum_of_dots(grads, diff, dev))
                    s = b.state["s"]
                    torch._foreach_mul_(s, beta3)
                    if host:
                        torch._foreach_add_(s, grads, alpha=float(s_coef))
                    else:
                        torch._foreach_add_(s, torch._foreach_mul(grads, s_coef.to(grads[0].dtype)))
                    l1s.append(torch.stack([n.to(torch.float64) for n in torch._foreach_norm(s, 1)]).sum().to(dev))

                self._update_eager(group, b, eager_sums, names=("s", "p0"))

        zero = torch.zeros((), device=dev, dtype=d.dtype)
        sums = torch.stack([
            (torch.stack(dots).sum() if dots else zero).to(d.dtype),
            (torch.stack(l1s).sum() if l1s else zero).to(d.dtype),
        ])
        if sharded_ref is not None:
            import torch.distributed as dist

            for dim, pl in enumerate(sharded_ref.placements):
                if pl.is_shard():
                    dist.all_reduce(sums, group=sharded_ref.device_mesh.get_group(dim))
        numerator = g0["d_numerator"] * beta3 + sums[0]
        denom = sums[1]
        lr_max = max(g["lr"] for g in self.param_groups)
        if lr_max > 0:
            d_hat = torch.where(denom > 0, g0["d_coef"] * numerator / denom.clamp_min(1e-300 if d.dtype == torch.float64 else 1e-30), d)
            d_new = torch.where(d == d0, torch.maximum(d, d_hat), d)
            d_max_new = torch.maximum(d_max, d_hat)
            d_new = torch.minimum(d_max_new, d_new * g0["growth_rate"])
        else:
            d_new, d_max_new = d, d_max

        for group, buckets, dlr in work:
            wd, eps = group["weight_decay"], group["eps"]
            gb1, gb2 = group["betas"]
            if group["lr"] != 0:
                for b in buckets:
                    if b.params and self.use_compiled(b.params[0].device):
                        decay = 1 - wd * dlr if wd != 0 and group["decouple"] else torch.ones_like(dlr)
                        kernel = self._kernel_for(group, b, prodigy_update_kernel, prodigy_update_cautious_kernel)
                        b = self._run_kernel(b, kernel, (
                            gb1, d * (1 - gb1), gb2, d * d * (1 - gb2), d_new * eps, decay, -dlr),
                            ("exp_avg", "exp_avg_sq"), seeds=self._sr_seeds(group, b))
                    if b.params:
                        self._update_eager(group, b, partial(self._eager_update, host=host, d=d, dlr=dlr, d_new=d_new),
                                           names=("exp_avg", "exp_avg_sq"))
            group["k"] = group["k"] + 1
            self._advance_sr(group)
        for group in self.param_groups:
            group["d"], group["d_max"], group["d_numerator"] = d_new, d_max_new, numerator
        return loss

    @staticmethod
    def _eager_update(group: dict[str, Any], b: Any, host: bool, d: torch.Tensor, dlr: torch.Tensor,
                      d_new: torch.Tensor) -> None:
        """The second pass on the eager path: moments, then the parameter step."""
        wd, eps = group["weight_decay"], group["eps"]
        gb1, gb2 = group["betas"]
        p_dtype = b.params[0].dtype
        m, v = b.state["exp_avg"], b.state["exp_avg_sq"]
        if host:
            df, dlr_f = float(d), float(dlr)
            torch._foreach_mul_(m, gb1)
            torch._foreach_add_(m, b.grads, alpha=df * (1 - gb1))
            torch._foreach_mul_(v, gb2)
            torch._foreach_addcmul_(v, b.grads, b.grads, value=df * df * (1 - gb2))
            denom_t = torch._foreach_sqrt(v)
            torch._foreach_add_(denom_t, float(d_new) * eps)
            if wd != 0 and group["decouple"]:
                torch._foreach_mul_(b.params, 1 - wd * dlr_f)
            m_app = cautious(m, b.grads, b.param_objs) if group.get("cautious") else m
            torch._foreach_addcdiv_(b.params, m_app, denom_t, value=-dlr_f)
            return
        torch._foreach_mul_(m, gb1)
        torch._foreach_add_(m, torch._foreach_mul(b.grads, (d * (1 - gb1)).to(p_dtype)))
        torch._foreach_mul_(v, gb2)
        torch._foreach_addcmul_(v, torch._foreach_mul(b.grads, (d * d * (1 - gb2)).to(p_dtype)), b.grads)
        denom_t = torch._foreach_sqrt(v)
        torch._foreach_add_(denom_t, (d_new * eps).to(p_dtype))
        if wd != 0 and group["decouple"]:
            torch._foreach_mul_(b.params, (1 - wd * dlr).to(p_dtype))
        torch._foreach_reciprocal_(denom_t)
        torch._foreach_mul_(denom_t, m)
        if group.get("cautious"):
            cautious_(denom_t, b.grads, b.param_objs)  # m/denom: the same signs as m
        torch._foreach_mul_(denom_t, (-dlr).to(p_dtype))
        torch._foreach_add_(b.params, denom_t)

def _sum_of_dots(grads: list[torch.Tensor], diff: list[torch.Tensor], dev: torch.device) -> torch.Tensor:
    torch._foreach_mul_(diff, grads)
    return torch.stack([t.sum(dtype=torch.float64) if t.device.type != "mps" else t.sum() for t in diff]).sum().to(dev)
