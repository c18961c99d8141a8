"""One loader for every model nexttoken can score, sample or export: a nexttoken checkpoint
(``.ckpt``), a local Hugging Face model folder, or a ``.gguf`` file, on a chosen device and dtype."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from nexttoken.errors import UserError
from nexttoken.models.protocol import CausalLM

if TYPE_CHECKING:
    from nexttoken.data.tokenizers import Tokenizer
    from nexttoken.module import CausalLMModule

DType = Literal["auto", "float32", "bfloat16", "float16"]
DTYPE_CHOICES: tuple[str, ...] = DType.__args__


def is_hf_model(spec: str) -> bool:
    """True when ``spec`` names a Hugging Face model (a folder or a .gguf file), not a GPT preset."""
    return spec.endswith(".gguf") or Path(spec).expanduser().is_dir()


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:1``, ..."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown --device {device!r}; use auto, cpu or cuda") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
    return resolved


def resolve_eval_dtype(dtype: DType | str, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU (exact, and fast enough), bfloat16 on GPUs that have it."""
    from nexttoken.models.hf import resolve_dtype

    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return resolve_dtype(dtype)


def load_module(path: str | Path, map_location: str = "cpu") -> CausalLMModule:
    """A nexttoken checkpoint as its LightningModule, in eval mode (no pickled code runs)."""
    from nexttoken.checkpoints import read_checkpoint
    from nexttoken.module import CausalLMModule

    read_checkpoint(path)  # one clear line for a missing, truncated or corrupted file
    module = CausalLMModule.load_from_checkpoint(path, map_location=map_location, weights_only=True)
    module.eval()
    return module


def load_model(
    path: str, *, dtype: DType | str = "auto", device: str = "auto", trust_remote_code: bool = False
) -> tuple[CausalLM, Tokenizer]:
    """``(model, tokenizer)`` from a nexttoken checkpoint (``.ckpt``), a local HF folder or a ``.gguf``."""
    target = Path(path).expanduser()
    if not target.exists():
        raise UserError(
            f"MODEL not found: {target}; pass a nexttoken checkpoint (.ckpt), a Hugging Face model folder "
            "or a .gguf file"
        )
    dev = resolve_device(device)
    torch_dtype = resolve_eval_dtype(dtype, dev)
    if target.is_file() and target.suffix == ".ckpt":
        module = load_module(target)
        model, tokenizer = module.model.to(device=dev, dtype=torch_dtype), module.tokenizer
    else:
        from nexttoken.models.hf import load_hf_causal_lm

        model, tokenizer = load_hf_causal_lm(target, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        model = model.to(dev)
    model.eval()
    return model, tokenizer
