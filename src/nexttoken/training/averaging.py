"""Weight averaging: an exponential moving average of the weights during training (Lightning's
``EMAWeightAveraging``), and the average of several checkpoints' weights (``nexttoken average``).

With the EMA on, every validation and the final report score the averaged weights (Lightning swaps
them in for each validation and copies them into the model when training ends), and each checkpoint
holds both: ``state_dict`` the averaged weights (what ``eval``, ``generate`` and ``export`` read) and
``current_model_state`` the raw ones, which a resumed run trains on.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging


def describe_ema(decay: float) -> str:
    """What the run scores, for the start summary and the report."""
    return (
        f"validation and the report score the EMA of the weights (decay {decay:g}, updated every optimizer "
        "step); checkpoints hold the EMA weights and the raw ones (current_model_state)"
    )


class ExponentialMovingAverage(EMAWeightAveraging):
    """Lightning's EMA of the parameters, updated after every optimizer step from the first.

    Buffers are not averaged (``use_buffers=False``): a causal LM's buffers are constants (rotary
    frequencies), which an average would only round.
    """

    def __init__(self, decay: float) -> None:
        super().__init__(decay=decay, use_buffers=False)
        self.decay = decay

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Lightning warns that a configure_model hook is not sharded here; nexttoken's module builds
        # its whole network in it, and the average needs that network whole.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="You're using the WeightAveraging callback")
            super().setup(trainer, pl_module, stage)


def average_state_dicts(
    state_dicts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """The weighted average ``Σ w_i · sd_i / Σ w_i`` of state dicts with the same names and shapes
    (uniform without ``weights``), summed in float64 and returned in each tensor's own dtype. Tensors
    that are not floating point (counters, masks) must agree and are kept as they are."""
    if not state_dicts:
        raise ValueError("nothing to average")
    weights = [1.0] * len(state_dicts) if weights is None else [float(w) for w in weights]
    if len(weights) != len(state_dicts) or sum(weights) <= 0 or min(weights) < 0:
        raise ValueError("one non-negative weight per state dict, not all zero")
    total = sum(weights)
    averaged = {}
    for name, first in state_dicts[0].items():
        if not first.is_floating_point():
            averaged[name] = first.clone()
            continue
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for weight, state in zip(weights, state_dicts):
            acc += weight * state[name].to(torch.float64)
        averaged[name] = (acc / total).to(first.dtype)
    return averaged
