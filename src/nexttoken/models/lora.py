"""LoRA adapters (Hu et al. 2021) on any nexttoken model, with ``peft``.

A LoRA layer keeps a frozen matmul ``W`` and learns a low-rank update: ``y = W x + (alpha / r) B A x``
with ``A`` (r x in) random and ``B`` (out x r) zero at the start, so training begins at the base model.
``peft`` provides the layers; this module decides where they go and keeps the run honest:

* :func:`attach_lora` injects them *inside* the network (the built-in ``GPT`` itself, or the
  ``transformers`` model inside :class:`~nexttoken.models.hf.HFCausalLM`), so the network keeps its
  :class:`~nexttoken.models.protocol.CausalLM` face; every base parameter is frozen.
* :func:`adapter_parameter_ids` tells the optimizer's audit which parameters are adapters.
* :func:`adapter_state` / :func:`load_adapter_state` move the adapter's tensors, in ``peft``'s naming.
* :func:`save_adapter_folder` / :func:`apply_adapter_folder` write and read a PEFT adapter folder
  (``adapter_config.json`` + ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained``
  loads; adapters of the built-in GPT use the names of its Hugging Face export (GPT-2).
* :func:`merge_lora` folds ``(alpha / r) B A`` into ``W`` and removes the adapter layers.
* :func:`hold_base_weights`: the frozen base weights in bf16 while bf16 autocast trains the adapters.
* :func:`weights_fingerprint`: the sha256 of the base model's weights file(s), which an adapter
  carries so that it is never applied to another base.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from nexttoken.errors import UserError, setting
from nexttoken.models.protocol import CausalLM

if TYPE_CHECKING:
    from peft import LoraConfig

ADAPTER_NAME = "default"  # peft's name for a model's only adapter
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT's adapter files name tensors as seen from a PeftModel: base_model (LoraModel) -> model (the network).
PEFT_PREFIX = "base_model.model."
# Which base an adapter folder was trained on; PEFT's own files have no place for a fingerprint.
BASE_FILE = "adapter_base.json"
_HASH_CHUNK = 1 << 20


# The adapters' own decoupled weight decay (it pulls the update toward zero, i.e. the model toward its
# base): what the LoRA paper's GPT-2 runs (Hu et al. 2021, microsoft/LoRA) and torchtune's LoRA recipes
# use; docs/lora.md has the measurement behind keeping it.
LORA_WEIGHT_DECAY = 0.01


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """LoRA's settings: one object from the command line (the ``model.lora`` setting, ``lora: {r: 16}``
    in a config) through the LightningModule to the checkpoint, which keeps them as plain values.

    Args:
        r: the rank of the update ``B A``.
        alpha: the update is scaled by ``alpha / r``; default ``2 * r``.
        dropout: dropout on the adapter's input, in [0, 1).
        targets: module names to adapt (exact, or the last part of a dotted name, as ``peft`` matches
            them); default every matmul of the blocks (attention and MLP projections), not the head.
        weight_decay: the adapters' decoupled weight decay (their own optimizer group).
    """

    r: int
    alpha: float | None = None
    dropout: float = 0.0
    targets: list[str] | None = None
    weight_decay: float = LORA_WEIGHT_DECAY

    def __post_init__(self) -> None:
        # Resolved once, so that the run's hyperparameters and checkpoints say what was used. (Checked
        # by check(), not here: jsonargparse builds this object while it reads the command line, and an
        # error raised here would reach the user as its own "does not validate" message.)
        if isinstance(self.r, int) and self.alpha is None:
            object.__setattr__(self, "alpha", float(2 * self.r))
        if self.targets:
            object.__setattr__(self, "targets", list(self.targets))

    def check(self) -> LoraSettings:
        """These settings, if they can be used; a one-line :class:`UserError` naming the setting if not."""
        r, alpha, targets = self.r, self.alpha, self.targets
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise UserError(f"{setting('model.lora.r')} must be a positive rank (e.g. 8 or 16), got {r!r}")
        if alpha <= 0:
            raise UserError(f"{setting('model.lora.alpha')} must be positive, got {alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"{setting('model.lora.dropout')} must be in [0, 1), got {self.dropout!r}")
        if targets is not None and (
            isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets)
        ):
            raise UserError(
                f"{setting('model.lora.targets')} must be module names such as [q_proj, v_proj], got {targets!r}"
            )
        if self.weight_decay < 0:
            raise UserError(f"{setting('model.lora.weight_decay')} must be >= 0, got {self.weight_decay!r}")
        return self

    @property
    def scale(self) -> float:
        """The factor of the update: ``alpha / r``."""
        return self.alpha / self.r

    def to_dict(self) -> dict:
        """Plain values (what a checkpoint keeps: safe loading refuses objects of other classes)."""
        return dataclasses.asdict(self)

    @classmethod
    def of(cls, value: LoraSettings | Mapping | None) -> LoraSettings | None:
        """``value`` as checked settings: given as they are, or from a checkpoint's plain values."""
        if value is None:
            return None
        return (value if isinstance(value, LoraSettings) else cls(**value)).check()

    @classmethod
    def from_hyperparameters(cls, values: Mapping) -> LoraSettings | None:
        """The settings a run's hyperparameters hold (None when every weight trained); checkpoints
        written before the settings were one object keep them as ``lora_r``, ``lora_alpha`` ..."""
        if values.get("lora") is not None:
            return cls.of(values["lora"])
        if values.get("lora_r") is None:
            return None
        old = {"alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "lora_targets"}
        return cls(
            values["lora_r"], **{k: values[v] for k, v in old.items() if values.get(v) is not None}
        ).check()


# --------------------------------------------------------------------------- where the adapters go
def adapted_network(network: CausalLM) -> nn.Module:
    """The module whose layers the adapters replace: a ``transformers`` model inside ``HFCausalLM``,
    nexttoken's ``GPT`` itself. Its names are the ones ``peft``, PEFT folders and ``transformers`` use."""
    from nexttoken.models.hf import HFCausalLM

    return network.model if isinstance(network, HFCausalLM) else network


def _is_linear(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a Linear with a transposed weight; peft adapts both.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _adaptable(module: nn.Module) -> bool:
    return _is_linear(module) or isinstance(module, (nn.Embedding, nn.modules.conv._ConvNd))


def default_targets(network: CausalLM) -> list[str]:
    """The last name part of every Linear/Conv1D module except the output head: the attention and
    MLP projections of a decoder (``c_attn, c_fc, c_proj`` for GPT and GPT-2; ``q_proj ... down_proj``
    for Llama-like models)."""
    head = network.lm_head
    names = {
        name.rpartition(".")[2]
        for name, module in adapted_network(network).named_modules()
        if _is_linear(module) and module is not head
    }
    return sorted(names)


def _lora_config(settings: LoraSettings, network: CausalLM) -> LoraConfig:
    from peft import LoraConfig

    targets = list(settings.targets) if settings.targets else default_targets(network)
    conv1d = any(type(m).__name__ == "Conv1D" for m in adapted_network(network).modules())
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        fan_in_fan_out=conv1d,  # Conv1D stores W as (in, out); peft must know to merge it right
        bias="none",
    )


def attach_lora(network: CausalLM, settings: LoraSettings | LoraConfig) -> list[str]:
    """Put LoRA layers into ``network`` in place and freeze everything else; returns the adapted
    modules' names. Raises :class:`UserError` when the targets match no module (naming the ones that
    exist) or a module peft cannot adapt, or when the head that is tied to the input embedding is
    targeted (merging its update would change the embedding too)."""
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import check_target_module_exists

    config = _lora_config(settings, network) if isinstance(settings, LoraSettings) else settings
    inner = adapted_network(network)
    matched = [name for name, _ in inner.named_modules() if name and check_target_module_exists(config, name)]
    if not matched:
        targets = config.target_modules
        targets = targets if isinstance(targets, str) else ", ".join(sorted(targets))
        existing = sorted({n.rpartition(".")[2] for n, m in inner.named_modules() if _adaptable(m)})
        raise UserError(
            f"the LoRA targets ({setting('model.lora.targets')}) {targets} match no module of the model; its "
            f"matmul and embedding modules are: {', '.join(existing)}"
        )
    embeddings = {id(m.weight) for m in inner.modules() if isinstance(m, nn.Embedding)}
    for name in matched:
        module = inner.get_submodule(name)
        if _is_linear(module) and id(module.weight) in embeddings:
            raise UserError(
                f"{setting('model.lora.targets')}: {name} shares its weight with the input embedding (a tied "
                "head), so its update could not be merged without changing the embedding; leave it out of "
                "the targets"
            )
    try:
        inject_adapter_in_model(config, inner, adapter_name=ADAPTER_NAME)
    except (ValueError, TypeError) as error:
        raise UserError(f"{setting('model.lora.targets')}: {str(error).splitlines()[0]}") from None
    return matched


def adapter_parameter_ids(model: nn.Module) -> set[int]:
    """``id()`` of every adapter parameter (LoRA's A and B, or any other peft tuner's own tensors)."""
    if "peft" not in sys.modules:  # no peft layer can exist unless peft was imported; keep plain runs light
        return set()
    from peft.tuners.tuners_utils import BaseTunerLayer

    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for attr in module.adapter_layer_names:
                ids.update(id(p) for p in getattr(module, attr).parameters())
    return ids


def describe_modules(names: Sequence[str]) -> list[str]:
    """Adapted module names, compacted by their layer number: ``model.layers.{0-29}.self_attn.q_proj``."""
    groups: dict[str, list[int]] = {}
    for name in names:
        match = re.search(r"(^|\.)(\d+)(\.|$)", name)
        if match is None:
            groups.setdefault(name, [])
            continue
        pattern = name[: match.start(2)] + "{}" + name[match.end(2) :]
        groups.setdefault(pattern, []).append(int(match.group(2)))
    lines = []
    for pattern, numbers in groups.items():
        if not numbers:
            lines.append(pattern)
            continue
        numbers = sorted(numbers)
        contiguous = numbers == list(range(numbers[0], numbers[-1] + 1))
        span = (
            f"{numbers[0]}-{numbers[-1]}" if contiguous and len(numbers) > 1 else ",".join(map(str, numbers))
        )
        lines.append(pattern.replace("{}", "{" + span + "}"))
    return lines


# --------------------------------------------------------------------------- adapter tensors
def adapter_state(network: CausalLM) -> dict[str, Tensor]:
    """The adapter's tensors, named as ``peft`` saves them (``...q_proj.lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(adapted_network(network), adapter_name=ADAPTER_NAME)


def load_adapter_state(network: CausalLM, state: dict[str, Tensor], source: str) -> None:
    """Copy an adapter's tensors (``peft`` naming) into ``network``'s adapter layers; every adapter
    tensor must be given, with the right shape, and nothing else."""
    from peft import set_peft_model_state_dict

    expected = set(adapter_state(network))
    given = {k.removeprefix(PEFT_PREFIX) for k in state}
    if given != expected:
        missing, extra = sorted(expected - given), sorted(given - expected)
        detail = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise UserError(
            f"adapter {source} does not fit this base model ({detail}, {len(missing)} missing, "
            f"{len(extra)} unexpected); use the base model it was trained on"
        )
    try:
        set_peft_model_state_dict(adapted_network(network), state, adapter_name=ADAPTER_NAME)
    except RuntimeError as error:
        shapes = re.search(r"size mismatch for ([^:]+): .*", str(error))
        detail = shapes.group(0).splitlines()[0] if shapes else str(error).splitlines()[0]
        raise UserError(
            f"adapter {source} does not fit this base model ({detail}); use the base model it was trained on"
        ) from None


def hold_base_weights(network: CausalLM, dtype: torch.dtype) -> int:
    """Cast the frozen base weights of the adapted layers to ``dtype`` in place; returns how many
    elements were cast. Under bf16 autocast every matmul rounds an fp32 weight to bf16 anyway (the
    same round-to-nearest as ``.to(torch.bfloat16)``), so holding them in bf16 changes no result of a
    training step and saves their fp32 copies and the cast per step; outside autocast the layers need
    them back in fp32."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    cast = 0
    for module in adapted_network(network).modules():
        if isinstance(module, BaseTunerLayer):
            weight = module.get_base_layer().weight
            weight.data = weight.data.to(dtype)
            cast += weight.numel()
    return cast


def merge_lora(network: CausalLM) -> None:
    """Fold each adapter's update into its base weight (``W += alpha / r · B A``) and put the plain
    base layer back, in place: the network computes what it computed with the adapter, at no extra cost."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    inner = adapted_network(network)
    layers = [(name, m) for name, m in inner.named_modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise UserError("there is no adapter to merge: the model has no LoRA layers")
    for name, layer in layers:
        layer.merge(safe_merge=True, adapter_names=[ADAPTER_NAME])  # safe: refuses NaN/inf weights
        parent, _, child = name.rpartition(".")
        setattr(inner.get_submodule(parent), child, layer.get_base_layer())
    del inner.peft_config
    for p in inner.parameters():
        p.requires_grad_(True)


# --------------------------------------------------------------------------- the base's fingerprint
def weights_files(base: str | Path) -> list[Path]:
    """The file(s) that hold a base model's weights: a ``.ckpt`` or ``.gguf`` file itself, or a Hugging
    Face folder's ``*.safetensors`` / ``pytorch_model*.bin`` (sorted by name)."""
    from nexttoken.models.hf import WEIGHT_PATTERNS

    path = Path(base).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"base model {path} not found; pass the base model the adapter was trained on")
    files = sorted({f for pattern in WEIGHT_PATTERNS if "index" not in pattern for f in path.glob(pattern)})
    if not files:
        raise UserError(f"{path} holds no weights (*.safetensors or pytorch_model*.bin)")
    return files


