"""Registry: names, lookups, validation messages, class paths, registration and entry points."""

import pickle

import pytest
import torch
from torch import nn

import lightning_optim as lo
from lightning_optim.registry import OptimizerSpec, StateLayout, register_optimizer_spec


def tiny():
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def test_builtin_keys_and_name_normalisation():
    names = lo.available_optimizers()
    for key in ("adamw", "adam", "sgd", "adafactor"):
        assert key in names
    assert lo.optimizer_info("AdamW") is lo.optimizer_info("adamw")
    assert lo.optimizer_info("adam_w").name == "adamw"  # '_' == '-' and aliases
    assert set(lo.available_schedulers()) >= {"constant", "cosine", "linear", "wsd", "inverse-sqrt"}
    assert lo.scheduler_info("Inverse_Sqrt").name == "inverse-sqrt"


def test_misspelt_optimizer_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown optimizer 'adamww'.*Did you mean 'adamw'"):
        lo.create_optimizer("adamww", tiny())
    with pytest.raises(ValueError, match=r"unknown schedule 'cosin'.*Did you mean 'cosine'"):
        lo.create_scheduler("cosin", torch.optim.SGD(tiny().parameters(), lr=0.1), total_steps=10)


def test_unknown_hyperparameter_names_it_and_the_accepted_ones():
    with pytest.raises(ValueError) as err:
        lo.create_optimizer("adamw", tiny(), bettas=(0.9, 0.99))
    msg = str(err.value)
    assert "'bettas'" in msg and "did you mean 'betas'" in msg and "Accepted:" in msg and "weight_decay" in msg


