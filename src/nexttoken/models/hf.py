"""Adapter for Hugging Face causal LMs: a local model folder or a single ``.gguf`` file.

Nothing is ever fetched from the Hub: every load is ``local_files_only=True``, and a model's own
Python code (``trust_remote_code``) runs only when the user asks for it.

``HFCausalLM`` gives a Hugging Face ``AutoModelForCausalLM`` the same face as nexttoken's GPT (the
:class:`~nexttoken.models.protocol.CausalLM` protocol): ``forward(input_ids) -> logits``,
``hidden(input_ids)`` plus ``lm_head`` for the fused loss, ``max_context``, ``flops_per_token`` and
``generate``. It calls the model WITHOUT ``labels``: Hugging Face shifts labels inside the model,
while nexttoken's targets are already shifted (:func:`nexttoken.data.packing.shift`, the one shift).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from nexttoken.errors import UserError, setting
from nexttoken.models.masking import branch_mask, branch_positions, document_positions
from nexttoken.models.protocol import CausalLM, evaluating

if TYPE_CHECKING:
    from nexttoken.data.tokenizers import Tokenizer

WEIGHT_PATTERNS = (
    "*.safetensors",
    "pytorch_model*.bin",
    "*.safetensors.index.json",
    "pytorch_model*.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model", "spiece.model")
GGUF_MAGIC = b"GGUF"
# Config fields of models whose logits are NOT a plain ``lm_head(hidden)``: softcapping or scaling.
_LOGIT_POSTPROCESSING = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier_scale",
)
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``None`` -> float32; a torch dtype or one of the names in ``DTYPES``."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of: float32, bfloat16, float16")
    return DTYPES[dtype]


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM behind nexttoken's model interface.

    Attributes:
        model: the wrapped ``PreTrainedModel`` itself (its real modules, e.g. ``LlamaRMSNorm`` or
            ``Conv1D``, are what the optimizer's parameter groups and the decay audit see).
        name: where it was loaded from (for printing).
    """

    def __init__(self, model: nn.Module, name: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.name = name or getattr(model.config, "_name_or_path", None) or type(model).__name__
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._document_masking_checked = False
        self.train(model.training)  # mirror the wrapped model's mode (a new nn.Module says "training")

    @property
    def config(self):
        return self.model.config

    @property
    def max_context(self) -> int | None:
        """The longest input the model accepts (``max_position_embeddings`` / ``n_positions``)."""
        config = self.model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def lm_head(self) -> nn.Module:
        """The output projection (an ``nn.Linear``, possibly tied to the input embedding)."""
        head = self.model.get_output_embeddings()
        if head is None:
            raise TypeError(f"{type(self.model).__name__} has no output embeddings (not a causal LM head)")
        return head

    @property
    def logits_are_linear(self) -> bool:
        """True when ``lm_head(hidden(x))`` equals ``forward(x)`` (no logit softcapping or scaling),
        i.e. when the fused linear+cross-entropy loss may replace the plain one."""
        config = self.model.config
        for key in _LOGIT_POSTPROCESSING:
            value = getattr(config, key, None)
            if value is not None and value != 1 and value != 1.0:
                return False
        return isinstance(self.model.get_output_embeddings(), nn.Linear)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        logits_to_keep: int = 0,
        document_ids: Tensor | None = None,
    ) -> Tensor:
        """Logits ``(B, T, V)`` for every input position (no labels, no shift, no KV cache).

        ``logits_to_keep=k > 0`` returns only the last ``k`` positions' logits ``(B, k, V)``; the
        others are never projected onto the vocabulary (what sliding-window evaluation needs).
        ``document_ids``: packed documents kept apart (see :meth:`_document_kwargs`).
        """
        kwargs = self._document_kwargs(input_ids, attention_mask, document_ids)
        if logits_to_keep and self._keeps_logits:
            kwargs["logits_to_keep"] = logits_to_keep
        out = self.model(input_ids=input_ids, use_cache=False, **kwargs)
        logits = out.logits
        if logits_to_keep and logits.size(1) != logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return logits

    def hidden(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        document_ids: Tensor | None = None,
        segments: Tensor | None = None,
    ) -> Tensor:
        """Final hidden states ``(B, T, C)`` (after the last norm): ``lm_head(hidden)`` are the logits
        whenever :attr:`logits_are_linear`. ``segments``: a shared context and its branches, given to
        the model as a 4-D additive attention mask and position ids (a model whose attention ignores
        such a mask is found out by :func:`nexttoken.scoring.core.packs_branches`)."""
        if segments is not None:
            dtype = self.lm_head.weight.dtype
            allowed = branch_mask(segments)
            mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
            mask.masked_fill_(~allowed, torch.finfo(dtype).min)
            kwargs = {"attention_mask": mask, "position_ids": branch_positions(segments)}
        else:
            kwargs = self._document_kwargs(input_ids, attention_mask, document_ids)
        out = self.model.base_model(input_ids=input_ids, use_cache=False, **kwargs)
        return out[0]  # last_hidden_state

    # ----------------------------------------------------------------- packed documents
    def _document_kwargs(
        self, input_ids: Tensor, attention_mask: Tensor | None, document_ids: Tensor | None
    ) -> dict:
        """The model's keyword arguments for a (possibly packed) batch.

        Packed documents are given to the model the way transformers' own padding-free training
        does it (``DataCollatorWithFlattening``): ``position_ids`` that restart at 0 at each document
        and NO ``attention_mask``. transformers then keeps attention inside each run of positions:
        flash-attention 2/3 through ``cu_seqlens``, and sdpa, eager and flex attention through the
        block-diagonal mask that ``masking_utils.create_causal_mask`` builds from the restarts
        (tested here with sdpa and eager on Llama and GPT-2 under transformers 5). Older
        transformers versions, and models whose code builds its own mask, ignore the restarts, so
        whether this model really keeps documents apart is checked once, on the first packed batch
        (:meth:`_check_document_masking`): a model that lets them see each other is refused, never
        trained on cross-talk.
        """
        if document_ids is None:
            return {"attention_mask": attention_mask}
        if document_ids.shape != input_ids.shape:
            raise ValueError(
                f"document_ids {tuple(document_ids.shape)} must have the shape of input_ids {tuple(input_ids.shape)}"
            )
        if not self._document_masking_checked:
            self._check_document_masking(input_ids.device)
        return {"position_ids": document_positions(document_ids)}

    @torch.no_grad()
    def _check_document_masking(self, device: torch.device) -> None:
        """Run two short random documents packed and alone; refuse the model if the second one's
        logits depend on the first (attention crossed the boundary)."""
        from transformers import __version__ as transformers_version

        generator = torch.Generator().manual_seed(0)
        vocab = self.model.get_output_embeddings().weight.shape[0]
        first = torch.randint(0, vocab, (1, 7), generator=generator).to(device)
        second = torch.randint(0, vocab, (1, 5), generator=generator).to(device)
        positions = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0).to(device)
        device_type = device.type if device.type in ("cuda", "cpu") else "cpu"
        # In fp32 where every weight is fp32; a LoRA base held in bf16 (or a half-precision model)
        # needs autocast to that dtype for its matmuls to run at all.
        half = {p.dtype for p in self.model.parameters()} - {torch.float32}
        autocast = torch.autocast(
            device_type=device_type, dtype=min(half, key=str) if half else None, enabled=bool(half)
        )
        with evaluating(self.model), autocast:
            packed = self.model(
                input_ids=torch.cat([first, second], 1), position_ids=positions, use_cache=False
            )
            alone = self.model(input_ids=second, use_cache=False)
        packed, alone = packed.logits[0, 7:].float(), alone.logits[0].float()
        # fp32 agrees to ~1e-6 of the logits' scale; half precision to ~1e-2. Attention that crosses
        # the boundary moves the logits far more than either (a real model by whole units).
        tolerance = (5e-2 if half else 1e-4) * (1.0 + alone.abs().max().item())
        if (packed - alone).abs().max().item() > tolerance:
            implementation = getattr(self.model.config, "_attn_implementation", None) or "default"
            raise UserError(
                f"{self.name} cannot keep packed examples apart: with attn_implementation {implementation!r} "
                f"(transformers {transformers_version}) the second of two packed examples sees the first; use "
                "a transformers version whose masks follow position_ids (5.x does, with sdpa, eager, "
                f"flex_attention or flash_attention_2), or turn packing off ({setting('data.packing')} false)"
            )
        self._document_masking_checked = True

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: ``6 N + 12 n_layer d_model seq_len`` (PaLM's convention), with
        N = all parameters minus the input (and position) embedding tables, plus the output head's
        matmul when it is tied to the input embedding (a lookup table once, a matmul once)."""
        params = {id(p): p for p in self.model.parameters()}
        embeddings = {id(m.weight) for m in self.model.modules() if isinstance(m, nn.Embedding)}
        n = sum(p.numel() for p in params.values()) - sum(
            params[i].numel() for i in embeddings if i in params
        )
        if id(self.lm_head.weight) in embeddings:
            n += self.lm_head.weight.numel()
        config = self.model.config
        n_layer = _config_int(config, "num_hidden_layers", "n_layer", "num_layers")
        d_model = _config_int(config, "hidden_size", "n_embd", "d_model")
        attention = 12 * n_layer * d_model * seq_len if n_layer and d_model else 0
        return int(6 * n + attention)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sampling with the model's own ``generate`` (its KV cache), never past ``max_context``
        tokens in all. transformers takes no ``torch.Generator``: a given one seeds torch's global
        generator instead."""
        if self.max_context is not None:
            max_new_tokens = min(max_new_tokens, max(0, self.max_context - input_ids.shape[1]))
        if max_new_tokens == 0:
            return input_ids
        if generator is not None:
            torch.manual_seed(int(generator.initial_seed()))
        with evaluating(self):
            return self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=temperature > 0,
                temperature=temperature or None,
                top_k=top_k,
                eos_token_id=eos_id,
                pad_token_id=eos_id,
            )


