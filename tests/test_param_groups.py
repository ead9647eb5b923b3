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
