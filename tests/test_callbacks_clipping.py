"""GradientClipping: logged norms, thresholds, per-layer clipping and ZClip's rule."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from lightning_optim.callbacks import GradientClipping
from tests.dist_scripts.stab_common import MetricsLogger, TinyLM, loader, trainer

torch.set_num_threads(1)


class GradProbe(L.Callback):
    """Norms of the gradients as this callback sees them (place it before or after the clipping)."""

    def __init__(self) -> None:
        self.global_norms: list[float] = []
        self.layer_norms: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.global_norms.append(float(torch.nn.utils.get_total_norm(grads)))
        layers = {}
        for name, mod in pl_module.named_modules():
            own = [p.grad for p in mod.parameters(recurse=False) if p.grad is not None]
            if own:
                layers[name] = float(torch.sqrt(sum(g.pow(2).sum() for g in own)))
        self.layer_norms.append(layers)


def test_global_clipping_logs_norms_and_respects_threshold():
    L.seed_everything(0)
    before, after = GradProbe(), GradProbe()
    logger = MetricsLogger()
    max_norm = 0.05
    t = trainer([before, GradientClipping(max_norm=max_norm), after], 12, logger=logger, log_every_n_steps=1)
    t.fit(TinyLM(lr=1e-3), loader())
    logged_before = [v for _, v in logger.history["train/grad_norm"]]
    logged_after = [v for _, v in logger.history["train/grad_norm_clipped"]]
    assert len(logged_after) == 12
    assert logged_before == pytest.approx(before.global_norms, rel=1e-5)
    assert all(v <= max_norm for v in logged_after)
    assert all(v <= max_norm * (1 + 1e-6) for v in after.global_norms)
    assert logged_after == pytest.approx(after.global_norms, rel=1e-4)
    assert max(before.global_norms) > max_norm  # clipping was active


def test_refuses_double_clipping():
    t = trainer([GradientClipping(max_norm=1.0)], 2, gradient_clip_val=1.0)
    with pytest.raises(ValueError, match="gradient_clip_val"):
        t.fit(TinyLM(), loader())


def test_per_layer_clipping():
    L.seed_everything(0)
    before, after = GradProbe(), GradProbe()
    max_norm = 0.02
    trainer([before, GradientClipping(max_norm=max_norm, mode="per_layer"), after], 5).fit(TinyLM(), loader())
    clipped_any = False
    for b, a in zip(before.layer_norms, after.layer_norms):
        for name, norm in b.items():
            expected = min(norm, max_norm * norm / (norm + 1e-6)) if norm > max_norm else norm
            assert a[name] == pytest.approx(expected, rel=1e-4), name
            clipped_any |= norm > max_norm
    assert clipped_any


def _zclip_reference(norms, alpha=0.97, z_thresh=2.5, warmup=25, eps=1e-6, max_norm=None):
    """A plain Python rendition of ZClip (bluorion-com/ZClip, zscore mode, adaptive_scaling): the norm after."""
    buffer, mean, var, out = [], None, None, []
    for g in norms:
        if mean is None:
            buffer.append(g)
            if len(buffer) >= warmup:
                mean = sum(buffer) / len(buffer)
                var = sum((x - mean) ** 2 for x in buffer) / len(buffer)
            clip = max_norm if max_norm is not None else g
        else:
            std = var ** 0.5
            z = (g - mean) / (std + eps)
            clip_val = mean + z_thresh * std / (z / z_thresh) if z > z_thresh else None
            adaptive = clip_val if clip_val is not None else g
            clip = min(adaptive, max_norm) if max_norm is not None else adaptive
            x = clip_val if clip_val is not None else g
            mean = alpha * mean + (1 - alpha) * x
            var = alpha * var + (1 - alpha) * (x - mean) ** 2
        out.append(g * (clip / (g + 1e-6)) if g > clip else g)
    return out


@pytest.mark.parametrize("max_norm", [None, 3.0])
def test_adaptive_matches_zclip_rule(max_norm):
    gen = torch.Generator().manual_seed(0)
    norms = (1.0 + 0.1 * torch.randn(80, generator=gen)).abs().tolist()
    for i in (30, 31, 50, 70):
        norms[i] *= 8.0  # spikes
    expected = _zclip_reference(norms, max_norm=max_norm)

    clip = GradientClipping(mode="adaptive", max_norm=max_norm, log=False)
    param = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([param], lr=0.1)
    fake_trainer = SimpleNamespace(gradient_clip_val=None, strategy=None)
    got = []
    for n in norms:
        param.grad = torch.tensor([n, 0.0, 0.0, 0.0])
        clip.on_before_optimizer_step(fake_trainer, None, opt)
        got.append(float(param.grad.norm()))
    assert got == pytest.approx(expected, rel=1e-5)
    assert got[30] < norms[30] / 2  # the spike was clipped
    # statistics survive a state_dict round trip and give the same next threshold
    state = clip.state_dict()
    again = GradientClipping(mode="adaptive", max_norm=max_norm, log=False)
    again.load_state_dict(state)
    for c in (clip, again):
        param.grad = torch.tensor([5.0, 0.0, 0.0, 0.0])
        c.on_before_optimizer_step(fake_trainer, None, opt)
        got.append(float(param.grad.norm()))
    assert got[-1] == pytest.approx(got[-2], rel=1e-6)
    assert math.isfinite(got[-1])


def test_adaptive_ignores_nonfinite_norm():
    clip = GradientClipping(mode="adaptive", warmup_steps=3, log=False)
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=0.1)
    fake_trainer = SimpleNamespace(gradient_clip_val=None, strategy=None)
    for v in (1.0, 1.1, 0.9, 1.0):
        param.grad = torch.tensor([v, 0.0])
        clip.on_before_optimizer_step(fake_trainer, None, opt)
    mean, var = float(clip.mean), float(clip.var)
    param.grad = torch.tensor([float("nan"), 0.0])
    clip.on_before_optimizer_step(fake_trainer, None, opt)
    assert float(clip.mean) == mean and float(clip.var) == var


def test_state_dict_round_trip_and_tighten(tmp_path):
    clip = GradientClipping(max_norm=1.0)
    clip.tighten(0.7)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    other = GradientClipping(max_norm=1.0)
    other.load_state_dict(torch.load(tmp_path / "clip.pt", weights_only=True))
    assert other.max_norm == pytest.approx(0.7)
