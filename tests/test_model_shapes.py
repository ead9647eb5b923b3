"""One source of truth for model shapes: the memory estimator reads them from lightning_optim.models, and the
model's grouped-query attention (used by the Llama-3 / 70B shapes) is multi-head attention with shared k/v."""

import math

import pytest
import torch

from lightning_optim.memory import preset_shapes, transformer_shapes
from lightning_optim.models import build_model, model_config
from lightning_optim.memory import shapes_of


def test_estimator_shapes_are_the_model_shapes():
    with torch.device("meta"):
        model = build_model("124m", arch="llama", vocab_size=50304, tie_embeddings=False)
    cfg = model.config
    assert transformer_shapes(cfg.n_embd, cfg.n_layer, 50304, arch="llama") == shapes_of(model)
    # the MLP width is the model's 256·ceil(8d/3/256) (2048 for d=768), not 4d
    matrices = {s for s, m in transformer_shapes(768, 2, 1000) if m}
    assert cfg.mlp_hidden == 2048 and matrices == {(2304, 768), (768, 768), (2048, 768), (768, 2048)}


def test_published_parameter_counts():
    counts = {k: sum(math.prod(s) for s, _ in preset_shapes(k)) for k in ("llama2-7b", "llama3-8b", "llama2-70b")}
    assert counts == {"llama2-7b": 6_738_415_616, "llama3-8b": 8_030_261_248, "llama2-70b": 68_976_648_192}
    with pytest.raises(ValueError, match="n_kv_heads needs n_heads"):
        transformer_shapes(64, 1, 10, n_kv_heads=2)


def test_grouped_query_attention_equals_attention_with_repeated_kv_heads():
    torch.manual_seed(0)
    gqa = build_model("tiny", vocab_size=50, n_kv_head=2).double()  # 6 query heads share 2 k/v heads
    mha = build_model("tiny", vocab_size=50).double()
    cfg, hd = gqa.config, gqa.config.head_dim
    assert gqa.blocks[0].attn.qkv.weight.shape == (cfg.n_embd + 2 * 2 * hd, cfg.n_embd)
    state = gqa.state_dict()
    for i, block in enumerate(gqa.blocks):
        w = block.attn.qkv.weight.detach()
        q, k, v = w.split((cfg.n_embd, 2 * hd, 2 * hd))
        rep = cfg.n_head // 2
        k, v = (t.view(2, hd, -1).repeat_interleave(rep, 0).reshape(cfg.n_embd, -1) for t in (k, v))
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat((q, k, v))
    mha.load_state_dict(state)
    idx = torch.randint(0, 50, (2, 12))
    torch.testing.assert_close(gqa(idx), mha(idx))
    with pytest.raises(ValueError, match="n_kv_head=4 must be a positive divisor of n_head=6"):
        model_config("tiny", vocab_size=50, n_kv_head=4)
