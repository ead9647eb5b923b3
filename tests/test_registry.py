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
    with pytest.raises(ValueError, match="could not be imported.*no attribute 'NoSuchOptimizer'"):
        lo.create_optimizer("torch.optim.NoSuchOptimizer", tiny())
    with pytest.raises(ValueError, match="could not be imported.*no_such_module"):
        lo.create_optimizer("torch.optim.no_such_module.Opt", tiny())
    with pytest.raises(ValueError, match="'nowhere.Optimizer' names module 'nowhere'"):
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


# ------------------------------------------------------------------------------------------------------------
# Checked values (lightning_optim.validation): what a config typo produces is refused, naming the field.


@pytest.mark.parametrize("field", ["lr", "eps", "weight_decay"])
@pytest.mark.parametrize("bad", [float("inf"), float("1e999"), float("nan")], ids=["inf", "1e999", "nan"])
def test_non_finite_lr_eps_weight_decay_refused(field, bad):
    with pytest.raises(ValueError, match=rf"^{field} must (be finite|not be NaN), got (inf|nan)"):
        lo.create_optimizer("adamw", tiny(), **{field: bad})


def test_non_finite_values_refused_through_optim_config():
    """What ``--optim.lr .inf`` / ``--optim.lr 1e999`` hand to OptimConfig: refused when it is built."""
    for text in (".inf", "1e999"):
        value = float("inf") if text == ".inf" else float(text)
        with pytest.raises(ValueError, match="lr must be finite, got inf"):
            lo.OptimConfig(name="adamw", lr=value)
    with pytest.raises(ValueError, match=r"alpha must be finite \(its default is 8.0\), got inf"):
        lo.OptimConfig(name="ademamix", extra={"alpha": float("inf")})


