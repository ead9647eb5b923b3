"""Hugging Face models built offline from configs: routing, HF ``Conv1D``'s transposed weights, and
``transformers.Trainer`` driving ``create_optimizer`` + ``create_scheduler`` through a checkpoint and a resume."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

from lightning_optim import create_optimizer, create_scheduler, param_groups, routing_table  # noqa: E402
from lightning_optim.optim.muon import Muon  # noqa: E402
from lightning_optim.optim.normuon import NorMuon  # noqa: E402
from lightning_optim.optim.sf_normuon import SFNorMuon  # noqa: E402

VOCAB = 512


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def tiny_llama(cls_name="Llama"):
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{cls_name}Config")(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32)
    return getattr(transformers, f"{cls_name}ForCausalLM")(cfg)


def roles(model):
    return {r.name: r for r in routing_table(model)}


def test_gpt2_embeddings_and_tied_head_to_adamw_conv1d_matrices_transposed():
    model = tiny_gpt2()
    table = roles(model)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: listed once, as the embedding
    for name in ("transformer.wte.weight", "transformer.wpe.weight"):
        assert not table[name].matrix and table[name].reason == "embedding"
    conv = [n for n in table if n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))]
    assert len(conv) == 8
    assert all(table[n].matrix and table[n].transposed for n in conv)
    assert not any(r.transposed for n, r in table.items() if n not in conv)
    opt = create_optimizer("muon", model)
    rows = {r["name"]: r for r in opt.routing_table()}
    assert rows["transformer.wte.weight"]["rule"] == "adamw"
    assert all(rows[n]["rule"] == "matrix" and rows[n]["transposed"] for n in conv)


@pytest.mark.parametrize("arch", ["Llama", "Mistral"])
def test_llama_and_mistral_linear_weights_not_transposed(arch):
    model = tiny_llama(arch)
    table = roles(model)
    assert not table["model.embed_tokens.weight"].matrix
    assert not table["lm_head.weight"].matrix and table["lm_head.weight"].reason == "head"
    proj = [n for n in table if n.endswith("_proj.weight")]
    assert len(proj) == 14 and all(table[n].matrix and not table[n].transposed for n in proj)
    assert all("transposed" not in g for g in param_groups(model, split_matrices=True))


class ConvNet(nn.Module):
    def __init__(self, conv: nn.Module):
        super().__init__()
        self.proj = conv


def conv_and_linear(n_in=64, n_out=192, seed=0):
    """An HF Conv1D and an nn.Linear holding the same map (Linear's weight is Conv1D's transposed)."""
    torch.manual_seed(seed)
    conv = Conv1D(n_out, n_in)
    nn.init.normal_(conv.weight)
    lin = nn.Linear(n_in, n_out)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    x = torch.randn(5, n_in)
    assert torch.allclose(conv(x), lin(x), atol=1e-5)
    return ConvNet(conv), ConvNet(lin), x


@pytest.mark.parametrize("n_in,n_out", [(64, 192), (256, 64)])
@pytest.mark.parametrize("make", [
    lambda g: Muon(g, lr=0.02, weight_decay=0.1),
    lambda g: Muon(g, lr=0.02, adjust_lr="match_rms_adamw"),
    lambda g: NorMuon(g, lr=0.02),
    lambda g: NorMuon(g, lr=0.02, adjust_lr="official"),
    lambda g: SFNorMuon(g, lr=0.02),
], ids=["muon", "muon-rms", "normuon-paper", "normuon-official", "sf-normuon"])
def test_one_step_on_conv1d_equals_one_step_on_the_equivalent_linear(make, n_in, n_out):
    conv_net, lin_net, x = conv_and_linear(n_in, n_out)
    opts = [make(param_groups(net, split_matrices=True)) for net in (conv_net, lin_net)]
    assert opts[0].routing_table()[0]["transposed"] and not opts[1].routing_table()[0]["transposed"]
    for _ in range(2):  # two steps: the NorMuon row moment is carried over
        # the same gradient, transposed (autograd's matmuls would differ in the last bits between the two layouts)
        conv_net.proj(x).square().sum().backward()
        lin_net.proj.weight.grad = conv_net.proj.weight.grad.t().clone()
        lin_net.proj.bias.grad = conv_net.proj.bias.grad.clone()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    assert torch.allclose(conv_net.proj.weight.t(), lin_net.proj.weight, atol=1e-6, rtol=0)
    assert torch.allclose(conv_net.proj.bias, lin_net.proj.bias, atol=1e-6, rtol=0)


def test_without_the_flag_the_conv1d_step_differs():
    """The flag is what makes the two agree: unflagged, Muon scales the (in, out) weight by the wrong ratio."""
    conv_net, lin_net, x = conv_and_linear(64, 192)
    groups = param_groups(conv_net, split_matrices=True)
    for g in groups:
        g.pop("transposed", None)
    opts = [Muon(groups, lr=0.02), Muon(param_groups(lin_net, split_matrices=True), lr=0.02)]
    conv_net.proj(x).square().sum().backward()
    lin_net.proj.weight.grad = conv_net.proj.weight.grad.t().clone()
    lin_net.proj.bias.grad = conv_net.proj.bias.grad.clone()
    for opt in opts:
        opt.step()
    assert not torch.allclose(conv_net.proj.weight.t(), lin_net.proj.weight, atol=1e-4)


def test_transposed_flag_survives_state_dict_and_bad_flags_are_refused():
    model = tiny_gpt2()
    opt = create_optimizer("normuon", model)
    x = torch.randint(0, VOCAB, (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    sd = opt.state_dict()
    flagged = [g for g in sd["param_groups"] if g.get("transposed")]
    assert flagged and all(isinstance(f, bool) for g in flagged for f in g["transposed"])
    fresh = create_optimizer("normuon", model)
    fresh.load_state_dict(sd)
    assert [g.get("transposed") for g in fresh.param_groups] == [g.get("transposed") for g in opt.param_groups]
    c_fc = model.transformer.h[0].mlp.c_fc.weight  # (64, 256): one row moment per output neuron
    assert fresh.state[c_fc]["v"].shape == (256, 1)
    conv_net, _, _ = conv_and_linear()
    with pytest.raises(ValueError, match="transposed.*one per parameter"):
        Muon([{"params": [conv_net.proj.weight], "matrix": True, "transposed": [True, False]}])
    with pytest.raises(ValueError, match="only 2-D"):
        Muon([{"params": [conv_net.proj.bias], "matrix": False, "transposed": [True]}])


def test_trainer_trains_checkpoints_and_resumes(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, VOCAB, (12, 16))]

    def run(resume: bool, max_steps: int):
        model = tiny_gpt2()
        opt = create_optimizer("muon", model)
        sched = create_scheduler("wsd", opt, total_steps=6, warmup_steps=1)
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2,
                                 save_steps=3, report_to=[], use_cpu=True, logging_steps=1, seed=0,
                                 dataloader_num_workers=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched))
        trainer.train(resume_from_checkpoint=resume or None)
        return trainer, model, opt, sched

    trainer, model, opt, sched = run(False, 6)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert (tmp_path / "checkpoint-3").is_dir() and (tmp_path / "checkpoint-6").is_dir()
    assert sched.last_epoch == 6 and opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    final = {k: v.clone() for k, v in model.state_dict().items()}

    # resume from the newest checkpoint with 3 more steps budgeted: the optimizer and scheduler come back
    import shutil

    shutil.rmtree(tmp_path / "checkpoint-6")
    trainer2, model2, opt2, sched2 = run(True, 6)
    assert trainer2.state.global_step == 6 and sched2.last_epoch == 6
    assert any(opt2.state[p] for p in model2.parameters())
    resumed_losses = [h["loss"] for h in trainer2.state.log_history if "loss" in h]
    assert resumed_losses[-3:] == pytest.approx(losses[-3:], rel=1e-4)
    for k, v in model2.state_dict().items():
        assert torch.allclose(v, final[k], atol=1e-5), k