@pytest.mark.parametrize(
    "hp, field",
    [
        ({"lr": -1e-3}, "lr"),
        ({"betas": (0.9, 1.0)}, r"betas\[1\]"),
        ({"betas": (-0.1, 0.9)}, r"betas\[0\]"),
        ({"eps": 0.0}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"lr": float("nan")}, "lr"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_field(hp, field):
    with pytest.raises(ValueError, match=field):
        lo.create_optimizer("adamw", tiny(), **hp)


def test_momentum_out_of_range_for_sgd():
    with pytest.raises(ValueError, match="momentum"):
        lo.create_optimizer("sgd", tiny(), momentum=1.5)


def test_defaults_are_the_published_ones_and_fused_on_cpu():
    opt = lo.create_optimizer("adamw", tiny())
    assert isinstance(opt, torch.optim.AdamW)
    g = opt.param_groups[0]
    assert g["lr"] == 1e-3 and g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8
    assert g["fused"] is True  # torch's fused kernel runs on CPU
    # module input gets the default groups: decay and no_decay (LayerNorm + biases)
    names = [g["name"] for g in opt.param_groups]
    assert names == ["decay", "no_decay"]
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0


def test_adamw_matches_torch_reference_over_steps():
    torch.manual_seed(0)
    a, b = tiny().double(), tiny().double()
    b.load_state_dict(a.state_dict())
    ours = lo.create_optimizer("adamw", list(a.parameters()), lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    x = torch.randn(16, 4, dtype=torch.float64)
    for _ in range(50):
        for m, o in ((a, ours), (b, ref)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_class_path_and_its_validation():
    opt = lo.create_optimizer("torch.optim.RAdam", tiny(), lr=3e-4)
    assert isinstance(opt, torch.optim.RAdam) and opt.param_groups[0]["lr"] == 3e-4
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        lo.create_optimizer("torch.optim.RAdam", tiny(), lrr=1)
    with pytest.raises(ValueError, match="could not be imported"):
        lo.create_optimizer("nowhere.Optimizer", tiny())
    with pytest.raises(ValueError, match="not a torch.optim.Optimizer"):
        lo.create_optimizer("torch.nn.Linear", tiny())


def test_bad_params_inputs():
    with pytest.raises(ValueError, match="empty parameter list"):
        lo.create_optimizer("adamw", [])
    frozen = tiny().requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        lo.create_optimizer("adamw", frozen)
    with pytest.raises(ValueError, match="group 1 has no 'params'"):
        lo.create_optimizer("adamw", [{"params": [nn.Parameter(torch.ones(2))]}, {"lr": 1.0}])
    with pytest.raises(TypeError, match="single tensor"):
        lo.create_optimizer("adamw", nn.Parameter(torch.ones(2)))
    with pytest.raises(ValueError, match=r"param_groups\[0\].lr"):
        lo.create_optimizer("adamw", [{"params": [nn.Parameter(torch.ones(2))], "lr": -1.0}])


def test_lr_scale_per_group_and_schedule_keeps_ratio():
    p1, p2 = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = lo.create_optimizer("sgd", [{"params": [p1]}, {"params": [p2], "lr_scale": 0.5}], lr=0.2)
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.1]
    sched = lo.create_scheduler("cosine", opt, total_steps=10, warmup_steps=2)
    for _ in range(6):
        opt.step()
        sched.step()
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs[1] == pytest.approx(lrs[0] * 0.5)


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made by a test vanish after it (the conformance suite iterates over the registry)."""
    from lightning_optim import registry

    registry._ensure_loaded()
    monkeypatch.setattr(registry, "_OPTIMIZERS", dict(registry._OPTIMIZERS))
    monkeypatch.setattr(registry, "_OPTIMIZER_ALIASES", dict(registry._OPTIMIZER_ALIASES))


def test_register_decorator_and_overwrite_guard(scratch_registry):
    @lo.register_optimizer("test-plain-sgd", defaults={"lr": 0.5}, state=StateLayout(0), family="test")
    def plain(groups, lr):
        return torch.optim.SGD(groups, lr=lr)

    opt = lo.create_optimizer("Test_Plain_SGD", tiny())
    assert opt.param_groups[0]["lr"] == 0.5
    assert "test-plain-sgd" in lo.available_optimizers()
    with pytest.raises(ValueError, match="already registered"):
        lo.register_optimizer("test-plain-sgd", defaults={})(lambda groups: None)


def test_entry_point_discovery(monkeypatch, scratch_registry):
    from lightning_optim import registry

    spec = OptimizerSpec(name="ep-sgd", factory=lambda g, lr=0.1: torch.optim.SGD(g, lr=lr), defaults={"lr": 0.1})

    class FakeEP:
        name = "ep-sgd"

        def load(self):
            return spec

    monkeypatch.setattr(registry.metadata, "entry_points", lambda group: [FakeEP()] if group == registry.ENTRY_POINT_GROUP else [])
    registry._load_entry_points()
    assert "ep-sgd" in lo.available_optimizers()
    assert isinstance(lo.create_optimizer("ep-sgd", tiny()), torch.optim.SGD)


def test_specs_are_small_records():
    spec = lo.optimizer_info("adamw")
    assert spec.state.numel((3, 4)) == 24 and spec.paper and spec.reference
    assert lo.optimizer_info("adafactor").state.numel((3, 4)) == 7  # 3 row + 4 column factors
    pickle.dumps(spec.defaults)  # plain data


def test_warmup_counts_are_not_checked_as_betas():
    opt = lo.create_optimizer("ademamix", tiny(), beta3_warmup=1000, alpha_warmup=1000)
    assert opt.param_groups[0]["beta3_warmup"] == 1000
    with pytest.raises(ValueError, match="beta3_warmup must be >= 0"):
        lo.create_optimizer("ademamix", tiny(), beta3_warmup=-1)
    with pytest.raises(ValueError, match=r"beta3 must be in \[0, 1\)"):
        lo.create_optimizer("ademamix", tiny(), beta3=1.0)


def test_string_modes_ending_in_lr_are_not_rates():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    opt = lo.create_optimizer("muon", model, adjust_lr="match_rms_adamw")
    assert any(g.get("adjust_lr") == "match_rms_adamw" for g in opt.param_groups)