def _config_int(config, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def as_causal_lm(model: nn.Module) -> CausalLM:
    """``model`` itself when it is a :class:`CausalLM`; a bare ``transformers`` causal LM wrapped in
    :class:`HFCausalLM`."""
    if isinstance(model, CausalLM):
        return model
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return HFCausalLM(model)
    raise TypeError(f"{type(model).__name__} is neither a nexttoken CausalLM nor a transformers model")


# --------------------------------------------------------------------------- loading
def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def _check_folder(folder: Path) -> None:
    """Say exactly which of config.json / weights / tokenizer a model folder is missing."""
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append("tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    if missing:
        raise UserError(
            f"{folder} is not a complete Hugging Face model folder: missing {', '.join(missing)}; "
            "save one with model.save_pretrained(folder) and tokenizer.save_pretrained(folder)"
        )
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(
            f"{folder / 'config.json'} is not valid JSON ({_first_line(e)}); re-save the model"
        ) from None
    if not isinstance(config, dict) or ("model_type" not in config and "architectures" not in config):
        raise UserError(
            f"{folder / 'config.json'} does not describe a model (no model_type); point at a model folder"
        )


def _check_gguf(path: Path) -> None:
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise UserError(
                f"{path} is not a GGUF file (it does not start with 'GGUF'); pass a real .gguf model"
            )


def _forget_gguf_quantization(model: nn.Module) -> None:
    """transformers dequantizes a GGUF file into ordinary float weights but keeps a "gguf quantizer"
    attached, which makes ``save_pretrained`` refuse the model; the weights are plain floats, so
    drop it (exported folders and adapters then save as for any model)."""
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.is_quantized = False


def load_hf_causal_lm(
    path: str | Path, *, dtype: str | torch.dtype | None = None, trust_remote_code: bool = False
) -> tuple[HFCausalLM, Tokenizer]:
    """``(HFCausalLM, nexttoken Tokenizer)`` from a local model folder (config.json + weights + tokenizer) or a
    ``.gguf`` file (dequantized; the tokenizer comes from the same file). Never touches the Hub.

    ``dtype``: ``None`` (float32), a torch dtype, or ``"float32"``/``"bfloat16"``/``"float16"``.
    Raises :class:`UserError` for a missing path, an incomplete folder (naming what is missing), or
    something that is not a causal LM.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nexttoken.data.tokenizers import from_transformers

    path = Path(path).expanduser()
    torch_dtype = resolve_dtype(dtype)
    if not path.exists():
        raise UserError(f"model path not found: {path}; pass a local model folder or a .gguf file")
    if path.is_dir():
        _check_folder(path)
        source, extra = str(path), {}
    elif path.suffix.lower() == ".gguf":
        _check_gguf(path)
        source, extra = str(path.parent), {"gguf_file": path.name}
    else:
        raise UserError(
            f"{path} is neither a Hugging Face model folder nor a .gguf file; "
            "pass a folder with config.json and weights, or a .gguf file"
        )
    common = dict(local_files_only=True, trust_remote_code=trust_remote_code, **extra)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **common)
    except (ValueError, OSError, KeyError, TypeError, RuntimeError, ImportError) as e:
        message = _first_line(e)
        if "trust_remote_code" in str(e) and not trust_remote_code:
            raise UserError(
                f"{path} needs its own Python code to load; if you trust it, pass "
                f"{setting('trust_remote_code')}"
            ) from None
        raise UserError(f"could not load a causal language model from {path}: {message}") from None
    model = model.to(torch_dtype)
    if "gguf_file" in extra:
        _forget_gguf_quantization(model)
    if model.get_output_embeddings() is None:
        raise UserError(f"{path} has no language-model head ({type(model).__name__}); use a causal LM")
    return HFCausalLM(model, name=str(path)).eval(), from_transformers(tokenizer, str(path))


def chat_tokenizer_of(model_path: str | Path, trust_remote_code: bool = False):
    """The ``transformers`` tokenizer of a Hugging Face folder or GGUF file, if it has a chat
    template; None for anything else (a nexttoken checkpoint keeps no chat template)."""
    from transformers import AutoTokenizer

    path = Path(model_path).expanduser()
    if path.is_dir():
        source, extra = path, {}
    elif path.suffix.lower() == ".gguf" and path.is_file():
        source, extra = path.parent, {"gguf_file": path.name}
    else:
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, local_files_only=True, trust_remote_code=trust_remote_code, **extra
        )
    except (OSError, ValueError):
        return None
    return tokenizer if getattr(tokenizer, "chat_template", None) else None
