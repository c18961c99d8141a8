"""One loader for every model nexttoken can score, sample or export: a nexttoken checkpoint
(``.ckpt``), a local Hugging Face model folder, or a ``.gguf`` file, on a chosen device and dtype,
optionally with a LoRA adapter (a LoRA run's checkpoint or a PEFT adapter folder) on top."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from nexttoken.errors import UserError, setting
from nexttoken.models.protocol import CausalLM

if TYPE_CHECKING:
    from nexttoken.data.tokenizers import Tokenizer
    from nexttoken.models.lora import LoraSettings

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
        raise UserError(f"unknown {setting('device')} {device!r}; use auto, cpu or cuda") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"{setting('device')} cuda: no CUDA device is available here; use {setting('device')} cpu"
        )
    return resolved


def resolve_eval_dtype(dtype: DType | str, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU (exact, and fast enough), bfloat16 on GPUs that have it."""
    from nexttoken.models.hf import resolve_dtype

    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return resolve_dtype(dtype)


GPT_SHAPE = ("block_size", "n_layer", "n_head", "n_embd")


def build_network(settings: Mapping[str, Any]) -> CausalLM:
    """The network a run's model settings describe, as its source gives it: a GPT preset (random
    weights; ``vocab_size``, ``dropout``, ``attn_dropout``, ``bias`` and any of ``block_size``/``n_layer``/``n_head``/
    ``n_embd`` set), or a Hugging Face folder / GGUF file (its pretrained weights), in train mode.
    A nexttoken checkpoint as the source is :func:`load_checkpoint`'s."""
    model = settings["model"]
    if is_hf_model(model):
        from nexttoken.models.hf import load_hf_causal_lm

        network, _ = load_hf_causal_lm(model, trust_remote_code=settings.get("trust_remote_code", False))
        return network.train()  # loaded for inference (eval mode); training keeps modes as it finds them
    from nexttoken.models.gpt import GPT, GPTConfig

    overrides = {k: settings[k] for k in GPT_SHAPE if settings.get(k) is not None}
    config = GPTConfig.from_preset(
        model,
        settings["vocab_size"],
        dropout=settings.get("dropout", 0.0),
        attn_dropout=settings.get("attn_dropout"),
        bias=settings.get("bias", False),
        **overrides,
    )
    return GPT(config)


@dataclass
class Checkpoint:
    """A nexttoken checkpoint's model, read without the code that trained it.

    ``settings``: the run's model settings (its hyperparameters); ``lora``: the adapters' settings of a
    LoRA run (None when every weight trained), applied to ``base_model`` whose weights have the sha256
    ``base_fingerprint``; ``lora_modules``: the adapted modules.
    """

    network: CausalLM
    tokenizer: Tokenizer | None
    settings: dict[str, Any]
    lora: LoraSettings | None = None
    base_model: str | None = None
    base_fingerprint: str | None = None
    lora_modules: list[str] = field(default_factory=list)


def load_checkpoint(path: str | Path, base: str | Path | None = None) -> Checkpoint:
    """A nexttoken checkpoint (``.ckpt``): its network with the saved weights, in eval mode, and its
    tokenizer. No pickled code runs.

    ``base``: for a LoRA run's checkpoint, the base model to put its adapter on (default: the path the
    run recorded); it must be the same weights (sha256), or this is a one-line error.
    """
    from nexttoken.checkpoints import read_checkpoint
    from nexttoken.data.tokenizers import Tokenizer

    checkpoint = read_checkpoint(path)  # one clear line for a missing, truncated or corrupted file
    settings = dict(checkpoint.get("hyper_parameters") or {})
    saved_lora = checkpoint.get("lora")
    if base is not None:
        if saved_lora is None:
            raise UserError(
                f"{setting('adapter')} {path} is a checkpoint of a run that trained every weight, not a LoRA "
                f"run; evaluate it on its own (MODEL = {path})"
            )
        settings["model"] = str(base)
    elif saved_lora is not None and not Path(saved_lora["base_model"]).expanduser().exists():
        raise UserError(
            f"{path} is a LoRA adapter for {saved_lora['base_model']}, which is not there any more; pass the "
            f"base model and the adapter: BASE {setting('adapter')} {path}"
        )
    if "model" not in settings:
        raise UserError(f"{path} records no model settings; pass a .ckpt written by nexttoken fit")
    tokenizer = Tokenizer.from_dict(checkpoint["tokenizer"]) if "tokenizer" in checkpoint else None
    if is_checkpoint(settings["model"]):  # the run started from another checkpoint: its shape is that one's
        network = load_checkpoint(settings["model"]).network
    else:
        network = build_network(settings)
    state = {
        k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")
    }
    result = Checkpoint(network, tokenizer, settings)
    if saved_lora is not None:
        from nexttoken.models.lora import LoraSettings, attach_lora, check_fingerprint

        result.lora = LoraSettings.from_hyperparameters(settings)
        result.base_model = str(settings["model"])
        result.base_fingerprint = saved_lora["sha256"]
        result.lora_modules = attach_lora(network, result.lora)
        check_fingerprint(saved_lora, settings["model"], "the checkpoint's adapter")
        trainable = {name for name, p in network.named_parameters() if p.requires_grad}
        if set(state) != trainable:
            raise UserError(
                f"{path}: its adapters do not fit the model its settings describe "
                f"({len(trainable - set(state))} missing, {len(set(state) - trainable)} unexpected)"
            )
        network.load_state_dict(state, strict=False)
    else:
        network.load_state_dict(state)
    network.eval()
    return result


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
            f"{setting('adapter')} {adapter_path} not found; pass a LoRA run's checkpoint (.ckpt) or a PEFT "
            "adapter folder"
        )
    dev = resolve_device(device)
    torch_dtype = resolve_eval_dtype(dtype, dev)
    if adapter_path is not None and adapter_path.is_file():
        # A LoRA checkpoint: the base is built from MODEL and checked to be the right one.
        loaded = load_checkpoint(adapter_path, base=target)
        model, tokenizer = loaded.network, loaded.tokenizer
    elif target.is_file() and target.suffix == ".ckpt":
        loaded = load_checkpoint(target)
        model, tokenizer = loaded.network, loaded.tokenizer
    else:
        from nexttoken.models.hf import load_hf_causal_lm

        model, tokenizer = load_hf_causal_lm(target, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if adapter_path is not None and adapter_path.is_dir():
        from nexttoken.models.lora import apply_adapter_folder

        apply_adapter_folder(model, adapter_path, base=target)
    model = model.to(device=dev, dtype=torch_dtype)
    model.eval()
    return model, tokenizer
