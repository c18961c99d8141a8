"""``nexttoken export CHECKPOINT OUT_DIR``: a Hugging Face folder (config.json, safetensors
weights, tokenizer) that ``transformers`` and ``nexttoken eval`` load without nexttoken's code.

A LoRA run's checkpoint exports as a PEFT adapter folder (``adapter_config.json``,
``adapter_model.safetensors``) for ``peft.PeftModel.from_pretrained(base, OUT_DIR)``, or with
``--merge`` as a whole model folder with the adapter folded into the weights.

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


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, merge: bool = False) -> str:
    """Write ``checkpoint`` into ``out_dir`` (new or empty); nothing is left behind on failure. Returns
    what was written. A whole model: a Hugging Face folder whose tokenizer starts documents as the model
    was trained (:meth:`nexttoken.data.tokenizers.Tokenizer.save`). A LoRA run: a PEFT adapter folder,
    or with ``merge`` the whole model with the adapter merged in."""
    from nexttoken.models.gpt import GPT
    from nexttoken.models.load import load_module
    from nexttoken.models.lora import merge_lora, save_adapter_folder

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(
            f"{out_dir} already exists and is not empty; choose a new folder (nothing was written)"
        )
    module = load_module(checkpoint)
    if module.tokenizer is None:
        raise UserError(f"{checkpoint} carries no tokenizer; it was not written by nexttoken fit")
    if merge and module.lora is None:
        raise UserError(
            f"--merge: {checkpoint} is not a LoRA run (it holds every weight already); export it without --merge"
        )
    if module.lora is not None and not merge:
        with atomic_folder(out_dir) as staging:
            save_adapter_folder(
                module.model, staging, base=module.hparams.model, fingerprint=module.base_fingerprint
            )
        return "a PEFT adapter: adapter_config.json, adapter_model.safetensors"
    network = module.model
    if merge:
        merge_lora(network)
    hf = gpt_to_gpt2(network, module.tokenizer) if isinstance(network, GPT) else network.model
    with atomic_folder(out_dir) as staging:
        hf.save_pretrained(staging, safe_serialization=True)
        module.tokenizer.save(staging)
    return "config.json, model.safetensors, tokenizer.json" + (" (the adapter merged in)" if merge else "")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a nexttoken checkpoint (.ckpt)")
    parser.add_argument("out_dir", help="a new folder for the Hugging Face model (or PEFT adapter)")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="a LoRA run: write the whole model with the adapter merged in, not the adapter alone",
    )


def run_export(args: argparse.Namespace) -> int:
    written = export_checkpoint(args.checkpoint, args.out_dir, merge=args.merge)
    print(f"exported {args.checkpoint} to {args.out_dir} ({written})")
    return 0
