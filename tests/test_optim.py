import pytest
import torch
from torch import nn

from nexttoken.training.optim import (
    BIAS,
    DECAY,
    EMBEDDING,
    FROZEN,
    LORA,
    NORM,
    build_optimizer,
    decay_audit,
    param_groups,
)


class TinyBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(3 * d, d, bias=False)
        self.ln_2 = nn.LayerNorm(d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))


class TinyNanoGPT(nn.Module):
    """nanoGPT's shape: token + position embeddings, blocks, final norm, tied head."""

    def __init__(self, vocab=50, d=8):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(16, d)
        self.blocks = nn.ModuleList([TinyBlock(d) for _ in range(2)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight


def assert_each_trainable_param_once(model, groups):
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped})
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in grouped} == trainable


def test_nanogpt_with_tied_embeddings():
    model = TinyNanoGPT()
    groups = param_groups(model, 0.1)
    assert_each_trainable_param_once(model, groups)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    # Tied head: one tensor, an embedding, never decayed.
    assert id(model.lm_head.weight) not in decayed
    assert id(model.wte.weight) not in decayed and id(model.wpe.weight) not in decayed
    for block in model.blocks:
        assert id(block.attn.weight) in decayed and id(block.proj.weight) in decayed
        assert id(block.mlp[0].weight) in decayed and id(block.mlp[2].weight) in decayed
        assert id(block.attn.bias) not in decayed and id(block.mlp[0].bias) not in decayed
        assert id(block.ln_1.weight) not in decayed and id(block.ln_1.bias) not in decayed
        assert id(block.ln_2.weight) not in decayed
    audit = decay_audit(model)
    assert [r.name for r in audit.records if r.name.startswith("lm_head")] == []
    reasons = {r.name: r.reason for r in audit.records}
    assert reasons["wte.weight"] == EMBEDDING
    assert reasons["blocks.0.ln_1.weight"] == NORM
    assert reasons["blocks.0.attn.bias"] == BIAS
    assert reasons["blocks.1.mlp.2.weight"] == DECAY
    assert audit.unclassified == []
    assert sum(r.numel for r in audit.records) == sum(p.numel() for p in model.parameters())


def test_tied_head_registered_before_embedding_is_still_an_embedding():
    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 10, bias=False)
            self.emb = nn.Embedding(10, 4)
            self.head.weight = self.emb.weight

    groups = param_groups(HeadFirst(), 0.1)
    assert groups[0]["params"] == [] and len(groups[1]["params"]) == 1


def test_hf_gpt2_every_parameter_where_the_rule_says():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    groups = param_groups(model, 0.05)
    assert_each_trainable_param_once(model, groups)
    decayed = {id(p) for p in groups[0]["params"]}
    for name, p in model.named_parameters():
        # The matmuls of GPT-2 are Conv1D (c_attn, c_proj, c_fc); their weights and only those decay.
        should = name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
        assert (id(p) in decayed) == should, name
    assert model.lm_head.weight is model.transformer.wte.weight
    assert id(model.lm_head.weight) not in decayed
    assert decay_audit(model).unclassified == []


@pytest.mark.parametrize("tied", [True, False])
def test_hf_llama_every_parameter_where_the_rule_says(tied):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=tied,
    )
    model = transformers.LlamaForCausalLM(config)
    groups = param_groups(model, 0.1)
    assert_each_trainable_param_once(model, groups)
    decayed = {id(p) for p in groups[0]["params"]}
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for name, p in model.named_parameters():
        should = name.endswith(tuple(f"{x}.weight" for x in projections)) or (
            name == "lm_head.weight" and not tied
        )
        assert (id(p) in decayed) == should, name
    reasons = {r.name: r for r in decay_audit(model).records}
    assert reasons["model.norm.weight"].reason == NORM
    assert reasons["model.norm.weight"].module_type == "LlamaRMSNorm"
    assert reasons["model.embed_tokens.weight"].reason == EMBEDDING


def test_custom_norm_frozen_and_unclassified_parameters():
    class FooRMSNorm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = FooRMSNorm(4)
            self.proj = nn.Linear(4, 4)
            self.frozen = nn.Linear(4, 4)
            self.frozen.requires_grad_(False)
            self.scale = nn.Parameter(torch.ones(4))

    model = Odd()
    groups = param_groups(model, 0.1)
    assert_each_trainable_param_once(model, groups)
    assert groups[0]["params"] == [model.proj.weight]
    audit = decay_audit(model)
    assert audit.unclassified == ["scale"]
    assert {r.name: r.reason for r in audit.records}["norm.weight"] == NORM
    assert "frozen.weight" not in {r.name for r in audit.records}
    assert "could not classify: scale" in audit.summary()
    assert "proj.weight" in audit.table() and "FooRMSNorm" in audit.table()


