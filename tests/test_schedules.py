"""Schedules: documented values at warmup end, mid-run, cooldown start and the last step; the LRScheduler."""

import io
import math

import pytest
import torch

import lightning_optim as lo
from lightning_optim.schedules import (
    ConstantSchedule,
    CosineSchedule,
    InverseSqrtSchedule,
    LinearSchedule,
    WSDSchedule,
)


def test_warmup_is_linear_from_zero_to_one():
    s = CosineSchedule(total_steps=100, warmup_steps=10)
    assert [s(t) for t in (0, 5, 10)] == [0.0, 0.5, 1.0]


def test_cosine_values():
    s = CosineSchedule(total_steps=110, warmup_steps=10, final_fraction=0.01)
    assert s(10) == 1.0
    assert s(60) == pytest.approx(0.01 + 0.99 * 0.5)  # mid-run: halfway down
    assert s(35) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert s(110) == pytest.approx(0.01) and s(500) == pytest.approx(0.01)


def test_linear_values():
    s = LinearSchedule(total_steps=100, warmup_steps=0, final_fraction=0.001)
    assert s(0) == 1.0 and s(50) == pytest.approx(0.001 + 0.999 * 0.5) and s(100) == pytest.approx(0.001)


@pytest.mark.parametrize(
    "shape, at_quarter",
    [("linear", 0.75), ("cosine", 0.5 * (1 + math.cos(math.pi / 4))), ("sqrt", 1 - math.sqrt(0.25))],
)
def test_wsd_cooldown_shapes(shape, at_quarter):
    s = WSDSchedule(total_steps=1000, warmup_steps=100, decay_fraction=0.2, cooldown_shape=shape)
    assert s.decay_start == 800
    assert s(100) == 1.0 and s(500) == 1.0 and s(799) == 1.0
    assert s(800) == 1.0  # cooldown start
    assert s(850) == pytest.approx(at_quarter)
    assert s(1000) == 0.0


def test_wsd_cooldown_from_a_chosen_step_and_final_fraction():
    s = WSDSchedule(total_steps=700, warmup_steps=10, cooldown_start=500, final_fraction=0.1, cooldown_shape="linear")
    assert s(499) == 1.0 and s(600) == pytest.approx(0.1 + 0.9 * 0.5) and s(700) == pytest.approx(0.1)


def test_constant_and_inverse_sqrt():
    assert ConstantSchedule(warmup_steps=4)(2) == 0.5 and ConstantSchedule()(10**6) == 1.0
    s = InverseSqrtSchedule(warmup_steps=100)
    assert s(100) == 1.0 and s(400) == pytest.approx(0.5)
    assert InverseSqrtSchedule(timescale=10)(1000) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="cosine", total_steps=10, warmup_steps=10), "warmup_steps .* smaller than total_steps"),
        (dict(name="cosine", total_steps=0), "total_steps must be a positive integer"),
        (dict(name="wsd", total_steps=10, decay_fraction=0.0), r"decay_fraction must be in \(0, 1\]"),
        (dict(name="wsd", total_steps=10, decay_fraction=1.5), r"decay_fraction must be in \(0, 1\]"),
        (dict(name="wsd", total_steps=10, cooldown_shape="exp"), "cooldown_shape must be one of"),
        (dict(name="cosine", total_steps=10, final_fraction=2.0), "final_fraction"),
        (dict(name="cosine", total_steps=10, decay_fraction=0.1), "unknown argument.*'decay_fraction'"),
        (dict(name="linear", total_steps=10, warmup_steps=-1), "warmup_steps must be an integer >= 0"),
    ],
)
def test_bad_schedule_arguments(kwargs, match):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    with pytest.raises(ValueError, match=match):
        lo.create_scheduler(optimizer=opt, **kwargs)


def _opt(lrs=(1.0, 0.1)):
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.ones(1))], "lr": lr} for lr in lrs])


def test_scheduler_is_multiplicative_per_group_and_round_trips():
    opt = _opt()
    sched = lo.create_scheduler("wsd", opt, total_steps=20, warmup_steps=4, decay_fraction=0.5)
    seen = []
    for _ in range(12):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    expected = [sched.schedule(t) for t in range(12)]
    for (a, b), f in zip(seen, expected):
        assert a == pytest.approx(f) and b == pytest.approx(0.1 * f)
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # plain data only
    opt2 = _opt()
    sched2 = lo.create_scheduler("wsd", opt2, total_steps=20, warmup_steps=4, decay_fraction=0.5)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(state)
    for _ in range(8):
        opt.step(); sched.step(); opt2.step(); sched2.step()  # noqa: E702
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt2.param_groups]