@pytest.mark.parametrize("text", [".inf", "1e999"])
def test_non_finite_lr_refused_from_the_command_line(text):
    """``--optim.lr .inf`` as LightningCLI's parser (jsonargparse) reads it: refused, naming lr."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--optim", type=lo.OptimConfig, default=lo.OptimConfig())
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    assert instantiate(parser.parse_args(["--optim.lr", "3e-4"])).optim.lr == 3e-4
    with pytest.raises(ValueError, match="lr must be finite, got inf"):
        instantiate(parser.parse_args(["--optim.lr", text]))


def test_number_given_as_a_string_refused_without_coercion():
    with pytest.raises(ValueError) as err:
        lo.create_optimizer("adamw", tiny(), lr="1e-3")
    assert str(err.value) == "lr must be a number: got the string '1e-3'; pass a number"
    with pytest.raises(ValueError, match=r"betas\[1\] must be a number: got the string '0.99'; pass a number"):
        lo.create_optimizer("adamw", tiny(), betas=(0.9, "0.99"))
    with pytest.raises(ValueError, match="ns_steps must be an integer: got the string '5'; pass a number"):
        lo.create_optimizer("muon", tiny(), ns_steps="5")
    with pytest.raises(ValueError, match="lr must be a number, got bool True"):
        lo.create_optimizer("adamw", tiny(), lr=True)


def test_betas_length_comes_from_the_registered_default():
    with pytest.raises(ValueError, match=r"betas must have 2 entries \(like its default \(0.9, 0.999\)\), got 1"):
        lo.create_optimizer("adamw", tiny(), betas=(0.9,))
    # AdEMAMix takes its third beta as beta3, so a 3-tuple is refused, pointing at the default's length
    assert len(lo.optimizer_info("ademamix").defaults["betas"]) == 2
    with pytest.raises(ValueError, match="betas must have 2 entries"):
        lo.create_optimizer("ademamix", tiny(), betas=(0.9, 0.999, 0.9999))
    with pytest.raises(ValueError, match="adamw_betas must have 2 entries"):
        lo.create_optimizer("muon", tiny(), adamw_betas=(0.9, 0.95, 0.99))
    with pytest.raises(ValueError, match=r"eps must have 2 entries \(like its default \(None, 0.001\)\)"):
        lo.create_optimizer("adafactor", tiny(), eps=(None, 1e-3, 1e-3))
    with pytest.raises(ValueError, match="betas must be a tuple"):
        lo.create_optimizer("adamw", tiny(), betas=0.9)


def test_class_path_betas_length_from_the_signature_default():
    with pytest.raises(ValueError, match="betas must have 2 entries"):
        lo.create_optimizer("torch.optim.RAdam", tiny(), betas=(0.9,))


@pytest.mark.parametrize("bad", [-1, 2.5, 2000.0, float("inf"), True])
def test_counts_are_non_negative_integers(bad):
    with pytest.raises(ValueError, match=r"^warmup_steps must be"):
        lo.create_optimizer("sf-adamw", tiny(), warmup_steps=bad)


def test_names_do_not_overrule_a_registered_default():
    """Adafactor's beta2_decay (-0.8) is an exponent, Prodigy's growth_rate may be inf, safeguard_warmup is a
    switch, adjust_lr a mode: all accepted although their names look like betas, counts or rates."""
    assert lo.create_optimizer("adafactor", tiny(), beta2_decay=-0.8).param_groups[0]["beta2_decay"] == -0.8
    opt = lo.create_optimizer("prodigy", tiny(), growth_rate=float("inf"), safeguard_warmup=True)
    assert opt.param_groups[0]["growth_rate"] == float("inf") and opt.param_groups[0]["safeguard_warmup"]
    with pytest.raises(ValueError, match="growth_rate must not be NaN"):
        lo.create_optimizer("prodigy", tiny(), growth_rate=float("nan"))
    with pytest.raises(ValueError, match=r"beta2_decay must be finite \(its default is -0.8\)"):
        lo.create_optimizer("adafactor", tiny(), beta2_decay=float("-inf"))


def test_tensor_values_are_numbers():
    from lightning_optim.validation import check_value

    check_value("lr", torch.tensor(1e-3))
    with pytest.raises(ValueError, match="lr must not be NaN"):
        check_value("lr", torch.tensor(float("nan")))
    with pytest.raises(ValueError, match="lr must be a number, got Tensor"):
        check_value("lr", torch.ones(2))


# ------------------------------------------------------------------------------------------------------------
# Parameter groups


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")], ids=["negative", "nan", "inf"])
def test_bad_lr_scale_refused_naming_the_group(bad):
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    groups = [{"params": [a], "name": "body"}, {"params": [b], "name": "head", "lr_scale": bad}]
    with pytest.raises(ValueError, match=r"param_groups\[1\] \('head'\)\.lr_scale must"):
        lo.create_optimizer("sgd", groups, lr=0.1)


def test_bad_lr_scale_from_the_grouping_rules_refused():
    groups = lo.param_groups(tiny(), rules=lo.GroupingRules(lr_scales={"no_decay": float("nan")}))
    with pytest.raises(ValueError, match=r"param_groups\[1\] \('no_decay'\)\.lr_scale must not be NaN"):
        lo.create_optimizer("adamw", groups)


def test_same_tensor_twice_refused_naming_it():
    w = nn.Parameter(torch.ones(3, 3))
    with pytest.raises(ValueError, match="group 0 item 1 is the same tensor as group 0 item 0"):
        lo.create_optimizer("adamw", [w, w])
    with pytest.raises(ValueError, match="group 1 item 0 is the same tensor as group 0 item 0"):
        lo.create_optimizer("adamw", [{"params": [w]}, {"params": [w], "lr_scale": 0.5}])
    model = tiny()
    groups = lo.param_groups(model)
    groups[1]["params"].append(model[0].weight)  # also in the decay group
    groups[1]["param_names"].append("0.weight")
    with pytest.raises(ValueError, match=r"'0.weight' \(group 1 item \d+\) is the same tensor as '0.weight' "
                                         r"\(group 0 item 0\)"):
        lo.create_optimizer("adamw", groups)


def test_tied_weights_are_not_duplicates():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    model = Tied()
    opt = lo.create_optimizer("adamw", model)
    assert sum(len(g["params"]) for g in opt.param_groups) == 1


# ------------------------------------------------------------------------------------------------------------
# Meta-device parameters: built over them is allowed (materialised in place later), stepping them is not.


def _meta_model():
    with torch.device("meta"):
        return tiny()


def test_step_on_meta_parameters_refused_naming_the_parameter():
    opt = lo.create_optimizer("adamw", _meta_model())
    with pytest.raises(ValueError, match=r"parameter '0.weight' \(group 0 item 0\) is on the meta device"):
        opt.step()
    plain = lo.create_optimizer("sgd", list(_meta_model().parameters()))
    with pytest.raises(ValueError, match=r"parameter group 0 item 0 is on the meta device"):
        plain.step()


def _train_one_step(model, opt):
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    model(torch.randn(5, 4)).pow(2).mean().backward()
    opt.step()
    return [not torch.equal(b, p) for b, p in zip(before, model.parameters())]


def test_meta_parameters_materialised_in_place_train(monkeypatch):
    """``to_empty`` with swapped parameters (what FSDP2 does) keeps the optimizer's tensors: it must train."""
    monkeypatch.setattr(torch.__future__, "_swap_module_params_on_conversion", True)
    model = _meta_model()
    opt = lo.create_optimizer("adamw", model)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    assert all(_train_one_step(model, opt))


