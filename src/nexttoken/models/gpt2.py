"""The built-in GPT as Hugging Face's ``GPT2LMHeadModel``: the names of its modules there, and a model
that computes exactly what the GPT computes (pre-norm blocks, learned positions, tied head, exact
GELU, LayerNorm eps 1e-5; GPT-2's Conv1D stores Linear weights transposed, and a GPT built without
biases gets zero biases)."""

from __future__ import annotations

import torch


def to_gpt2_name(name: str) -> str:
    """The name of a built-in GPT module or parameter in its GPT-2 export: ``blocks.3.attn.c_attn`` ->
    ``transformer.h.3.attn.c_attn``, ``wte.weight`` -> ``transformer.wte.weight``; others unchanged."""
    first, _, rest = name.partition(".")
    if first == "blocks":
        return f"transformer.h.{rest}"
    if first in ("wte", "wpe", "ln_f"):
        return f"transformer.{name}"
    return name


def from_gpt2_name(name: str) -> str:
    """The inverse of :func:`to_gpt2_name`."""
    if name.startswith("transformer.h."):
        return "blocks." + name.removeprefix("transformer.h.")
    return name.removeprefix("transformer.")


def gpt_to_gpt2(network, tokenizer):
    """A ``GPT2LMHeadModel`` computing exactly what nexttoken's ``GPT`` computes."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = network.config
    config = GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_inner=4 * c.n_embd,
        activation_function="gelu",
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_id,
        eos_token_id=tokenizer.eos_id,
    )
    hf = GPT2LMHeadModel(config)
    src = network.state_dict()
    dst = hf.state_dict()

    def copy(target: str, value: torch.Tensor) -> None:
        if dst[target].shape != value.shape:
            raise RuntimeError(
                f"export: {target} has shape {tuple(dst[target].shape)}, got {tuple(value.shape)}"
            )
        dst[target] = value.detach().clone()

    def bias(name: str, size: int) -> torch.Tensor:
        return src.get(name, torch.zeros(size))

    copy(to_gpt2_name("wte.weight"), src["wte.weight"])
    copy(to_gpt2_name("wpe.weight"), src["wpe.weight"])
    for i in range(c.n_layer):
        ours = f"blocks.{i}."
        theirs = to_gpt2_name(ours)
        for norm in ("ln_1", "ln_2"):
            copy(f"{theirs}{norm}.weight", src[f"{ours}{norm}.weight"])
            copy(f"{theirs}{norm}.bias", bias(f"{ours}{norm}.bias", c.n_embd))
        for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            weight = src[f"{ours}{layer}.weight"]
            copy(f"{theirs}{layer}.weight", weight.t())  # Conv1D is (in, out)
            copy(f"{theirs}{layer}.bias", bias(f"{ours}{layer}.bias", weight.shape[0]))
    copy(to_gpt2_name("ln_f.weight"), src["ln_f.weight"])
    copy(to_gpt2_name("ln_f.bias"), bias("ln_f.bias", c.n_embd))
    hf.load_state_dict(dst, strict=False)  # lm_head.weight is tied to wte
    hf.tie_weights()
    return hf.eval()
