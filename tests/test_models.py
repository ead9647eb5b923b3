"""Models: shapes and parameter counts on the meta device, forward/backward, routing, LanguageModel protocol."""

import math

import pytest
import torch

from lightning_optim import routing_table
from lightning_optim.models import PRESETS, build_model, count_parameters, flops_per_token


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("preset", ["124m", "210m", "583m", "720m"])
def test_presets_on_meta(arch, preset):
    with torch.device("meta"):
        model = build_model(preset, arch)
    assert all(p.is_meta for p in model.parameters())
    cfg = model.config
    assert cfg.vocab_size == 50304
    n = count_parameters(model) / 1e6
    expected = {"124m": 124, "210m": 209, "583m": 584, "720m": 714}[preset]
    assert abs(n - expected) / expected < 0.03, n
    if arch == "llama":
        assert cfg.mlp_hidden == 256 * math.ceil(8 * cfg.n_embd / 3 / 256)
        assert not any(name.endswith("bias") for name, _ in model.named_parameters())
        assert model.pos_emb is None
    assert model.lm_head.weight is model.tok_emb.weight
    assert flops_per_token(cfg) > 6 * count_parameters(model, non_embedding=True)


def test_gpt2_124m_is_124m():
    with torch.device("meta"):
        model = build_model("124m", "gpt2")
    assert 123.5e6 < count_parameters(model) < 124.6e6
    assert (model.config.n_layer, model.config.n_embd, model.config.n_head) == (12, 768, 12)


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="tiny, 124m, 210m, 583m, 720m"):
        build_model("1b")
    with pytest.raises(ValueError, match="arch"):
        build_model("tiny", "mamba", vocab_size=512)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_forward_backward_tiny(arch):
    torch.manual_seed(0)
    model = build_model("tiny", arch, vocab_size=512, block_size=32, n_layer=2)
    idx = torch.randint(0, 512, (2, 32))
    logits = model(idx)
    assert logits.shape == (2, 32, 512)
    targets = torch.randint(0, 512, (2, 32))
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert abs(loss.item() - math.log(512)) < 0.5  # near-uniform at init
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # causal: the first position's logits do not depend on later tokens
    idx2 = idx.clone()
    idx2[:, 10:] = (idx2[:, 10:] + 1) % 512
    assert torch.allclose(model(idx2)[:, :10], logits[:, :10], atol=1e-5)


def test_init_statistics_and_residual_scaling():
    torch.manual_seed(0)
    model = build_model("tiny", "llama", vocab_size=4096, n_layer=8)
    assert abs(model.tok_emb.weight.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].mlp.down.weight.std().item() - 0.02 / math.sqrt(16)) < 0.001


def test_meta_materialisation_uses_our_init():
    with torch.device("meta"):
        model = build_model("tiny", "gpt2", vocab_size=1024)
    model.to_empty(device="cpu")
    for m in model.modules():
        if callable(getattr(m, "reset_parameters", None)):
            m.reset_parameters()
    assert abs(model.tok_emb.weight.std().item() - 0.02) < 0.003
    assert torch.isfinite(model(torch.randint(0, 1024, (1, 8)))).all()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_routing_table(arch):
    model = build_model("tiny", arch, vocab_size=1024)
    roles = {r.name: r for r in routing_table(model)}
    assert roles["tok_emb.weight"].reason == "embedding" and not roles["tok_emb.weight"].matrix
    assert not roles["tok_emb.weight"].decay
    assert "lm_head.weight" not in roles  # tied: appears once, as the embedding
    for name, r in roles.items():
        if "norm" in name or name.endswith("bias"):
            assert not r.decay and not r.matrix, name
        if name.endswith(("qkv.weight", "proj.weight", "up.weight", "gate.weight", "down.weight")):
            assert r.matrix and r.decay, name
    if arch == "gpt2":
        assert not roles["pos_emb.weight"].matrix and not roles["pos_emb.weight"].decay


def test_language_model_protocol_and_vocab():
    from lightning_optim.models import LanguageModel
    from lightning_optim.protocols import LogitsModel, find_output_head

    lm = LanguageModel("tiny", tokenizer_vocab_size=1000, n_layer=1)
    assert lm.config.vocab_size == 1024  # rounded up to a multiple of 64
    assert isinstance(lm, LogitsModel) and find_output_head(lm) is lm.model.lm_head
    batch = (torch.randint(0, 1000, (2, 16)), torch.randint(0, 1000, (2, 16)))
    assert lm.logits_for_batch(batch).shape == (2, 16, 1024)
    with pytest.raises(ValueError, match="vocab"):
        LanguageModel("tiny")
    with pytest.raises(ValueError, match="vocab_size"):
        LanguageModel("124m", tokenizer_vocab_size=60000)
    assert LanguageModel("tiny", tokenizer_vocab_size=1000, n_layer=1, optim={"name": "adam"}).optim_config().name == "adam"
    assert set(PRESETS) == {"tiny", "124m", "210m", "583m", "720m"}
