"""One loader for every model nexttoken can score, sample or export: a nexttoken checkpoint
(``.ckpt``), a local Hugging Face model folder, or a ``.gguf`` file, on a chosen device and dtype,
optionally with a LoRA adapter (a LoRA run's checkpoint or a PEFT adapter folder) on top."""

from __future__ import annotations

import warnings
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
ADAPTER_HELP = "a LoRA adapter to apply to MODEL: a LoRA run's checkpoint (.ckpt) or a PEFT adapter folder"


def is_hf_model(spec: str) -> bool:
    """True when ``spec`` names a Hugging Face model (a folder or a .gguf file), not a GPT preset."""
    return spec.endswith(".gguf") or Path(spec).expanduser().is_dir()


def is_checkpoint(spec: str) -> bool:
    """True when ``spec`` is a nexttoken checkpoint file (``.ckpt``)."""
    return spec.endswith(".ckpt") and Path(spec).expanduser().is_file()


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


def load_module(
    path: str | Path, map_location: str = "cpu", base: str | Path | None = None
) -> CausalLMModule:
    """A nexttoken checkpoint as its LightningModule, in eval mode (no pickled code runs).

    ``base``: for a LoRA run's checkpoint, the base model to put its adapter on (default: the path the
    run recorded); it must be the same weights (sha256), or this is a one-line error.
    """
    from nexttoken.checkpoints import read_checkpoint
    from nexttoken.module import CausalLMModule

    checkpoint = read_checkpoint(path)  # one clear line for a missing, truncated or corrupted file
    overrides = {}
    if base is not None:
        if "lora" not in checkpoint:
            raise UserError(
                f"--adapter {path} is a checkpoint of a run that trained every weight, not a LoRA run; "
                f"evaluate it on its own (MODEL = {path})"
            )
        overrides["model"] = str(base)
    elif "lora" in checkpoint and not Path(checkpoint["lora"]["base_model"]).expanduser().exists():
        raise UserError(
            f"{path} is a LoRA adapter for {checkpoint['lora']['base_model']}, which is not there any more; "
            f"pass the base model and the adapter: BASE --adapter {path}"
        )
    with warnings.catch_warnings():
        # A LoRA checkpoint holds the adapters only, by design; the module checks that they all fit.
        warnings.filterwarnings(
            "ignore", message="Found keys that are in the model state dict but not in the"
        )
        module = CausalLMModule.load_from_checkpoint(
            path, map_location=map_location, weights_only=True, **overrides
        )
    module.eval()
    return module


def load_model(
    path: str,
    *,
    dtype: DType | str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    adapter: str | None = None,
) -> tuple[CausalLM, Tokenizer]:
    """``(model, tokenizer)`` from a nexttoken checkpoint (``.ckpt``), a local HF folder or a ``.gguf``;
    ``adapter``: a LoRA run's checkpoint or a PEFT adapter folder to apply to it (trained on it)."""
    target = Path(path).expanduser()
    if not target.exists():
        raise UserError(
            f"MODEL not found: {target}; pass a nexttoken checkpoint (.ckpt), a Hugging Face model folder "
            "or a .gguf file"
        )
    adapter_path = None if adapter is None else Path(adapter).expanduser()
    if adapter_path is not None and not adapter_path.exists():
        raise UserError(
            f"--adapter {adapter_path} not found; pass a LoRA run's checkpoint (.ckpt) or a PEFT adapter folder"
        )
    dev = resolve_device(device)
    torch_dtype = resolve_eval_dtype(dtype, dev)
    if adapter_path is not None and adapter_path.is_file():
        # A LoRA checkpoint: its own module builds the base from MODEL and checks it is the right one.
        module = load_module(adapter_path, base=target)
        model, tokenizer = module.model, module.tokenizer
    elif target.is_file() and target.suffix == ".ckpt":
        module = load_module(target)
        model, tokenizer = module.model, module.tokenizer
    else:
        from nexttoken.models.hf import load_hf_causal_lm

        model, tokenizer = load_hf_causal_lm(target, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if adapter_path is not None and adapter_path.is_dir():
        from nexttoken.models.lora import apply_adapter_folder

        apply_adapter_folder(model, adapter_path, base=target)
    model = model.to(device=dev, dtype=torch_dtype)
    model.eval()
    return model, tokenizer
