"""``nexttoken export CHECKPOINT OUT_DIR``: a Hugging Face folder (config.json, safetensors
weights, tokenizer) that ``transformers`` and ``nexttoken eval`` load without nexttoken's code.

The built-in GPT maps exactly onto ``GPT2LMHeadModel`` (pre-norm blocks, learned positions, tied
head, exact GELU, LayerNorm eps 1e-5; GPT-2's Conv1D stores Linear weights transposed, and a GPT
built without biases exports zero biases). A fine-tuned Hugging Face model is saved as itself.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from nexttoken.errors import UserError
from nexttoken.io import atomic_folder


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

    copy("transformer.wte.weight", src["wte.weight"])
    copy("transformer.wpe.weight", src["wpe.weight"])
    for i in range(c.n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for norm in ("ln_1", "ln_2"):
            copy(f"{theirs}{norm}.weight", src[f"{ours}{norm}.weight"])
            copy(f"{theirs}{norm}.bias", bias(f"{ours}{norm}.bias", c.n_embd))
        for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            weight = src[f"{ours}{layer}.weight"]
            copy(f"{theirs}{layer}.weight", weight.t())  # Conv1D is (in, out)
            copy(f"{theirs}{layer}.bias", bias(f"{ours}{layer}.bias", weight.shape[0]))
    copy("transformer.ln_f.weight", src["ln_f.weight"])
    copy("transformer.ln_f.bias", bias("ln_f.bias", c.n_embd))
    hf.load_state_dict(dst, strict=False)  # lm_head.weight is tied to wte
    hf.tie_weights()
    return hf.eval()


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write ``checkpoint`` as a Hugging Face folder ``out_dir`` (new or empty); nothing is left
    behind on failure. The tokenizer starts documents as the model was trained
    (:meth:`nexttoken.data.tokenizers.Tokenizer.save`)."""
    from nexttoken.models.gpt import GPT
    from nexttoken.models.load import load_module

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(
            f"{out_dir} already exists and is not empty; choose a new folder (nothing was written)"
        )
    module = load_module(checkpoint)
    if module.tokenizer is None:
        raise UserError(f"{checkpoint} carries no tokenizer; it was not written by nexttoken fit")
    hf = gpt_to_gpt2(module.model, module.tokenizer) if isinstance(module.model, GPT) else module.model.model
    with atomic_folder(out_dir) as staging:
        hf.save_pretrained(staging, safe_serialization=True)
        module.tokenizer.save(staging)
    return out_dir


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a nexttoken checkpoint (.ckpt)")
    parser.add_argument("out_dir", help="a new folder for the Hugging Face model")


def run_export(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.checkpoint, args.out_dir)
    print(f"exported {args.checkpoint} to {out} (config.json, model.safetensors, tokenizer.json)")
    return 0
