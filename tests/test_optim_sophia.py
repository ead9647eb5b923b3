"""Sophia-G (``sophia``) and its SophiaHessian callback; one DDP launch that also covers SOAP."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch

import lightning_optim as lo
from lightning_optim.optim.sophia import SophiaG


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _plain_sophia(p, grads, hess_grads, lr, betas, rho, wd, bs, interval):
    """The algorithm box, one tensor, straight from the reference's _single_tensor_sophiag."""
    m, h = torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        p = p * (1 - lr * wd)
        m = betas[0] * m + (1 - betas[0]) * g
        ratio = (m.abs() / (rho * bs * h + 1e-15)).clamp(max=1)
        p = p - lr * m.sign() * ratio
        if t % interval == 0:
            gh = hess_grads[t // interval - 1]
            h = betas[1] * h + (1 - betas[1]) * gh * gh
    return p, m, h


@pytest.mark.parametrize("foreach", [True, False])
def test_matches_plain_rendition_50_steps(foreach):
    torch.manual_seed(0)
    shapes = [(7, 5), (11,), (3, 4, 2)]
    hp = dict(lr=1e-2, betas=(0.9, 0.95), rho=0.04, weight_decay=0.1, bs=512, hessian_interval=10)
    ps = [torch.randn(s, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, dtype=torch.float64) for _ in range(50)] for s in shapes]
    hgs = [[torch.randn(s, dtype=torch.float64) * 0.1 for _ in range(5)] for s in shapes]
    ours = [p.clone().requires_grad_() for p in ps]
    opt = SophiaG(ours, foreach=foreach, **hp)
    for t in range(1, 51):
        for o, gs in zip(ours, grads):
            o.grad = gs[t - 1].clone()
        opt.step()
        if t % opt.hessian_interval == 0:
            for o, hg in zip(ours, hgs):
                o.grad = hg[t // 10 - 1].clone()
            opt.update_hessian()
    for o, p, gs, hg in zip(ours, ps, grads, hgs):
        ref, m, h = _plain_sophia(p, gs, hg, hp["lr"], hp["betas"], hp["rho"], hp["weight_decay"], hp["bs"], 10)
        # same operations in the same order; foreach kernels may fuse differently: 1e-12 in float64
        torch.testing.assert_close(o.detach(), ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(opt.state[o]["hessian"], h, rtol=0, atol=1e-12)
    # the clip is active: some coordinates take less than the full sign step once h > 0
    st = opt.state[ours[0]]
    clipped = st["exp_avg"].abs() < hp["rho"] * hp["bs"] * st["hessian"]
    assert clipped.any() and not clipped.all()


def test_update_hessian_needs_bs_and_takes_it():
    p = torch.randn(3, 3, requires_grad=True)
    opt = lo.create_optimizer("sophia-g", [p])
    assert isinstance(opt, SophiaG) and opt.param_groups[0]["bs"] is None
    p.grad = torch.randn(3, 3)
    with pytest.raises(ValueError, match="bs"):
        opt.update_hessian()
    opt.update_hessian(bs=4096)
    assert opt.param_groups[0]["bs"] == 4096


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.GELU(), torch.nn.Linear(10, 4)).to(dtype)


def _train(model, opt, steps, start=0):
    for s in range(start, start + steps):
        g = torch.Generator().manual_seed(s)
        x = torch.randn(8, 6, generator=g).to(next(model.parameters()).dtype)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (s + 1) % 3 == 0:  # a Hessian pass (any gradient stands in for ĝ here)
            model(x).mean().backward()
            opt.update_hessian(bs=64)
            opt.zero_grad(set_to_none=True)


def test_state_dict_round_trip_and_bit_identical_resume():
    m1 = _model()
    o1 = lo.create_optimizer("sophia", m1.parameters())
    _train(m1, o1, 10)
    straight = _model()
    os_ = lo.create_optimizer("sophia", straight.parameters())
    _train(straight, os_, 20)
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    m2 = _model()
    m2.load_state_dict(ckpt["model"])
    o2 = lo.create_optimizer("sophia", m2.parameters())
    o2.load_state_dict(ckpt["opt"])
    assert o2.param_groups[0]["bs"] == 64
    _train(m2, o2, 10, start=10)
    for a, b in zip(m2.parameters(), straight.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("full", [True, False])
def test_distributed_checkpoint_state_dict(full):
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict,
    )

    m = _model()
    o = lo.create_optimizer("sophia", m.parameters())
    _train(m, o, 5)
    opts = StateDictOptions(full_state_dict=full)
    sd = copy.deepcopy(get_optimizer_state_dict(m, o, options=opts))
    assert set(sd["state"]["0.weight"]) == {"step", "exp_avg", "hessian"}
    m2 = _model()
    m2.load_state_dict(m.state_dict())
    o2 = lo.create_optimizer("sophia", m2.parameters())
    set_optimizer_state_dict(m2, o2, sd, options=opts)
    _train(m, o, 4, start=5)
    _train(m2, o2, 4, start=5)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_param_without_grad_untouched_and_bf16():
    m = _model(torch.bfloat16)
    frozen = m[0].bias
    before = frozen.detach().clone()
    o = lo.create_optimizer("sophia", m.parameters())
    w_before = m[2].weight.detach().clone()
    for _ in range(4):
        m(torch.randn(8, 6, dtype=torch.bfloat16)).square().mean().backward()
        frozen.grad = None
        o.step()
        o.zero_grad()
    assert torch.equal(frozen, before) and frozen not in o.state
    assert m[2].weight.dtype == torch.bfloat16 and not torch.equal(m[2].weight, w_before)
    assert o.state[m[2].weight]["hessian"].dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------
# Lightning: the callback, added by the mixin, runs the pass after steps 10, 20, ...


def test_lightning_hessian_pass_on_the_right_steps():
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_optim.callbacks.sophia_hessian import SophiaHessian
    from tests.dist_scripts.soap_common import GLOBAL_BATCH, SEQ, TinyLM, dataset

    model = TinyLM({"name": "sophia", "lr": 1e-2, "scheduler": "constant"})
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=25, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    seen = []
    orig = SophiaG.update_hessian

    def spy(self, bs=None):
        seen.append(trainer.global_step)
        return orig(self, bs)

    SophiaG.update_hessian = spy
    try:
        trainer.fit(model, DataLoader(dataset(25), batch_size=GLOBAL_BATCH))
    finally:
        SophiaG.update_hessian = orig
    hess = [cb for cb in trainer.callbacks if isinstance(cb, SophiaHessian)]
    assert len(hess) == 1  # added by OptimizerMixin.configure_callbacks
    assert seen == [10, 20] and hess[0].passes == [10, 20]
    opt = trainer.optimizers[0]
    assert opt.param_groups[0]["bs"] == GLOBAL_BATCH * SEQ  # tokens per optimizer step
    assert all(float(s["hessian"].abs().sum()) > 0 for s in opt.state.values())


def test_lightning_clear_error_without_protocol():
    import lightning as L
    from torch.utils.data import DataLoader

    from tests.dist_scripts.soap_common import GLOBAL_BATCH, TinyLM, dataset

    class NoLogits(TinyLM):
        logits_for_batch = None

    model = NoLogits({"name": "sophia", "lr": 1e-2, "scheduler": "constant"})
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(TypeError, match="logits_for_batch"):
        trainer.fit(model, DataLoader(dataset(2), batch_size=GLOBAL_BATCH))


# ---------------------------------------------------------------------------------------------------------
# one 2-process launch: DDP equals single process, for SOAP and Sophia (Hessian all-reduce included)


@pytest.mark.slow
def test_ddp_two_processes_equal_single_process(tmp_path: Path):
    """SOAP and Sophia under Lightning DDP (2 processes) against one process on the same global batches: both
    replicas bit-identical, Sophia's Hessian pass (with its own gradient all-reduce) after the same steps, and
    the weights equal to the single-process ones within tolerance (the two ranks' gradients are summed in a
    different order; see the bounds below). SOAP runs with max_precond_dim=16 so every factor it keeps is full rank from the first
    step: a rank-deficient factor's null-space eigenvectors are decided by rounding noise, which would turn a
    one-ulp gradient difference into a different (equally valid) basis."""
    from tests.dist_scripts.soap_common import fit
    from tests.dist_utils import run_distributed

    script = Path(__file__).parent / "dist_scripts" / "soap_ddp.py"
    run_distributed(script, str(tmp_path), nprocs=2, timeout=300)
    for name, extra, passes in (("soap", {"precondition_frequency": 3, "max_precond_dim": 16}, []),
                                ("sophia", {"hessian_interval": 5}, [5, 10])):
        r0 = torch.load(tmp_path / f"{name}_rank0.pt", weights_only=True)
        r1 = torch.load(tmp_path / f"{name}_rank1.pt", weights_only=True)
        single, hess = fit(name, 12, world=1, **extra)
        if name == "sophia":
            assert r0["passes"] == r1["passes"] == hess.passes == passes
        for k, v in single.state_dict().items():
            assert torch.equal(r0["weights"][k], r1["weights"][k]), (name, k)
            # Sophia: float32 rounding (measured ≤ 6e-7). SOAP: per-coordinate Adam normalisation in the rotated
            # basis turns one-ulp differences of small rotated components into O(1) relative ones there; measured
            # ≤ 3.3e-3 after 12 steps at lr 1e-2, so the bound is half a step (lr/2), far below a real bug's size.
            atol = 5e-3 if name == "soap" else 1e-5
            torch.testing.assert_close(r0["weights"][k], v, rtol=1e-4, atol=atol, msg=f"{name} {k}")


# ---------------------------------------------------------------------------------------------------------
# a missing Hessian pass is an error: in a Trainer without SophiaHessian, and in a loop that never updates h


class _PlainSophiaModule:
    """A LightningModule without the mixin whose configure_optimizers returns SophiaG (LightningCLI's way)."""

    @staticmethod
    def make(**sophia_kw):
        import lightning as L

        class Module(L.LightningModule):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.embed = torch.nn.Embedding(11, 6)
                self.head = torch.nn.Linear(6, 11)

            def logits_for_batch(self, batch):
                return self.head(self.embed(batch[0][:, :-1]))

            def training_step(self, batch, i):
                logits = self.logits_for_batch(batch)
                return torch.nn.functional.cross_entropy(logits.reshape(-1, 11), batch[0][:, 1:].reshape(-1))

            def configure_optimizers(self):
                return SophiaG(self.parameters(), lr=1e-2, **sophia_kw)

            def train_dataloader(self):
                g = torch.Generator().manual_seed(0)
                data = torch.utils.data.TensorDataset(torch.randint(0, 11, (16, 5), generator=g))
                return torch.utils.data.DataLoader(data, batch_size=4)

        return Module()


def _trainer(**kw):
    import lightning as L

    return L.Trainer(accelerator="cpu", devices=1, max_steps=4, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kw)


def test_trainer_without_the_callback_raises_at_the_first_step_naming_it():
    model = _PlainSophiaModule.make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _trainer()
    with pytest.raises(RuntimeError, match=r"SophiaG .*without the SophiaHessian callback.*"
                                           r"lightning_optim\.callbacks\.SophiaHessian"):
        trainer.fit(model)
    assert trainer.global_step == 0
    for k, v in model.state_dict().items():  # the refused step changed nothing
        assert torch.equal(v, before[k]), k


def test_trainer_with_the_callback_trains_and_updates_the_hessian():
    from lightning_optim.callbacks.sophia_hessian import SophiaHessian

    model = _PlainSophiaModule.make(hessian_interval=2)
    hess = SophiaHessian()
    trainer = _trainer(callbacks=[hess])
    trainer.fit(model)
    assert trainer.global_step == 4 and hess.passes == [2, 4]
    opt = trainer.optimizers[0]
    assert all(bool(opt.state[p]["hessian"].abs().sum() > 0) for p in model.parameters())


def test_plain_loop_that_updates_the_hessian_runs_and_one_that_never_does_warns_once():
    import warnings

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    good = SophiaG([w], lr=1e-2, bs=8, hessian_interval=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 9 steps, the Hessian updated after steps 3, 6, 9: never a warning
        for t in range(1, 10):
            w.grad = torch.randn(4, 3)
            good.step()
            if t % 3 == 0:
                w.grad = torch.randn(4, 3)
                good.update_hessian()
    assert bool(good.state[w]["hessian"].abs().sum() > 0)

    bad = SophiaG([w], lr=1e-2, bs=8, hessian_interval=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):  # hessian_interval steps without an update are silent ...
            w.grad = torch.randn(4, 3)
            bad.step()
    w.grad = torch.randn(4, 3)
    with pytest.warns(RuntimeWarning, match=r"taken 3 steps \(hessian_interval=3\) and update_hessian\(\) was never"):
        bad.step()  # ... the next one warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bad.step()  # once
