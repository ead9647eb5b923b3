"""Default grouping rules: weight decay, tied weights, matrix routing, compile and FSDP2 wrappers."""

from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_optim import GroupingRules, param_groups, routing_table
from tests.dist_utils import run_distributed


class RMSNormLike(nn.Module):  # a look-alike norm the rules must recognise by its class name
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))


class TinyLM(nn.Module):
    def __init__(self, vocab=1200, d=16, tied=True):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.rms = RMSNormLike(d)
        self.attn = nn.Linear(d, 3 * d)
        self.mlp = nn.Linear(d, d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight

    def forward(self, x):
        h = self.rms.weight * self.norm(self.wte(x))
        return self.lm_head(self.mlp(self.attn(h)[..., : h.shape[-1]]))


def by_name(groups):
    return {g["name"]: g["param_names"] for g in groups}


def test_decay_rules_and_tied_weight_once():
    groups = by_name(param_groups(TinyLM()))
    assert groups["decay"] == ["attn.weight", "mlp.weight"]
    assert groups["no_decay"] == ["wte.weight", "norm.weight", "norm.bias", "rms.weight", "attn.bias"]
    all_names = groups["decay"] + groups["no_decay"]
    assert len(all_names) == len(set(all_names)) == 7  # the tied head weight appears once


def test_matrix_routing_keeps_embeddings_and_untied_head_out():
    model = TinyLM(tied=False)
    groups = param_groups(model, split_matrices=True)
    named = by_name(groups)
    assert named["matrix"] == ["attn.weight", "mlp.weight"]
    assert "lm_head.weight" in named["decay"]  # head: AdamW with decay, never the matrix rule
    assert "wte.weight" in named["no_decay"]
    assert [g["matrix"] for g in groups] == [True, False, False]
    roles = {r.name: r for r in routing_table(model)}
    assert roles["lm_head.weight"].reason == "head" and not roles["lm_head.weight"].matrix


def test_head_detected_by_vocab_size_without_name():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5000, 8)
            self.proj = nn.Linear(8, 8)
            self.unnamed = nn.Linear(8, 5000)

    roles = {r.name: r for r in routing_table(Net())}
    assert not roles["unnamed.weight"].matrix and roles["proj.weight"].matrix


def test_bare_large_parameter_falls_back_to_row_rule():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.zeros(10_000, 4))
            self.w = nn.Parameter(torch.zeros(8, 4))

    roles = {r.name: r for r in routing_table(Net())}
    assert not roles["table"].matrix and roles["w"].matrix


def test_rules_patterns_and_lr_scales():
    rules = GroupingRules(no_decay_patterns=(r"mlp\.",), lr_scales={"no_decay": 0.5}, decay_embeddings=True)
    named = by_name(param_groups(TinyLM(), rules=rules))
    assert "mlp.weight" in named["no_decay"] and "wte.weight" in named["decay"]
    groups = param_groups(TinyLM(), rules=rules)
    assert groups[1]["lr_scale"] == 0.5 and "lr_scale" not in groups[0]
    with pytest.raises(ValueError, match="unknown group"):
        param_groups(TinyLM(), rules=GroupingRules(lr_scales={"nope": 1.0}))


def test_frozen_parameters_are_left_out():
    model = TinyLM()
    model.attn.requires_grad_(False)
    names = [n for g in param_groups(model) for n in g["param_names"]]
    assert "attn.weight" not in names and "attn.bias" not in names


def test_torch_compile_wrapper_names():
    model = torch.compile(TinyLM())  # wrapping only; nothing is compiled until called
    named = by_name(param_groups(model, split_matrices=True))
    assert named["matrix"] == ["attn.weight", "mlp.weight"]


@pytest.mark.slow
def test_fsdp2_dtensor_parameters_are_grouped_like_plain_ones(tmp_path):
    script = Path(__file__).parent / "dist_scripts" / "found_fsdp2_groups.py"
    run_distributed(script, str(tmp_path))
    lines = sorted((tmp_path / f"rank{r}.txt").read_text() for r in range(2))
    expected = by_name(param_groups(TinyLM(tied=False), split_matrices=True))
    assert lines[0] == lines[1] == repr(sorted(expected.items())) + "\n"


def _plain_routing(opt):
    return {g["name"]: [tuple(p.shape) for p in g["params"]] for g in opt.param_groups}


@pytest.mark.parametrize("tied", [True, False])
def test_plain_parameter_list_sends_embedding_sized_matrices_to_adamw_and_warns(tied):
    """LightningCLI's ``--optimizer`` passes ``model.parameters()``: no names, so routing is by shape."""
    from lightning_optim.models.gpt import build_model
    from lightning_optim.optim.mars import MARS
    from lightning_optim.optim.muon import Muon
    from lightning_optim.param_groups import PLAIN_LIST_WARNING

    model = build_model("tiny", vocab_size=50304, n_layer=1, tie_embeddings=tied)
    params = list(model.parameters())
    with pytest.warns(UserWarning, match=PLAIN_LIST_WARNING) as record:
        opt = Muon(params)
    msg = str(record[0].message)
    assert "(50304, 192)" in msg.split("AdamW")[1] and "(192, 192)" in msg.split("AdamW")[0]
    routing = _plain_routing(opt)
    big = [p for p in params if p.shape[0] == 50304]
    assert len(big) == (1 if tied else 2)
    assert routing["adamw"].count((50304, 192)) == len(big)
    assert routing["matrix"] and all(len(s) == 2 and s[0] < 10_000 for s in routing["matrix"])
    assert sum(map(len, routing.values())) == len(params)
    with pytest.warns(UserWarning, match=PLAIN_LIST_WARNING):
        mars = MARS(params)
    assert {g["matrix"]: [tuple(p.shape) for p in g["params"]] for g in mars.param_groups} == {
        True: routing["matrix"], False: routing["adamw"]}


def test_named_parameter_list_routes_by_name_without_warning():
    import warnings

    from lightning_optim.optim.muon import Muon

    model = TinyLM(vocab=1200, tied=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = Muon(list(model.named_parameters()))
    rows = {r["name"]: r["rule"] for r in opt.routing_table()}
    assert rows["wte.weight"] == rows["lm_head.weight"] == rows["norm.weight"] == "adamw"  # by name, 1200 rows
    assert rows["attn.weight"] == rows["mlp.weight"] == "matrix"
    groups = {g["name"]: g["param_names"] for g in opt.param_groups}
    assert groups["matrix"] == ["attn.weight", "mlp.weight"]
