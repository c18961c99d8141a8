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

Muon (``optimizer="muon"``) takes the hidden matrices: the 2-D weights of ``nn.Linear`` / ``Conv1D``
layers inside the network (attention and MLP projections), which are exactly the decay group less the
output head. Muon orthogonalizes each matrix's update, which is meaningful for a map between two
hidden spaces and not for a lookup table (an embedding's rows are independent) nor for the output head
(its rows are per-token classifiers, and Muon's authors and Moonlight both keep it on AdamW). Those,
the norms and the biases stay with AdamW in the groups above; the audit says for each parameter which
optimizer has it and why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from nexttoken.models.lora import LORA_WEIGHT_DECAY
from nexttoken.schedule import WarmupCosine
from nexttoken.training.muon import BatchedMuon

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
# With Muon: its groups, the hidden matrices (decayed by weight_decay) and, only when asked, the adapters.
MUON_GROUP_NAMES = ("muon", "muon_lora")

OptimizerName = Literal["adamw", "muon"]
MuonAdjustLR = Literal["match_rms_adamw", "original"]
# Muon's defaults. Momentum 0.95 with Nesterov and 5 Newton-Schulz steps are Keller Jordan's (and
# torch's); both Keller's Muon and Moonlight use them. The per-matrix learning-rate scale is
# Moonlight's ("Muon is Scalable for LLM Training", torch's adjust_lr_fn="match_rms_adamw":
# lr x 0.2 sqrt(max(A, B))), which gives the update the RMS of an AdamW update, so Muon takes AdamW's
# learning rate and weight decay as they are (--model.lr's defaults by what trains keep their meaning),
# and which is symmetric in the matrix's two sides: Hugging Face's Conv1D stores GPT-2's weights
# transposed (in x out), and Keller's "original" scale sqrt(max(1, A/B)) would give GPT-2's c_fc
# another step than the same layer as nn.Linear. With "original", the learning rate is Keller's 0.02.
MUON_MOMENTUM = 0.95
MUON_ADJUST_LR: MuonAdjustLR = "match_rms_adamw"
MUON_ORIGINAL_LR = 0.02
MUON = "muon"
ADAMW = "adamw"
MUON_WHY = "hidden matrix (2-D matmul weight)"

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
    optimizer: str = ADAMW  # which optimizer updates it: "adamw" or "muon"
    optimizer_reason: str = "optimizer adamw"  # why that one


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

    def optimizer_split(self) -> str:
        """Which tensors Muon and AdamW each get, counted by why: ``muon on 24 tensors (...)``."""
        muon = [r for r in self.records if r.optimizer == MUON]
        adamw = [r for r in self.records if r.optimizer == ADAMW]
        line = f"muon on {len(muon)} tensors ({sum(r.numel for r in muon):,} params"
        muon_reasons = sorted({r.optimizer_reason for r in muon})
        line += ": " + ", ".join(muon_reasons) if muon_reasons else ""
        line += f"); adamw on {len(adamw)} tensors ({sum(r.numel for r in adamw):,} params"
        reasons = sorted({r.optimizer_reason for r in adamw})
        if reasons:
            line += ": " + ", ".join(f"{sum(r.optimizer_reason == x for r in adamw)} {x}" for x in reasons)
        return line + ")"

    def table(self) -> str:
        rows = self.records + self.frozen
        width = max([len(r.name) for r in rows] + [9])
        lines = [f"{'parameter':<{width}}  {'shape':<16} {'count':>12}  decay  reason{'':<30}  optimizer"]
        for r in rows:
            shape = "x".join(map(str, r.shape)) or "scalar"
            decay = "yes" if r.decay else "lora" if r.reason == LORA else "no"
            reason = f"{r.reason} ({r.module_type})"
            optimizer = "-" if r.reason == FROZEN else f"{r.optimizer}: {r.optimizer_reason}"
            lines.append(
                f"{r.name:<{width}}  {shape:<16} {r.numel:>12,}  {decay:<5}  {reason:<36}  {optimizer}"
            )
        return "\n".join(lines)


def _output_head_weights(model: nn.Module) -> set[int]:
    """``id()`` of the output head's weight: a module named ``lm_head`` (nexttoken's GPT, Hugging Face's
    ``*ForCausalLM``, inside a peft wrapper too) or what a Hugging Face model calls its output embeddings."""
    ids = set()
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "lm_head" and isinstance(getattr(module, "weight", None), torch.Tensor):
            ids.add(id(module.weight))
        get_output = getattr(module, "get_output_embeddings", None)
        if callable(get_output):
            try:
                head = get_output()
            except (NotImplementedError, AttributeError):  # a base model without a head
                head = None
            if isinstance(getattr(head, "weight", None), torch.Tensor):
                ids.add(id(head.weight))
    return ids


def _adamw_why(reason: str, param: torch.Tensor, is_head: bool) -> str:
    """Why a trainable parameter stays with AdamW in a Muon run."""
    if is_head and reason in (DECAY, TIED, EMBEDDING):
        return "output head" if reason == DECAY else "embedding (tied output head)"
    if reason == DECAY:  # a matmul weight that is not one matrix (a convolution's kernel, Bilinear)
        return f"matmul weight, {param.ndim}-D"
    if reason == LORA:
        return "lora adapter (low-rank factor)"
    return reason


def decay_audit(
    model: nn.Module, optimizer: OptimizerName = ADAMW, muon_adapters: bool = False
) -> DecayAudit:
    """One record per parameter (shared parameters once): its group and why, and which optimizer
    updates it and why (``optimizer="muon"``: the hidden matrices go to Muon, everything else to AdamW;
    ``muon_adapters``: LoRA's A and B to Muon too). Trainable ones are in ``records``, frozen ones
    (``requires_grad=False``) in ``frozen``."""
    from nexttoken.models.lora import adapter_parameter_ids

    embedding_weights = {
        id(m.weight): name for name, m in model.named_modules() if isinstance(m, _EMBEDDING_TYPES)
    }
    heads = _output_head_weights(model) if optimizer == MUON else set()
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
        which, why = ADAMW, f"optimizer {ADAMW}"
        if optimizer == MUON:
            hidden_matrix = (
                reason == DECAY
                and param.ndim == 2
                and id(param) not in heads
                and (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D")
            )
            if hidden_matrix:
                which, why = MUON, MUON_WHY
            elif reason == LORA and muon_adapters and param.ndim == 2:
                which, why = MUON, "lora adapter (asked for)"
            else:
                why = _adamw_why(reason, param, id(param) in heads)
        records.append(
            ParamRecord(
                name=name,
                shape=tuple(param.shape),
                numel=param.numel(),
                decay=reason == DECAY,
                reason=reason,
                module_type=type(module).__name__,
                optimizer=which,
                optimizer_reason=why,
            )
        )
    return DecayAudit(records, frozen)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lora_weight_decay: float = LORA_WEIGHT_DECAY,
    optimizer: OptimizerName = ADAMW,
    muon_adapters: bool = False,
) -> list[dict]:
    """torch optimizer groups: matmul weights with ``weight_decay``, everything else that trains with 0,
    and adapters (LoRA's A and B) with ``lora_weight_decay``. Frozen parameters are in none.
    Each group has a ``name`` (``decay``, ``no_decay``, ``lora``: ``GROUP_NAMES``), which the logs use
    (``train/lr_<name>``). With ``optimizer="muon"`` two more follow, for Muon (``MUON_GROUP_NAMES``):
    the hidden matrices (taken out of ``decay``, same ``weight_decay``) and, with ``muon_adapters``, the
    adapters (taken out of ``lora``, same ``lora_weight_decay``); each group has ``optimizer`` then."""
    params = dict(model.named_parameters())
    audit = decay_audit(model, optimizer, muon_adapters)

    def pick(records: list[ParamRecord], which: str) -> list[torch.Tensor]:
        return [params[r.name] for r in records if r.optimizer == which]

    decay = [r for r in audit.records if r.decay]
    no_decay = [r for r in audit.records if not r.decay and r.reason != LORA]
    groups = [
        {"name": GROUP_NAMES[0], "params": pick(decay, ADAMW), "weight_decay": weight_decay},
        {"name": GROUP_NAMES[1], "params": pick(no_decay, ADAMW), "weight_decay": 0.0},
        {"name": GROUP_NAMES[2], "params": pick(audit.adapters, ADAMW), "weight_decay": lora_weight_decay},
    ]
    if optimizer == MUON:
        groups += [
            {"name": MUON_GROUP_NAMES[0], "params": pick(decay, MUON), "weight_decay": weight_decay},
            {
                "name": MUON_GROUP_NAMES[1],
                "params": pick(audit.adapters, MUON),
                "weight_decay": lora_weight_decay,
            },
        ]
        for group in groups:
            group["optimizer"] = MUON if group["name"] in MUON_GROUP_NAMES else ADAMW
    return groups


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon on the hidden matrices and AdamW on everything else, as ONE torch optimizer.

    Why one object and not two: Lightning drives two optimizers only under manual optimization, which
    would take over from automatic optimization everything it does for every run (gradient
    accumulation, clipping, mixed-precision scaling, stepping the schedule, the non-finite guard, the
    optimizer state in checkpoints). Wrapping both keeps all of that as it is for AdamW:
    ``param_groups`` is AdamW's groups then Muon's (the very same dicts, so the schedule's per-group
    scaling of ``lr`` reaches both), ``state`` is one dict both write into (their parameters are
    disjoint), so torch's own ``state_dict`` / ``load_state_dict`` save and restore both exactly; ``step``
    runs the closure (Lightning's forward and backward) once, then AdamW's step and Muon's.

    It cannot skip a non-finite step inside its kernel (Muon has no ``found_inf``), so it does not
    claim ``_step_supports_amp_scaling``: the non-finite guard checks on the host each step, and
    Lightning clips and unscales (fp16) the gradients itself.
    """

    def __init__(self, adamw: torch.optim.AdamW, muon: torch.optim.Muon) -> None:
        self.adamw, self.muon = adamw, muon
        super().__init__([*adamw.param_groups, *muon.param_groups], {})
        self._link()

    def _link(self) -> None:
        # After torch's load_state_dict, param_groups and state are new objects: hand them back.
        n = len(self.adamw.param_groups)
        self.adamw.param_groups, self.muon.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.adamw.state = self.muon.state = self.state

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.adamw.step()
        self.muon.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()


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
    optimizer: OptimizerName = ADAMW,
    muon_lr: float | None = None,
    muon_momentum: float = MUON_MOMENTUM,
    muon_adjust_lr: MuonAdjustLR = MUON_ADJUST_LR,
    muon_adapters: bool = False,
) -> tuple[torch.optim.Optimizer, WarmupCosine]:
    """AdamW over the Golden Rule groups (fused kernel where torch has one, unless ``fused=False``)
    + warmup/cosine (``nexttoken.schedule``: over ``max_steps``, or the ``clock``, or both).

    ``lr`` is the peak learning rate, reached after ``warmup_steps`` optimizer steps; the cosine ends at
    ``min_lr`` (an absolute rate; default ``lr / 10``) at the end of the steps or the clock.
    ``weight_decay`` applies to matmul weights only; ``lora_weight_decay`` is the adapters' own decay
    (LoRA runs). The schedule is stepped once per optimizer step.

    ``optimizer="muon"``: the hidden matrices go to ``torch.optim.Muon`` (batched by shape,
    :class:`~nexttoken.training.muon.BatchedMuon`; peak ``muon_lr``, by default
    ``lr`` with Moonlight's per-matrix scale, or 0.02 with ``muon_adjust_lr="original"``; Nesterov
    momentum ``muon_momentum``; decoupled ``weight_decay`` as AdamW's) and the rest to AdamW, in one
    :class:`MuonWithAdamW`. The schedule scales both by the same factor. ``muon_adapters`` gives LoRA's
    A and B to Muon too (off: they stay with AdamW, see docs/training.md). With nothing for one of the
    two to train (say, LoRA adapters only), the other is returned alone.
    """
    groups = [
        g
        for g in param_groups(model, weight_decay, lora_weight_decay, optimizer, muon_adapters)
        if g["params"]
    ]
    all_params = [p for g in groups for p in g["params"]]
    if not all_params:
        raise ValueError("the model has no trainable parameters")
    adamw_groups = [g for g in groups if g.get("optimizer", ADAMW) == ADAMW]
    muon_groups = [g for g in groups if g.get("optimizer") == MUON]
    built = []
    if adamw_groups:
        adamw_params = [p for g in adamw_groups for p in g["params"]]
        # Fused AdamW is several times faster than foreach on CPU too; foreach is the fallback.
        use_fused = _fused_supported(adamw_params) if fused is None else fused
        kind = {"fused": True} if use_fused else {"foreach": True}
        built.append(torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, **kind))
    if muon_groups:
        if muon_lr is None:
            muon_lr = MUON_ORIGINAL_LR if muon_adjust_lr == "original" else lr
        built.append(
            BatchedMuon(
                muon_groups, lr=muon_lr, momentum=muon_momentum, nesterov=True, adjust_lr_fn=muon_adjust_lr
            )
        )
    built_optimizer = built[0] if len(built) == 1 else MuonWithAdamW(*built)
    min_lr_ratio = (lr / 10 if min_lr is None else min_lr) / lr if lr > 0 else 0.0
    schedule = WarmupCosine(
        built_optimizer,
        warmup_steps=warmup_steps,
        max_steps=max_steps,
        min_lr_ratio=min_lr_ratio,
        clock=clock,
    )
    return built_optimizer, schedule