def test_decoupled_decay_shrinks_only_the_decay_group():
    model = TinyNanoGPT()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, wd = 0.5, 0.1
    optimizer, _ = build_optimizer(model, lr=lr, weight_decay=wd, warmup_steps=0)
    # Zero gradients: Adam's update m/(sqrt(v)+eps) is exactly 0, so only the decoupled decay acts:
    # p <- p * (1 - lr * wd) for the decay group, unchanged for the rest.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert decayed
    for name, p in model.named_parameters():
        if id(p) in decayed:
            torch.testing.assert_close(p.detach(), before[name] * (1 - lr * wd))
        else:
            assert torch.equal(p.detach(), before[name]), name


def test_build_optimizer_uses_fused_adamw_and_schedule():
    model = TinyNanoGPT()
    optimizer, schedule = build_optimizer(model, lr=1e-3, warmup_steps=10, max_steps=110, min_lr=1e-4)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["fused"] is True
    lrs = []
    for _ in range(111):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx(1e-4)  # warmup step 1 of 10
    assert lrs[9] == pytest.approx(1e-3)  # peak after warmup
    assert lrs[60] == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # half-way down the cosine
    assert lrs[110] == pytest.approx(1e-4)  # floor at min_lr
    assert all(a >= b - 1e-12 for a, b in zip(lrs[9:], lrs[10:]))


def test_fused_can_be_turned_off():
    optimizer, _ = build_optimizer(TinyNanoGPT(), lr=1e-3, fused=False)
    assert not optimizer.defaults["fused"] and optimizer.defaults["foreach"] is True


def lora_nanogpt(**unfreeze):
    """TinyNanoGPT with LoRA on its block matmuls (peft), the rest frozen except what ``unfreeze`` names."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = TinyNanoGPT()
    inject_adapter_in_model(
        LoraConfig(r=2, lora_alpha=4, target_modules=r"blocks\.\d\.(attn|proj|mlp\.0|mlp\.2)"), model
    )
    for name, p in model.named_parameters():
        if any(name.startswith(prefix) for prefix in unfreeze):
            p.requires_grad_(True)
    return model


def test_lora_adapters_are_their_own_group_and_frozen_parameters_are_listed_as_frozen():
    model = lora_nanogpt()
    groups = param_groups(model, 0.1, lora_weight_decay=0.02)
    assert_each_trainable_param_once(model, groups)
    decay, no_decay, lora = groups
    assert decay["params"] == [] and no_decay["params"] == []  # the base is frozen: in no group
    assert lora["weight_decay"] == 0.02
    adapters = {id(p) for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert {id(p) for p in lora["params"]} == adapters and len(
        adapters
    ) == 16  # 2 blocks x 4 matmuls x (A, B)
    audit = decay_audit(model)
    assert {r.reason for r in audit.records} == {LORA}
    frozen = {r.name: r for r in audit.frozen}
    assert set(frozen) == {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen["blocks.0.attn.base_layer.weight"].reason == FROZEN
    assert frozen["wte.weight"].numel == 50 * 8
    assert sum(r.numel for r in audit.records + audit.frozen) == sum(p.numel() for p in model.parameters())
    summary = audit.summary()
    assert "lora decay on 16 tensors" in summary and f"frozen: {len(frozen)} tensors" in summary
    assert "blocks.1.mlp.2.lora_B.default.weight" in audit.table() and "frozen (Linear)" in audit.table()


def test_golden_rule_still_holds_for_what_trains_beside_the_adapters():
    # A trained embedding (say, rows for new special tokens), a norm and a matmul weight left unfrozen.
    model = lora_nanogpt(**{"wte.": True, "ln_f.": True, "blocks.0.mlp.0.base_layer.weight": True})
    decay, no_decay, lora = param_groups(model, 0.1, lora_weight_decay=0.0)
    assert [id(p) for p in decay["params"]] == [id(model.blocks[0].mlp[0].base_layer.weight)]
    assert {id(p) for p in no_decay["params"]} == {
        id(model.wte.weight),  # the embedding, and the head tied to it: no decay
        id(model.ln_f.weight),
        id(model.ln_f.bias),
    }
    reasons = {r.name: r.reason for r in decay_audit(model).records}
    assert reasons["wte.weight"] == EMBEDDING and reasons["ln_f.weight"] == NORM
    assert reasons["blocks.0.mlp.0.base_layer.weight"] == DECAY
    assert all(reasons[n] == LORA for n in reasons if ".lora_" in n)


def test_lora_decay_is_decoupled_and_only_on_the_adapters():
    model = lora_nanogpt(**{"blocks.0.mlp.0.base_layer.weight": True, "ln_f.": True})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, wd, lora_wd = 0.5, 0.1, 0.3
    optimizer, _ = build_optimizer(model, lr=lr, weight_decay=wd, lora_weight_decay=lora_wd, warmup_steps=0)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)  # Adam's step is then 0: only the decoupled decay moves weights
    optimizer.step()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            expected = before[name] * (1 - lr * lora_wd)
        elif name == "blocks.0.mlp.0.base_layer.weight":
            expected = before[name] * (1 - lr * wd)
        else:
            expected = before[name]  # frozen, or a norm
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7, msg=name)
