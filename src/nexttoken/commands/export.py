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

from nexttoken.commands.spelling import tool_flag
from nexttoken.errors import UserError
from nexttoken.io import atomic_folder


def spell(setting: str) -> str:
    """How ``nexttoken export`` writes a setting an error names (``merge`` is ``--merge``)."""
    return tool_flag(setting)


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, merge: bool = False) -> str:
    """Write ``checkpoint`` into ``out_dir`` (new or empty); nothing is left behind on failure. Returns
    what was written. A whole model: a Hugging Face folder whose tokenizer starts documents as the model
    was trained (:meth:`nexttoken.data.tokenizers.Tokenizer.save`). A LoRA run: a PEFT adapter folder,
    or with ``merge`` the whole model with the adapter merged in."""
    from nexttoken.models.gpt import GPT
    from nexttoken.models.gpt2 import gpt_to_gpt2
    from nexttoken.models.load import load_checkpoint
    from nexttoken.models.lora import merge_lora, save_adapter_folder

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(
            f"{out_dir} already exists and is not empty; choose a new folder (nothing was written)"
        )
    loaded = load_checkpoint(checkpoint)
    if loaded.tokenizer is None:
        raise UserError(f"{checkpoint} carries no tokenizer; it was not written by nexttoken fit")
    if merge and loaded.lora is None:
        raise UserError(
            f"--merge: {checkpoint} is not a LoRA run (it holds every weight already); export it without --merge"
        )
    if loaded.lora is not None and not merge:
        with atomic_folder(out_dir) as staging:
            save_adapter_folder(
                loaded.network, staging, base=loaded.base_model, fingerprint=loaded.base_fingerprint
            )
        return "a PEFT adapter: adapter_config.json, adapter_model.safetensors"
    network = loaded.network
    if merge:
        merge_lora(network)
    hf = gpt_to_gpt2(network, loaded.tokenizer) if isinstance(network, GPT) else network.model
    with atomic_folder(out_dir) as staging:
        hf.save_pretrained(staging, safe_serialization=True)
        loaded.tokenizer.save(staging)
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