def test_meta_parameters_fully_shard_then_to_empty(tmp_path):
    """FSDP2's documented meta-device flow (``fully_shard`` on meta, optimizer, ``to_empty``) trains."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = _meta_model()
        fully_shard(model)
        opt = lo.create_optimizer("adamw", model)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.1)
        assert all(_train_one_step(model, opt))
    finally:
        dist.destroy_process_group()


def test_meta_guard_is_constant_time_after_the_first_clean_step():
    from lightning_optim.validation import MetaParameterGuard

    model = tiny()
    opt = lo.create_optimizer("adamw", model)
    guards = [h for h in opt._optimizer_step_pre_hooks.values() if isinstance(h, MetaParameterGuard)]
    assert len(guards) == 1 and not guards[0].clean
    _train_one_step(model, opt)
    assert guards[0].clean

    class NoIteration:
        def __iter__(self):
            raise AssertionError("the guard walked the parameters after a clean step")

    guards[0](type("Opt", (), {"param_groups": NoIteration()})(), (), {})


# ------------------------------------------------------------------------------------------------------------
# Class paths: imported only from allowed modules, refused before any import otherwise.


@pytest.fixture
def recording_module(tmp_path, monkeypatch):
    """A module ``lo_probe_mod`` on sys.path whose import writes a marker file and defines an optimizer."""
    import sys

    marker = tmp_path / "imported.txt"
    (tmp_path / "lo_probe_mod.py").write_text(
        "import pathlib, torch\n"
        f"pathlib.Path({str(marker)!r}).write_text('imported')\n"
        "class ProbeSGD(torch.optim.SGD):\n"
        "    def __init__(self, params, lr=0.1):\n"
        "        super().__init__(params, lr=lr)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("LIGHTNING_OPTIM_ALLOWED_MODULES", raising=False)
    from lightning_optim import class_paths

    monkeypatch.setattr(class_paths, "_user_allowed", [])
    yield marker
    sys.modules.pop("lo_probe_mod", None)


def test_class_path_outside_the_allow_list_refused_before_import(recording_module):
    import sys

    with pytest.raises(ValueError) as err:
        lo.optimizer_info("lo_probe_mod.ProbeSGD")
    msg = str(err.value)
    assert "'lo_probe_mod.ProbeSGD'" in msg and "nothing was imported" in msg
    assert "allow_optimizer_module('lo_probe_mod')" in msg and "LIGHTNING_OPTIM_ALLOWED_MODULES" in msg
    assert not recording_module.exists() and "lo_probe_mod" not in sys.modules
    with pytest.raises(ValueError, match="names module 'os'"):
        lo.create_optimizer("os.system", tiny())
    with pytest.raises(ValueError, match="not of the form"):
        lo.optimizer_info("..lo_probe_mod.ProbeSGD")


def test_allow_optimizer_module_then_the_class_path_works(recording_module):
    lo.allow_optimizer_module("lo_probe_mod")
    opt = lo.create_optimizer("lo_probe_mod.ProbeSGD", tiny(), lr=0.2)
    assert type(opt).__name__ == "ProbeSGD" and opt.param_groups[0]["lr"] == 0.2
    assert recording_module.read_text() == "imported"  # the probe does record its import
    with pytest.raises(ValueError, match="is not a module name"):
        lo.allow_optimizer_module("not a module")


def test_allowed_modules_from_the_environment(recording_module, monkeypatch):
    monkeypatch.setenv("LIGHTNING_OPTIM_ALLOWED_MODULES", "other_pkg, lo_probe_mod")
    assert lo.optimizer_info("lo_probe_mod.ProbeSGD").factory.__name__ == "ProbeSGD"
    monkeypatch.setenv("LIGHTNING_OPTIM_ALLOWED_MODULES", "lo_probe")  # a prefix of a name is not its package
    with pytest.raises(ValueError, match="names module 'lo_probe_mod'"):
        lo.optimizer_info("lo_probe_mod.ProbeSGD")
    monkeypatch.setenv("LIGHTNING_OPTIM_ALLOWED_MODULES", "bad-name")
    with pytest.raises(ValueError, match="LIGHTNING_OPTIM_ALLOWED_MODULES entry 'bad-name'"):
        lo.optimizer_info("lo_probe_mod.ProbeSGD")


def _lightning_checkpoint(path, optim_name: str) -> None:
    import dataclasses

    import lightning

    optim = dataclasses.asdict(lo.OptimConfig(name="adamw"))
    optim["name"] = optim_name  # what an edited or hostile file holds
    torch.save({"state_dict": {}, "pytorch-lightning_version": lightning.__version__, "epoch": 0, "global_step": 0,
                "hyper_parameters": {"preset": "tiny", "vocab_size": 64, "optim": optim}}, path)


def test_checkpoint_naming_a_foreign_class_path_is_refused_without_importing(recording_module, tmp_path):
    import sys

    from lightning_optim.models import LanguageModel

    path = tmp_path / "weights.ckpt"
    _lightning_checkpoint(path, "lo_probe_mod.ProbeSGD")
    ckpt = torch.load(path, weights_only=True)  # plain data: reading it imports nothing
    assert ckpt["hyper_parameters"]["optim"]["name"] == "lo_probe_mod.ProbeSGD"
    with pytest.raises(ValueError, match="'lo_probe_mod.ProbeSGD' names module 'lo_probe_mod'"):
        lo.OptimConfig.from_hparams(ckpt["hyper_parameters"])
    with pytest.raises(ValueError, match="'lo_probe_mod.ProbeSGD' names module 'lo_probe_mod'"):
        LanguageModel.load_from_checkpoint(path)
    assert not recording_module.exists() and "lo_probe_mod" not in sys.modules
    _lightning_checkpoint(path, "os.system")
    with pytest.raises(ValueError, match="'os.system' names module 'os'"):
        LanguageModel.load_from_checkpoint(path)


def test_named_parameters_are_accepted_and_name_the_parameter():
    model = tiny()
    opt = lo.create_optimizer("adamw", model.named_parameters())
    assert opt.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]
    w = model[0].weight
    with pytest.raises(ValueError, match=r"'again' \(group 0 item 1\) is the same tensor as 'first' \(group 0 item 0\)"):
        lo.create_optimizer("sgd", [("first", w), ("again", w)])
    with pytest.raises(TypeError, match="group 0 mixes"):
        lo.create_optimizer("sgd", [("first", w), model[2].weight])
    with pytest.raises(ValueError, match=r"parameter 'x' \(group 0 item 0\) has dtype torch.int64"):
        lo.create_optimizer("sgd", [{"params": [("x", torch.zeros(2, dtype=torch.long))]}])


def test_checkpoint_holding_an_optim_config_object_is_refused_at_configure(recording_module, tmp_path):
    """An OptimConfig object in a checkpoint loads under weights_only without running its validation; the
    optimizer lookup still refuses the foreign class path before importing it."""
    import sys

    import lightning

    class ProbeLM(lo.OptimizerMixin, lightning.LightningModule):
        def __init__(self, optim: lo.OptimConfig = lo.OptimConfig()):
            super().__init__()
            self.save_hyperparameters()
            self.lin = nn.Linear(2, 2)

    forged = lo.OptimConfig(name="adamw")
    forged.name = "lo_probe_mod.ProbeSGD"
    path = tmp_path / "obj.ckpt"
    torch.save({"state_dict": ProbeLM().state_dict(), "pytorch-lightning_version": lightning.__version__,
                "epoch": 0, "global_step": 0, "hyper_parameters": {"optim": forged}}, path)
    loaded = torch.load(path, weights_only=True)
    assert isinstance(loaded["hyper_parameters"]["optim"], lo.OptimConfig)
    model = ProbeLM.load_from_checkpoint(path)
    for hook in (model.configure_optimizers, model.configure_callbacks):
        with pytest.raises(ValueError, match="'lo_probe_mod.ProbeSGD' names module 'lo_probe_mod'"):
            hook()
    assert not recording_module.exists() and "lo_probe_mod" not in sys.modules


def test_builtin_defaults_are_the_class_signature_plus_written_overrides():
    """One source per default: a built-in's registered defaults are its class's signature defaults, except
    the overrides the table writes down, and an override that restates the class is refused."""
    from lightning_optim import builtins
    from lightning_optim.optim.muon import Muon
    from lightning_optim.specs import signature_defaults

    muon, d_muon = lo.optimizer_info("muon"), lo.optimizer_info("d-muon")
    assert muon.factory is Muon and d_muon.factory is Muon  # a variant is the same class, other defaults
    assert dict(muon.defaults) == signature_defaults(Muon)[0]
    assert d_muon.defaults["lr"] == 1e-3 and d_muon.defaults["adjust_lr"] == "match_rms_adamw"
    assert {k for k in d_muon.defaults if d_muon.defaults[k] != muon.defaults[k]} == {
        "lr", "weight_decay", "adjust_lr", "adamw_lr", "adamw_weight_decay"}
    assert lo.optimizer_info("adamw").defaults["weight_decay"] == 0.1  # torch's own is 0.01
    assert "decoupled_weight_decay" not in lo.optimizer_info("adam").defaults  # hidden: that is adamw
    with pytest.raises(ValueError, match=r"'x'.*override momentum=0.95 repeats Muon's default"):
        builtins.optimizer("x", Muon, overrides={"lr": 1e-3, "momentum": 0.95})
    with pytest.raises(ValueError, match=r"override 'lrr' is not a parameter of Muon"):
        builtins.optimizer("x", Muon, overrides={"lrr": 1.0})
    with pytest.raises(ValueError, match="defaults in full"):
        builtins.optimizer("x", None)


def test_builtins_are_loaded_before_a_user_registration(monkeypatch):
    """A user's registration that reuses a built-in name is refused even as the very first registry call."""
    from lightning_optim import registry

    monkeypatch.setattr(registry, "_OPTIMIZERS", {})
    monkeypatch.setattr(registry, "_OPTIMIZER_ALIASES", {})
    monkeypatch.setattr(registry, "_SCHEDULERS", {})
    monkeypatch.setattr(registry, "_SCHEDULER_ALIASES", {})
    monkeypatch.setattr(registry, "_loaded", False)
    with pytest.raises(ValueError, match="'adamw' is already registered"):
        lo.register_optimizer("adamw", defaults={"lr": 1.0})(lambda groups, lr: torch.optim.SGD(groups, lr=lr))
    assert lo.optimizer_info("adamw").factory is not None and "sgd" in lo.available_optimizers()


