"""QK-clip (Kimi K2's MuonClip rule): the recorded maximum logit against a plain recomputation, the rescale
(heads over τ land on τ, the others keep their weights bit for bit), GQA, biases, refusals, a Trainer run, and
2 processes (DDP replicas apply the same factors; FSDP2 row shards, plain and through the callback in a Lightning
ModelParallelStrategy Trainer, equal one process)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from lightning_optim.callbacks import QKClip
from lightning_optim.callbacks.qk_clip import QKClipper
from lightning_optim.models.gpt import Attention, ModelConfig, Transformer, _rope_tables, apply_rope

TAU = 1.0


def attention(arch="gpt2", n_head=4, n_kv_head=None, n_embd=32, seed=0, gain=6.0) -> Attention:
    """One attention module with weights (and biases, for gpt2) scaled so its logits spread around a few units."""
    torch.manual_seed(seed)
    m = Attention(ModelConfig(arch=arch, n_layer=1, n_embd=n_embd, n_head=n_head, n_kv_head=n_kv_head,
                              vocab_size=64, block_size=16))
    with torch.no_grad():
        m.qkv.weight.mul_(gain * torch.linspace(0.3, 1.5, m.qkv.weight.shape[0]).unsqueeze(1))
        if m.qkv.bias is not None:
            m.qkv.bias.normal_(0, 0.3)
    return m


def plain_max_logits(m: Attention, x: torch.Tensor) -> torch.Tensor:
    """Per query head: max over the batch and causal pairs (j <= i) of softmax_scale · q_i · k_j, from the
    weights, head by head, in float64."""
    B, T, C = x.shape
    W = m.qkv.weight.detach().double()
    b = m.qkv.bias.detach().double() if m.qkv.bias is not None else torch.zeros(W.shape[0], dtype=torch.float64)
    out = torch.empty(m.n_head, dtype=torch.float64)
    for h in range(m.n_head):
        q_rows, k_rows = m.qk_head_rows(h)
        q = x.double() @ W[q_rows].T + b[q_rows]  # (B, T, hd)
        k = x.double() @ W[k_rows].T + b[k_rows]
        if m.rope:
            cos, sin = _rope_tables(T, m.head_dim, m.rope_theta, x.device)
            q, k = apply_rope(q.unsqueeze(1), cos, sin).squeeze(1), apply_rope(k.unsqueeze(1), cos, sin).squeeze(1)
        logits = m.softmax_scale * torch.einsum("bid,bjd->bij", q, k)
        causal = torch.ones(T, T, dtype=torch.bool).tril()  # j <= i
        out[h] = logits[:, causal].max()
    return out


def inputs(seed=1, B=3, T=8, C=32) -> torch.Tensor:
    return torch.randn(B, T, C, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch,n_kv_head", [("gpt2", None), ("llama", None), ("llama", 2)])
def test_recorded_max_equals_a_plain_recomputation(arch, n_kv_head):
    m = attention(arch, n_kv_head=n_kv_head)
    clipper = QKClipper(threshold=TAU).attach(m)
    x1, x2 = inputs(1), inputs(2)
    m(x1)
    torch.testing.assert_close(clipper.max_logits()[0].double(), plain_max_logits(m, x1), rtol=1e-4, atol=1e-4)
    m(x2)  # a second micro-batch: the maximum runs over both
    both = torch.maximum(plain_max_logits(m, x1), plain_max_logits(m, x2))
    torch.testing.assert_close(clipper.max_logits()[0].double(), both, rtol=1e-4, atol=1e-4)
    m.eval()
    m(inputs(3) * 10)  # eval forwards (validation) are not recorded
    torch.testing.assert_close(clipper.max_logits()[0].double(), both, rtol=1e-4, atol=1e-4)


def test_chunking_does_not_change_the_maximum():
    from lightning_optim.callbacks.qk_clip import max_causal_logits

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 4, 7, 3, generator=g), torch.randn(5, 2, 7, 3, generator=g)
    whole = max_causal_logits(q, k, 0.5)  # auto: all 5 sequences at once here
    assert torch.equal(max_causal_logits(q, k, 0.5, chunk=1), whole)
    assert torch.equal(max_causal_logits(q, k, 0.5, chunk=2), whole)
    with pytest.raises(ValueError, match="chunk"):
        QKClipper(chunk=0)


@pytest.mark.parametrize("arch,n_kv_head", [("gpt2", None), ("llama", None), ("llama", 2), ("llama", 1)])
def test_clip_lands_the_heads_over_tau_on_tau_and_leaves_the_others_bit_for_bit(arch, n_kv_head):
    m = attention(arch, n_kv_head=n_kv_head)
    x = inputs(4)
    before = plain_max_logits(m, x)
    ranked = before.sort().values
    tau = float(ranked[m.n_head // 2 - 1] + ranked[m.n_head // 2]) / 2  # half the heads over, half under
    over = before > tau
    assert 0 < over.sum() < m.n_head
    w0 = m.qkv.weight.detach().clone()
    b0 = m.qkv.bias.detach().clone() if m.qkv.bias is not None else None
    clipper = QKClipper(threshold=tau).attach(m)
    m(x)
    stats = clipper.clip()
    assert stats["qk_clipped_heads"].item() == int(over.sum())
    assert stats["qk_max_logit"].item() == pytest.approx(before.max().item(), rel=1e-5)
    after = plain_max_logits(m, x)
    torch.testing.assert_close(after[over], torch.full_like(after[over], tau), rtol=1e-5, atol=0)  # γ·S = τ
    assert (after <= tau * (1 + 1e-5)).all()
    W = m.qkv.weight.detach()
    gqa = m.n_kv_head != m.n_head
    touched_k = set()
    for h in range(m.n_head):
        q_rows, k_rows = m.qk_head_rows(h)
        if over[h]:
            gamma = tau / before[h].item()
            q_factor = gamma if gqa else math.sqrt(gamma)
            torch.testing.assert_close(W[q_rows], w0[q_rows] * q_factor, rtol=1e-5, atol=1e-7)
            if not gqa:
                torch.testing.assert_close(W[k_rows], w0[k_rows] * math.sqrt(gamma), rtol=1e-5, atol=1e-7)
                touched_k.add((k_rows.start, k_rows.stop))
        else:
            assert torch.equal(W[q_rows], w0[q_rows]), f"head {h} is under tau: its query rows must not change"
    for h in range(m.n_head):
        _, k_rows = m.qk_head_rows(h)
        if (k_rows.start, k_rows.stop) not in touched_k:
            assert torch.equal(W[k_rows], w0[k_rows])  # GQA: the shared key rows never change
    v_start = m.n_head * m.head_dim + m.n_kv_head * m.head_dim
    assert torch.equal(W[v_start:], w0[v_start:])  # values untouched
    if b0 is not None:  # the bias rows follow their head's weight rows
        b = m.qkv.bias.detach()
        for h in range(m.n_head):
            q_rows, _ = m.qk_head_rows(h)
            if over[h]:
                torch.testing.assert_close(b[q_rows], b0[q_rows] * math.sqrt(tau / before[h].item()), rtol=1e-5, atol=1e-7)
            else:
                assert torch.equal(b[q_rows], b0[q_rows])
    # the maxima were reset: a clip with no new forward changes nothing
    w1 = m.qkv.weight.detach().clone()
    assert clipper.clip()["qk_clipped_heads"].item() == 0
    assert torch.equal(m.qkv.weight.detach(), w1)


def test_non_finite_logits_do_not_clip():
    """A forward with an inf (a step a NonFiniteGuard drops): heads whose maximum is inf/NaN keep their rows
    (γ = τ/inf would zero them); finite heads over τ are still clipped."""
    m = attention()
    clipper = QKClipper(threshold=TAU).attach(m)
    w0 = m.qkv.weight.detach().clone()
    x = inputs(5)
    m(x)
    x[0, 0, 0] = float("inf")
    m(x[:1])
    recorded = clipper.max_logits()[0].clone()
    assert (~torch.isfinite(recorded)).any()
    clipper.clip()
    W = m.qkv.weight.detach()
    assert torch.isfinite(W).all()
    for h in range(m.n_head):
        q_rows, k_rows = m.qk_head_rows(h)
        if not torch.isfinite(recorded[h]):
            assert torch.equal(W[q_rows], w0[q_rows]) and torch.equal(W[k_rows], w0[k_rows])
        elif recorded[h] > TAU:
            assert not torch.equal(W[q_rows], w0[q_rows])


def test_refusals_name_the_problem():
    with pytest.raises(TypeError, match="Sequential has no attention module exposing qk_observer"):
        QKClipper().attach(nn.Sequential(nn.Linear(4, 4)))
    for bad in (0, -1.0, float("inf"), "100", True):
        with pytest.raises(ValueError, match="threshold"):
            QKClipper(threshold=bad)
    m = attention()
    m.qk_observer = lambda *a: None
    with pytest.raises(ValueError, match="already has a qk_observer"):
        QKClipper().attach(m)
    with pytest.raises(RuntimeError, match="before attach"):
        QKClipper().clip()

    class Partial(nn.Module):
        qk_observer = None

    with pytest.raises(TypeError, match="Partial.*qk_head_rows"):
        QKClipper().attach(nn.Sequential(Partial()))


def test_detach_removes_the_observers():
    model = Transformer(ModelConfig(arch="llama", n_layer=2, n_embd=32, n_head=4, vocab_size=64, block_size=16))
    clipper = QKClipper().attach(model)
    assert len(clipper.modules) == 2 and all(b.attn.qk_observer is not None for b in model.blocks)
    clipper.detach()
    assert all(b.attn.qk_observer is None for b in model.blocks)


# ----------------------------------------------------------------------------------------------------------
# a Trainer run


class TinyLM(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = Transformer(ModelConfig(arch="llama", n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                                             vocab_size=64, block_size=16))
        with torch.no_grad():
            for b in self.model.blocks:
                b.attn.qkv.weight.mul_(8.0)  # logits of a few units: a threshold of 1 clips

    def training_step(self, batch, batch_idx):
        logits = self.model(batch[:, :-1])
        return nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return torch.utils.data.DataLoader(torch.randint(0, 64, (24, 17), generator=g), batch_size=4)


class Recorder(L.Callback):
    def __init__(self):
        self.logged = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        if "train/qk_max_logit" in m and (not self.logged or self.logged[-1][0] != trainer.global_step):
            self.logged.append((trainer.global_step, float(m["train/qk_max_logit"]), float(m["train/qk_clipped_heads"])))


def test_trainer_run_clips_once_per_optimizer_step_and_logs(tmp_path):
    lm = TinyLM()
    cb, rec = QKClip(threshold=TAU), Recorder()
    calls = []
    clip = cb.clipper.clip
    cb.clipper.clip = lambda: calls.append(1) or clip()
    trainer = L.Trainer(accelerator="cpu", max_steps=3, accumulate_grad_batches=2, callbacks=[cb, rec],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(lm)
    assert len(calls) == 3  # 6 micro-batches, 3 optimizer steps
    assert [s for s, _, _ in rec.logged] == [1, 2, 3]
    assert all(v > TAU and n > 0 for _, v, n in rec.logged), rec.logged
    assert all(b.attn.qk_observer is None for b in lm.model.blocks)  # detached at the end of fit
    # the clip holds on a batch recorded afresh: every head is at most a little over τ after the last step
    x = next(iter(lm.train_dataloader()))
    clipper = QKClipper(threshold=TAU).attach(lm.model)
    lm.model.train()
    with torch.no_grad():
        lm.model(x[:, :-1])
    assert max(t.max().item() for t in clipper.max_logits()) < 3 * TAU


def test_disabled_callback_does_nothing(tmp_path):
    lm = TinyLM()
    w0 = [b.attn.qkv.weight.detach().clone() for b in lm.model.blocks]
    cb = QKClip(threshold=TAU, enabled=False)
    seen = []

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(all(b.attn.qk_observer is None for b in pl_module.model.blocks))

    lm.configure_optimizers = lambda: torch.optim.SGD(lm.parameters(), lr=0.0)  # weights move only by clipping
    trainer = L.Trainer(accelerator="cpu", max_steps=2, callbacks=[cb, Watch()], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(lm)
    assert seen == [True, True] and "train/qk_max_logit" not in trainer.callback_metrics
    assert all(torch.equal(b.attn.qkv.weight, w) for b, w in zip(lm.model.blocks, w0))
    with pytest.raises(ValueError, match="enabled"):
        QKClip(enabled="false")


# ----------------------------------------------------------------------------------------------------------
# 2 processes


@pytest.mark.slow
def test_ddp_and_fsdp2_two_processes(tmp_path):
    from tests.dist_utils import run_distributed

    run_distributed(Path(__file__).parent / "dist_scripts" / "qk_clip_dist.py", str(tmp_path), timeout=240,
                    out_dir=tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ddp_ranks_equal"] and report["fsdp_local_rows"] == [23, 22]
    assert report["lightning_clipped"] == report["lightning_single_clipped"]  # the logged count, on rank 0
    for kind in ("ddp", "fsdp", "lightning"):
        got = torch.load(tmp_path / f"{kind}_rank0.pt", weights_only=True)
        want = torch.load(tmp_path / f"{kind}_single.pt", weights_only=True)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=lambda m: f"{kind} {k}: {m}")
    assert report["ddp_clipped"] > 0
