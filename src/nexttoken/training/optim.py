"""AdamW with the Golden Rule of weight decay, its audit, and the learning-rate schedule.

The rule: decoupled weight decay pulls the weights of matmul layers (``nn.Linear`` and
Linear-like modules such as Hugging Face's ``Conv1D``) towards zero, and nothing else.
Biases, norms of any class, embeddings (and any weight tied to one, such as a tied output head)
and every parameter whose role cannot be told get ``weight_decay=0``: shrinking a norm's gain or
an embedding row towards zero is not regularization, it is damage.

Adapters (LoRA's A and B, see ``nexttoken.models.lora``) are a group of their own with their own
decay: decaying them pulls the update ``B A`` toward zero, i.e. the model toward its base, which is
a different regularizer from shrinking a weight. Frozen parameters are listed by the audit as frozen
and given to no optimizer group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from nexttoken.models.lora import LORA_WEIGHT_DECAY
from nexttoken.schedule import WarmupCosine

DECAY = "matmul weight"
BIAS = "bias"
NORM = "norm"
EMBEDDING = "embedding"
TIED = "tied to embedding"
UNCLASSIFIED = "unclassified (no decay)"
LORA = "lora adapter"
FROZEN = "frozen"

# The optimizer's param groups (empty ones are left out): matmul weights, the rest, LoRA adapters.
GROUP_NAMES = ("decay", "no_decay", "lora")

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = (*_NORM_TYPES, nn.RMSNorm)
_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)
_MATMUL_TYPES = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)


def _is_norm(module: nn.Module) -> bool:
    # Models bring their own norms (LlamaRMSNorm, T5LayerNorm, FooRMSNorm): recognise them by name too.
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def _is_matmul(module: nn.Module) -> bool:
    # Hugging Face's Conv1D is a Linear with a transposed weight; match it by name so that
    # transformers stays an optional import here.
    return isinstance(module, _MATMUL_TYPES) or type(module).__name__ == "Conv1D"


@dataclass(frozen=True)
class ParamRecord:
    name: str
    shape: tuple[int, ...]
    numel: int
    decay: bool  # in the matmul-weight group (``weight_decay``)
    reason: str
    module_type: str


@dataclass(frozen=True)
class DecayAudit:
    records: list[ParamRecord]  # every trainable parameter, in one of the optimizer's groups
    frozen: list[ParamRecord] = field(default_factory=list)  # requires_grad=False: in no group

    @property
    def unclassified(self) -> list[str]:
        return [r.name for r in self.records if r.reason == UNCLASSIFIED]

    @property
    def adapters(self) -> list[ParamRecord]:
        return [r for r in self.records if r.reason == LORA]

    def count(self, decay: bool) -> int:
        """Parameters in the matmul-decay group (True) or in the no-decay group (False; adapters,
        which have a group of their own, are in neither)."""
        return sum(r.numel for r in self.records if r.decay == decay and r.reason != LORA)

    def summary(self) -> str:
        decayed = [r for r in self.records if r.decay]
        kept = [r for r in self.records if not r.decay and r.reason != LORA]
        line = f"weight decay on {len(decayed)} tensors ({self.count(True):,} params, matmul weights); "
        if self.adapters:
            line += (
                f"lora decay on {len(self.adapters)} tensors "
                f"({sum(r.numel for r in self.adapters):,} params, adapters); "
            )
        line += f"none on {len(kept)} tensors ({self.count(False):,} params"
        reasons = sorted({r.reason for r in kept})
        if reasons:
            line += ": " + ", ".join(f"{sum(r.reason == x for r in kept)} {x}" for x in reasons)
        line += ")"
        if self.frozen:
            line += f"; frozen: {len(self.frozen)} tensors ({sum(r.numel for r in self.frozen):,} params)"
        if self.unclassified:
            line += f"; could not classify: {', '.join(self.unclassified)}"
        return line

    def table(self) -> str:
        rows = self.records + self.frozen
        width = max([len(r.name) for r in rows] + [9])
        lines = [f"{'parameter':<{width}}  {'shape':<16} {'count':>12}  decay  reason"]
        for r in rows:
            shape = "x".join(map(str, r.shape)) or "scalar"
            decay = "yes" if r.decay else "lora" if r.reason == LORA else "no"
            lines.append(
                f"{r.name:<{width}}  {shape:<16} {r.numel:>12,}  {decay:<5}  {r.reason} ({r.module_type})"
            )
        return "\n".join(lines)


def decay_audit(model: nn.Module) -> DecayAudit:
    """One record per parameter (shared parameters once): its group and why. Trainable ones are in
    ``records``, frozen ones (``requires_grad=False``) in ``frozen``."""
    from nexttoken.models.lora import adapter_parameter_ids

    embedding_weights = {
        id(m.weight): name for name, m in model.named_modules() if isinstance(m, _EMBEDDING_TYPES)
    }
    adapters = adapter_parameter_ids(model)
    owner: dict[int, tuple[nn.Module, str]] = {}
    for module in model.modules():
        for attr, param in module.named_parameters(recurse=False):
            owner.setdefault(id(param), (module, attr))

    records, frozen = [], []
    for name, param in model.named_parameters():  # deduplicates tied parameters
        module, attr = owner[id(param)]
        if not param.requires_grad:
            frozen.append(
                ParamRecord(name, tuple(param.shape), param.numel(), False, FROZEN, type(module).__name__)
            )
            continue
        if id(param) in adapters:
            reason = LORA
        elif id(param) in embedding_weights:
            # The first owner may be the tied output head; an embedding anywhere wins.
            reason = EMBEDDING if isinstance(module, _EMBEDDING_TYPES) else TIED
        elif _is_norm(module):
            reason = NORM
        elif attr == "bias" or name.endswith(".bias"):
            reason = BIAS
        elif _is_matmul(module) and attr == "weight":
            reason = DECAY
        else:
            reason = UNCLASSIFIED
        records.append(
            ParamRecord(
                name=name,
                shape=tuple(param.shape),
                numel=param.numel(),
                decay=reason == DECAY,
                reason=reason,
                module_type=type(module).__name__,
            )
        )
    return DecayAudit(records, frozen)


def param_groups(
    model: nn.Module, weight_decay: float, lora_weight_decay: float = LORA_WEIGHT_DECAY
) -> list[dict]:
    """torch optimizer groups: matmul weights with ``weight_decay``, everything else that trains with 0,
    and adapters (LoRA's A and B) with ``lora_weight_decay``. Frozen parameters are in none.
    Each group has a ``name`` (``decay``, ``no_decay``, ``lora``: ``GROUP_NAMES``), which the logs use
    (``train/lr_<name>``)."""
    params = dict(model.named_parameters())
    audit = decay_audit(model)
    decay = [params[r.name] for r in audit.records if r.decay]
    no_decay = [params[r.name] for r in audit.records if not r.decay and r.reason != LORA]
    adapters = [params[r.name] for r in audit.adapters]
    return [
        {"name": GROUP_NAMES[0], "params": decay, "weight_decay": weight_decay},
        {"name": GROUP_NAMES[1], "params": no_decay, "weight_decay": 0.0},
        {"name": GROUP_NAMES[2], "params": adapters, "weight_decay": lora_weight_decay},
    ]


def group_name(group: dict, index: int) -> str:
    """The name of an optimizer's param group: its ``name`` (:func:`param_groups`), or ``group<index>``
    for a group without one (an optimizer restored from a checkpoint written before groups had names)."""
    return str(group.get("name") or f"group{index}")


def _fused_supported(params: list[torch.Tensor]) -> bool:
    return all(p.device.type in ("cpu", "cuda", "mps") and p.is_floating_point() for p in params)


def build_optimizer(
    model: nn.Module,
    *,
    lr: float = 3e-4,
    weight_decay: float = 0.1,
    lora_weight_decay: float = LORA_WEIGHT_DECAY,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    warmup_steps: int = 100,
    max_steps: int | None = 10_000,
    min_lr: float | None = None,
    fused: bool | None = None,
    clock: Callable[[], float] | None = None,
) -> tuple[torch.optim.AdamW, WarmupCosine]:
    """AdamW over the Golden Rule groups (fused kernel where torch has one, unless ``fused=False``)
    + warmup/cosine (``nexttoken.schedule``: over ``max_steps``, or the ``clock``, or both).

    ``lr`` is the peak learning rate, reached after ``warmup_steps`` optimizer steps; the cosine ends at
    ``min_lr`` (an absolute rate; default ``lr / 10``) at the end of the steps or the clock.
    ``weight_decay`` applies to matmul weights only; ``lora_weight_decay`` is the adapters' own decay
    (LoRA runs). The schedule is stepped once per optimizer step.
    """
    groups = [g for g in param_groups(model, weight_decay, lora_weight_decay) if g["params"]]
    all_params = [p for g in groups for p in g["params"]]
    if not all_params:
        raise ValueError("the model has no trainable parameters")
    # Fused AdamW is several times faster than foreach on CPU too; foreach is the fallback.
    use_fused = _fused_supported(all_params) if fused is None else fused
    kind = {"fused": True} if use_fused else {"foreach": True}
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kind)
    min_lr_ratio = (lr / 10 if min_lr is None else min_lr) / lr if lr > 0 else 0.0
    schedule = WarmupCosine(
        optimizer, warmup_steps=warmup_steps, max_steps=max_steps, min_lr_ratio=min_lr_ratio, clock=clock
    )
    return optimizer, schedule