def test_import_object_takes_both_separators_and_names_bad_paths():
    from lightning_optim.callbacks.schedule_free import ScheduleFreeSwitch
    from lightning_optim.class_paths import import_object

    for spec in (lo.optimizer_info("sf-adamw"), lo.optimizer_info("sophia")):  # the specs' callback paths resolve
        assert all(isinstance(import_object(path), type) for path in spec.callbacks)
    assert import_object("lightning_optim.callbacks.schedule_free:ScheduleFreeSwitch") is ScheduleFreeSwitch
    assert import_object("lightning_optim.callbacks.schedule_free.ScheduleFreeSwitch") is ScheduleFreeSwitch
    with pytest.raises(ValueError, match="import path 'lightning_optim.callbacks:Nope'.*no attribute 'Nope'"):
        import_object("lightning_optim.callbacks:Nope")
    with pytest.raises(ValueError, match="is not an import path"):
        import_object("not a path")


def test_a_failed_builtin_load_is_not_remembered_as_an_empty_registry(monkeypatch):
    import sys

    from lightning_optim import registry

    for table in ("_OPTIMIZERS", "_OPTIMIZER_ALIASES", "_SCHEDULERS", "_SCHEDULER_ALIASES"):
        monkeypatch.setattr(registry, table, {})
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setitem(sys.modules, "lightning_optim.builtins", None)  # the import raises ImportError
    for _ in range(2):  # the second lookup fails the same way, it does not see an empty table
        with pytest.raises(ImportError):
            lo.available_optimizers()
    monkeypatch.delitem(sys.modules, "lightning_optim.builtins")
    assert "adamw" in lo.available_optimizers() and "wsd" in lo.available_schedulers()