def test_branching_a_cooldown_from_a_checkpoint_keeps_step_and_takes_new_schedule():
    opt = _opt((1.0,))
    sched = lo.create_scheduler("constant", opt, warmup_steps=2)
    for _ in range(10):
        opt.step(); sched.step()  # noqa: E702
    state = sched.state_dict()
    opt2 = _opt((1.0,))
    opt2.load_state_dict(opt.state_dict())
    branch = lo.create_scheduler("wsd", opt2, total_steps=20, warmup_steps=2, cooldown_start=10, cooldown_shape="linear")
    with pytest.warns(UserWarning, match="different schedule"):
        branch.load_state_dict(state)
    opt2.step(); branch.step()  # noqa: E702
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.9)  # step 11 of a 10-step linear cooldown


def test_horizon_filled_in_later():
    opt = _opt((1.0,))
    sched = lo.create_scheduler("cosine", opt, total_steps=None, warmup_steps=2)
    opt.step(); sched.step()  # noqa: E702
    opt.step(); sched.step()  # noqa: E702
    with pytest.raises(RuntimeError, match="no total_steps yet"):
        opt.step(); sched.step()  # noqa: E702
    sched.total_steps_fn = lambda: float("inf")
    with pytest.raises(ValueError, match="finite horizon"):
        sched.step()
    sched.total_steps_fn = lambda: 12
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(sched.schedule(sched.last_epoch))
    assert sched.schedule.total_steps == 12


def test_schedule_defaults_are_the_dataclass_fields():
    """One source per default: a registered schedule's accepted arguments and defaults are its dataclass's."""
    import dataclasses

    for name, cls in (("cosine", CosineSchedule), ("linear", LinearSchedule), ("wsd", WSDSchedule),
                      ("inverse-sqrt", InverseSqrtSchedule), ("constant", ConstantSchedule)):
        own = {f.name: f.default for f in dataclasses.fields(cls)}
        own.pop("total_steps"), own.pop("warmup_steps")
        spec = lo.scheduler_info(name)
        assert spec.schedule_cls is cls and dict(spec.defaults) == own
        assert spec.needs_total_steps is cls.needs_total_steps
    assert lo.scheduler_info("wsd").defaults == {"decay_fraction": 0.2, "final_fraction": 0.0,
                                                  "cooldown_shape": "sqrt", "cooldown_start": None}
    assert lo.scheduler_info("cosine").defaults == {"final_fraction": 0.01}


# ---------------------------------------------------------------------------------------------------------
# PerStepLR: LightningCLI's --lr_scheduler (plain arguments, steps itself after every optimizer step)


def _sgd(lr=0.1):
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    return torch.optim.SGD([p], lr=lr)


def test_per_step_lr_follows_optimizer_steps_and_ignores_its_own_step():
    from lightning_optim.lr_scheduler import PerStepLR

    opt = _sgd()
    sched = PerStepLR(opt, schedule="wsd", total_steps=6, warmup_steps=1, decay_fraction=0.5,
                      cooldown_shape="linear")
    ref = WSDSchedule(total_steps=6, warmup_steps=1, decay_fraction=0.5, cooldown_shape="linear")
    assert opt.param_groups[0]["lr"] == 0.0  # f(0) with warmup
    for t in range(1, 7):
        opt.step()
        sched.step()  # Lightning's epoch-end call: ignored
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * ref(t)), t
    assert sched.last_epoch == 6 and opt.param_groups[0]["lr"] == pytest.approx(0.0)
    assert ref(4) == pytest.approx(2 / 3)  # the values are not all 1 or 0: the test can see a wrong count


def test_per_step_lr_refuses_a_missing_horizon_and_a_setting_the_schedule_does_not_take():
    from lightning_optim.lr_scheduler import PerStepLR

    with pytest.raises(ValueError, match=r"schedule 'wsd' needs total_steps .*--lr_scheduler\.total_steps"):
        PerStepLR(_sgd(), schedule="wsd")
    with pytest.raises(ValueError, match=r"schedule 'cosine' does not take decay_fraction"):
        PerStepLR(_sgd(), schedule="cosine", total_steps=10, decay_fraction=0.5)
    with pytest.raises(ValueError, match="cosin"):
        PerStepLR(_sgd(), schedule="cosin", total_steps=10)
    opt = _sgd()
    PerStepLR(opt, schedule="inverse-sqrt", warmup_steps=2)  # no horizon needed
    opt.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_per_step_lr_resumes_at_the_saved_step():
    from lightning_optim.lr_scheduler import PerStepLR

    opt = _sgd()
    sched = PerStepLR(opt, schedule="cosine", total_steps=10, warmup_steps=2)
    for _ in range(3):
        opt.step()
    saved_opt, saved = opt.state_dict(), sched.state_dict()
    opt2 = _sgd()
    sched2 = PerStepLR(opt2, schedule="cosine", total_steps=10, warmup_steps=2)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved)
    opt2.step()
    ref = CosineSchedule(total_steps=10, warmup_steps=2)
    assert sched2.last_epoch == 4 and opt2.param_groups[0]["lr"] == pytest.approx(0.1 * ref(4))
