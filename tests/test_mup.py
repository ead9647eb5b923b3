"""muP (lightning_optim.mup): the multipliers against Yang et al. 2022's Table 3 (output-multiplier form), the
default model unchanged, the mixin / recipe wiring, the refusals, and a coordinate check at small widths."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from lightning_optim import OptimConfig, create_optimizer, create_scheduler, param_groups, routing_table
from lightning_optim.models import build_model
from lightning_optim.models.gpt import INIT_STD
from lightning_optim.mup import MuPMultipliers, lr_multiplier, mup_param_groups, optimizer_rule
from tests.recipe_runner import RECIPES, cheap_cell, run_recipe

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab_size=256, n_layer=2, n_head=4, block_size=32)  # width 256, base 64: m = 4


def _model(width: int = 256, base: int | None = 64, **kw):
    torch.manual_seed(0)
    return build_model("tiny", arch=kw.pop("arch", "llama"), n_embd=width, mup_base_width=base, **{**SHAPE, **kw})


def _coord_check():
    if "mup_coord_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("mup_coord_check", ROOT / "benchmarks" / "mup_coord_check.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["mup_coord_check"] = module
        spec.loader.exec_module(module)
    return sys.modules["mup_coord_check"]


# -- the table ------------------------------------------------------------------------------------------------


def test_roles_init_and_lr_multipliers_follow_the_adam_table():
    """Width 256 over base 64 (m = 4; the Llama MLP is 768 wide against the base's 256, so m_in(down) = 3)."""
    model = _model()
    roles = {info.name: info for _, info in model.mup_params()}
    assert roles["tok_emb.weight"].role == "embedding"  # the tied head is the embedding (MuSharedReadout)
    assert "lm_head.weight" not in roles
    assert roles["blocks.0.attn_norm.weight"].role == "vector"
    want_mult = {"attn.qkv": 4, "attn.proj": 4, "mlp.up": 4, "mlp.gate": 4, "mlp.down": 3}
    for layer, m_in in want_mult.items():
        info = roles[f"blocks.0.{layer}.weight"]
        assert info.role == "hidden" and info.fan_in_mult == m_in
        assert lr_multiplier(info, "adamw") == pytest.approx(1 / m_in)  # Adam: η / fan_in (relative to base)
        assert lr_multiplier(info, "muon") == 1.0  # Muon's own sqrt(fan_out/fan_in) factor transfers
        module = model.get_submodule(f"blocks.0.{layer}")
        base_std = INIT_STD / math.sqrt(2 * 2) if layer in ("attn.proj", "mlp.down") else INIT_STD
        assert module.init_std == pytest.approx(base_std / math.sqrt(m_in))  # variance ∝ 1/fan_in
        assert module.weight.std().item() == pytest.approx(module.init_std, rel=0.05)
    for name in ("tok_emb.weight", "blocks.0.attn_norm.weight", "norm.weight"):
        assert lr_multiplier(roles[name], "adamw") == 1.0 and lr_multiplier(roles[name], "muon") == 1.0
    assert model.tok_emb.weight.std().item() == pytest.approx(INIT_STD, rel=0.05)  # input weights: constant
    assert model.readout_multiplier == 0.25  # logits = (h / m) Wᵀ
    attn = model.blocks[0].attn
    assert attn.head_dim == 64 and attn.softmax_scale == pytest.approx(math.sqrt(16) / 64)  # 1/d, = 1/sqrt(d) at base
    # d-muon's RMS-matched update: spectral norm ∝ sqrt(max dim) -> lr × sqrt(base max / max)
    assert lr_multiplier(roles["blocks.0.attn.qkv.weight"], "d-muon") == pytest.approx(0.5)


def test_untied_head_is_a_readout_with_constant_init_and_lr():
    model = _model(tie_embeddings=False)
    roles = {info.name: info for _, info in model.mup_params()}
    assert roles["lm_head.weight"].role == "readout"
    assert lr_multiplier(roles["lm_head.weight"], "adamw") == 1.0
    assert model.lm_head.weight.std().item() == pytest.approx(INIT_STD, rel=0.05)


def test_gpt2_biases_and_positions_are_vectors_and_embeddings():
    model = _model(arch="gpt2")
    roles = {info.name: info.role for _, info in model.mup_params()}
    assert roles["pos_emb.weight"] == "embedding" and roles["blocks.0.attn.qkv.bias"] == "vector"
    assert roles["blocks.0.mlp.down.weight"] == "hidden"
    assert model.blocks[0].mlp.down.init_std == pytest.approx(INIT_STD / 2 / math.sqrt(4))  # 4d MLP: m_in = 4


def test_multipliers_dataclass():
    mu = MuPMultipliers(base_width=64, width=512)
    assert mu.width_mult == 8 and mu.readout_multiplier == 1 / 8
    assert mu.init_std_multiplier("hidden", 8) == pytest.approx(1 / math.sqrt(8))
    assert mu.init_std_multiplier("embedding", 8) == 1.0
    with pytest.raises(ValueError, match="unknown muP role 'bias'"):
        mu.init_std_multiplier("bias")
    with pytest.raises(ValueError, match="base_width must be a positive integer"):
        MuPMultipliers(base_width=0, width=64)


# -- the default model is untouched -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_default_and_base_width_models_are_bit_identical(arch):
    """No mup_base_width: today's model (N(0, 0.02), 1/sqrt(head_dim), no readout multiply). At the base width
    muP is that same model, bit for bit: weights and logits."""
    default, at_base = _model(width=64, base=None, arch=arch), _model(width=64, base=64, arch=arch)
    assert default.readout_multiplier is None and at_base.readout_multiplier == 1.0
    assert default.blocks[0].attn.softmax_scale == 1 / math.sqrt(16) == at_base.blocks[0].attn.softmax_scale
    assert default.blocks[0].attn.qkv.init_std == INIT_STD
    assert default.blocks[0].mlp.down.init_std == INIT_STD / math.sqrt(4)
    for (n, a), (_, b) in zip(default.state_dict().items(), at_base.state_dict().items()):
        assert torch.equal(a, b), n
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(default(idx), at_base(idx))


def test_meta_device_build_materialises_the_mup_init():
    with torch.device("meta"):
        model = build_model("tiny", n_embd=256, mup_base_width=64, **SHAPE)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    for module in model.modules():
        if hasattr(module, "reset_parameters") and module is not model:
            module.reset_parameters()
    qkv = model.blocks[0].attn.qkv
    assert qkv.weight.std().item() == pytest.approx(INIT_STD / 2, rel=0.05)


# -- wiring ---------------------------------------------------------------------------------------------------


def test_param_groups_carry_the_multiplier_and_schedules_keep_it():
    model = _model()
    groups = mup_param_groups(model, param_groups(model), "adamw", {"weight_decay": 0.1})
    opt = create_optimizer("adamw", groups, lr=1e-3, weight_decay=0.1)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == {"decay_lrx0.25", "decay_lrx0.3333", "no_decay"}
    assert by_name["decay_lrx0.25"]["lr"] == pytest.approx(2.5e-4) and by_name["decay_lrx0.25"]["lr_multiplier"] == 0.25
    assert by_name["decay_lrx0.3333"]["lr"] == pytest.approx(1e-3 / 3)
    assert by_name["no_decay"]["lr"] == 1e-3 and by_name["no_decay"]["lr_multiplier"] == 1.0
    assert by_name["decay_lrx0.25"]["weight_decay"] == pytest.approx(0.4)  # lr·wd kept (MuAdam)
    sched = create_scheduler("cosine", opt, total_steps=10, warmup_steps=2)
    for _ in range(5):
        opt.step()
        sched.step()
    ratio = by_name["decay_lrx0.25"]["lr"] / by_name["no_decay"]["lr"]
    assert ratio == pytest.approx(0.25) and by_name["no_decay"]["lr"] < 1e-3


def test_routing_table_shows_the_multiplier():
    rows = {r.name: r for r in routing_table(_model(), optimizer="adamw")}
    assert rows["blocks.1.mlp.down.weight"].lr_multiplier == pytest.approx(1 / 3)
    assert rows["tok_emb.weight"].lr_multiplier == 1.0
    assert all(r.lr_multiplier is None for r in routing_table(_model()))


@pytest.mark.parametrize("name,hidden_lr", [("adamw", 3e-3 / 4), ("muon", 0.01)])
def test_language_model_builds_mup_from_its_optim_config(name, hidden_lr):
    from lightning_optim.models import LanguageModel

    lr = 3e-3 if name == "adamw" else 0.01
    lm = LanguageModel("tiny", optim=OptimConfig(name=name, lr=lr, mup_base_width=64, total_steps=4),
                       vocab_size=256, n_embd=256, n_head=4, n_layer=1)
    assert lm.model.readout_multiplier == 0.25 and lm.model.config.mup_base_width == 64
    opt = lm.configure_optimizers()["optimizer"]
    qkv = lm.model.blocks[0].attn.qkv.weight
    group = next(g for g in opt.param_groups if any(p is qkv for p in g["params"]))
    assert group["lr"] == pytest.approx(hidden_lr)
    emb = next(g for g in opt.param_groups if any(p is lm.model.tok_emb.weight for p in g["params"]))
    assert emb["lr"] == pytest.approx(3e-3 if name == "adamw" else 1e-3) and emb["lr_multiplier"] == 1.0


def test_recipe_flag_trains_a_mup_model(cache, in_tmp):
    cli = run_recipe(RECIPES / "tiny.py", [*cheap_cell(cache), "--model.n_embd", "64", "--optim.mup_base_width", "32"])
    assert cli.trainer.global_step == 2
    model = cli.model.model
    assert model.config.mup_base_width == 32 and model.readout_multiplier == 0.5
    mults = sorted({g["lr_multiplier"] for g in cli.trainer.optimizers[0].param_groups})
    assert mults == [0.5, 1.0]  # recipe AdamW: hidden matrices (n_embd and MLP fan-in both doubled) and the rest
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- refusals -------------------------------------------------------------------------------------------------


def test_optimizers_without_a_rule_are_refused_naming_the_rules():
    with pytest.raises(ValueError, match=r"not defined for optimizer 'sgd'.*Adam rule.*adamw.*spectral rule.*muon"):
        OptimConfig(name="sgd", mup_base_width=64)
    with pytest.raises(ValueError, match="not defined for optimizer 'normuon'"):
        optimizer_rule("normuon")
    with pytest.raises(ValueError, match="adjust_lr='match_rms_adamw'"):
        OptimConfig(name="muon", mup_base_width=64, extra={"adjust_lr": "match_rms_adamw"})
    with pytest.raises(ValueError, match="mup_base_width must be a positive integer"):
        OptimConfig(name="adamw", mup_base_width=64.0)
    assert optimizer_rule("AdamW") == "adam" and optimizer_rule("muon") == "spectral"


def test_a_base_width_that_does_not_divide_is_refused():
    with pytest.raises(ValueError, match="mup_base_width=70 is not divisible by n_head=4"):
        _model(base=70)
    with pytest.raises(ValueError, match="odd head dimension"):
        _model(base=4 * 9)
    with pytest.raises(ValueError, match="mlp_hidden=90 .* not an integer"):
        _model(base=64, mlp_hidden=90)


def test_optimizer_and_model_base_widths_must_agree():
    from lightning_optim.models import LanguageModel

    lm = LanguageModel("tiny", optim=OptimConfig(name="adamw", total_steps=4), vocab_size=256, n_embd=128,
                       n_head=4, n_layer=1)
    lm.hparams["optim"] = OptimConfig(name="adamw", mup_base_width=64, total_steps=4)
    with pytest.raises(ValueError, match="mup_base_width=64 but the model was built with mup_base_width=None"):
        lm.configure_optimizers()
    with pytest.raises(ValueError, match="needs a model that takes the multipliers"):
        mup_param_groups(torch.nn.Linear(2, 2), [], "adamw")


# -- coordinate check ------------------------------------------------------------------------------------------


def test_coordinate_check_mup_flat_sp_grows():
    """Widths 32 -> 128 (4x), 3 steps: under muP the change of every block's output and of the logits stays
    within a factor 2.5 across widths; under SP the last block's and the logits' grow by more than 2.5x."""
    cc = _coord_check()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only contend on a shared machine
    try:
        results = cc.coord_check((32, 64, 128), ("adamw", "muon"), steps=3)
    finally:
        torch.set_num_threads(threads)
    for name in ("adamw", "muon"):
        mup, sp = results[(name, "mup")], results[(name, "sp")]
        for layer in ("block0", "block1", "logits"):
            assert cc.spread(mup, "update", layer) < 2.5, (name, layer, cc.spread(mup, "update", layer))
        for layer in ("block1", "logits"):
            assert cc.growth(sp, "update", layer) > 2.5, (name, layer, cc.growth(sp, "update", layer))


# -- the transfer harness's bookkeeping ---------------------------------------------------------------------------


def _transfer():
    if "mup_transfer" not in sys.modules:
        spec = importlib.util.spec_from_file_location("mup_transfer", ROOT / "benchmarks" / "mup_transfer.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["mup_transfer"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["mup_transfer"]


def test_transfer_optimum_is_the_parabola_vertex_in_log2_lr():
    mt = _transfer()
    lrs = [2.0 ** k for k in range(-10, -5)]
    points = [(lr, (math.log2(lr) + 7.3) ** 2 + 1.0) for lr in lrs]  # vertex at lr = 2**-7.3
    assert math.log2(mt.optimum(points)) == pytest.approx(-7.3)
    edge = [(lr, -math.log2(lr)) for lr in lrs]  # still falling at the largest lr: the edge, not extrapolated
    assert mt.optimum(edge) == lrs[-1]
    assert mt.optimum([(lr, float("inf")) for lr in lrs]) is None


def test_transfer_plan_shares_the_base_width_run():
    mt = _transfer()
    cfg = mt.TransferConfig()
    runs = mt.plan(cfg, ["adamw", "muon"])
    assert len(runs) == 2 * 5 * (3 + 2)  # SP at 3 widths, muP at the 2 that differ from the base
    assert not any(mup and width == cfg.base_width for _, mup, width, _ in runs)
    assert [w for _, _, w, _ in runs] == sorted(w for _, _, w, _ in runs)  # narrowest first