def weights_fingerprint(base: str | Path) -> str:
    """sha256 of the base model's weights file (of the files one after another, for a sharded folder)."""
    digest = hashlib.sha256()
    for file in weights_files(base):
        with open(file, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def check_fingerprint(saved: dict, base: str | Path, adapter: str, actual: str | None = None) -> None:
    """A one-line error when ``base`` is not the model that ``adapter`` (words naming it) was trained on;
    ``saved``: ``{"base_model": path, "sha256": ...}`` as the adapter recorded them."""
    actual = actual or weights_fingerprint(base)
    if actual != saved["sha256"]:
        raise UserError(
            f"{adapter} was trained on another base model ({saved['base_model']}, weights sha256 "
            f"{saved['sha256'][:12]}…) than {base} (sha256 {actual[:12]}…); pass the base model it was trained on"
        )


# --------------------------------------------------------------------------- PEFT adapter folders
def _folder_names(network: CausalLM) -> tuple[Callable[[str], str], Callable[[str], str]]:
    """(to folder names, from folder names): the built-in GPT's adapters are saved under the names of
    its Hugging Face export (GPT-2), so that PEFT applies them to that export; others keep theirs."""
    from nexttoken.models.gpt import GPT
    from nexttoken.models.gpt2 import from_gpt2_name, to_gpt2_name

    if isinstance(network, GPT):
        return to_gpt2_name, from_gpt2_name
    return (lambda name: name), (lambda name: name)


def save_adapter_folder(network: CausalLM, folder: Path, *, base: str, fingerprint: str) -> None:
    """Write ``network``'s adapter into ``folder`` as PEFT does (``adapter_config.json``,
    ``adapter_model.safetensors``), plus ``adapter_base.json`` (the base's path and sha256)."""
    from safetensors.torch import save_file

    from nexttoken.io import write_atomically
    from nexttoken.models.gpt import GPT

    rename, _ = _folder_names(network)
    config = adapted_network(network).peft_config[ADAPTER_NAME]
    targets = config.target_modules
    config = dataclasses.replace(
        config,
        target_modules=targets if isinstance(targets, str) else sorted(map(rename, targets)),
        base_model_name_or_path=str(base),
        task_type="CAUSAL_LM",
        inference_mode=True,
        # GPT-2's projections are Conv1D (W stored as (in, out)): merging there must transpose.
        fan_in_fan_out=config.fan_in_fan_out or isinstance(network, GPT),
    )
    config.save_pretrained(str(folder))
    tensors = {PEFT_PREFIX + rename(k): v.detach().contiguous() for k, v in adapter_state(network).items()}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    write_atomically(
        folder / BASE_FILE, json.dumps({"base_model": str(base), "sha256": fingerprint}, indent=2)
    )


def is_adapter_folder(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def apply_adapter_folder(network: CausalLM, folder: str | Path, base: str | Path) -> list[str]:
    """Attach the LoRA adapter saved in a PEFT folder to ``network`` (loaded from ``base``); returns
    the adapted modules' names. A folder nexttoken wrote also checks the base's fingerprint."""
    from peft import LoraConfig, PeftConfig
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not is_adapter_folder(folder):
        raise UserError(
            f"{setting('adapter')} {folder}: no {ADAPTER_CONFIG} there; pass a PEFT adapter folder or a .ckpt"
        )
    if (folder / BASE_FILE).is_file():
        try:
            recorded = json.loads((folder / BASE_FILE).read_text(encoding="utf-8"))
            saved = {"sha256": recorded["sha256"], "base_model": recorded["base_model"]}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise UserError(
                f"{setting('adapter')} {folder}: {BASE_FILE} is damaged; export the adapter again"
            ) from None
        check_fingerprint(saved, base, f"adapter {folder}")
    try:
        config = PeftConfig.from_pretrained(str(folder))
    except (ValueError, TypeError, OSError, json.JSONDecodeError) as error:
        raise UserError(
            f"{setting('adapter')} {folder}: {ADAPTER_CONFIG} is not a valid PEFT config ({error})"
        ) from None
    if not isinstance(config, LoraConfig):
        raise UserError(
            f"{setting('adapter')} {folder} is a {config.peft_type} adapter; nexttoken loads LoRA adapters"
        )
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"{setting('adapter')} {folder}: {ADAPTER_WEIGHTS} is missing")
    try:
        state = load_file(str(folder / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError) as error:
        raise UserError(f"{setting('adapter')} {folder}: {ADAPTER_WEIGHTS} is unreadable ({error})") from None
    _, from_folder = _folder_names(network)
    targets = config.target_modules
    if not isinstance(targets, str):
        targets = sorted(map(from_folder, targets))
    conv1d = any(type(m).__name__ == "Conv1D" for m in adapted_network(network).modules())
    config = dataclasses.replace(config, target_modules=targets, inference_mode=False, fan_in_fan_out=conv1d)
    matched = attach_lora(network, config)
    load_adapter_state(
        network, {from_folder(k.removeprefix(PEFT_PREFIX)): v for k, v in state.items()}, str(folder)
    )
    return matched


@contextlib.contextmanager
def adapters_off(network: nn.Module) -> Iterator[None]:
    """Within the block, every adapter of ``network`` is switched off: the base model alone (the
    frozen reference of preference tuning, with no second copy of the weights)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in network.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
