"""Preference objectives on summed reply log-probabilities (:mod:`nexttoken.scoring.preferences`).

Each returns, per pair, ``(loss, chosen_reward, rejected_reward)``; a step's loss is the mean of
the per-pair losses over its whole accumulation window and every process (``CausalLMModule``).
``πc, πr``: the policy's summed log-probabilities of the chosen and rejected replies; ``ρc, ρr``:
the frozen reference model's; ``|c|, |r|``: the replies' scored tokens; ``σ``: the logistic function.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from nexttoken.errors import UserError, setting
from nexttoken.scoring.preferences import ReplyLogps

Objective = Literal["sft", "dpo", "ipo", "simpo", "orpo"]
OBJECTIVES: tuple[str, ...] = Objective.__args__
NEEDS_REFERENCE = ("dpo", "ipo")
# beta when model.beta is not given: DPO's and IPO's usual 0.1; SimPO's paper uses 2.0-10 (2.0 here).
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1}


def check_settings(
    objective: str, beta: float | None, gamma: float, orpo_lambda: float, label_smoothing: float
):
    if objective not in OBJECTIVES:
        raise UserError(
            f"{setting('model.objective')} must be one of {', '.join(OBJECTIVES)}, got {objective!r}"
        )
    if beta is not None and not beta > 0:
        raise UserError(f"{setting('model.beta')} must be above 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise UserError(f"{setting('model.label_smoothing')} must be in [0, 0.5), got {label_smoothing}")
    if not orpo_lambda >= 0:
        raise UserError(f"{setting('model.orpo_lambda')} must be 0 or above, got {orpo_lambda}")
    if not math.isfinite(gamma):
        raise UserError(f"{setting('model.gamma')} must be a number, got {gamma}")


def dpo(policy: ReplyLogps, reference: ReplyLogps, beta: float, label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7), with the label smoothing
    of conservative DPO (Mitchell 2023): with ``h = β((πc − ρc) − (πr − ρr))``,
    ``loss = −(1 − ε) log σ(h) − ε log σ(−h)``; rewards ``β(π − ρ)``."""
    chosen, rejected = (
        beta * (policy.chosen - reference.chosen),
        beta * (policy.rejected - reference.rejected),
    )
    h = chosen - rejected
    loss = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return loss, chosen, rejected


def ipo(policy: ReplyLogps, reference: ReplyLogps, beta: float):
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", eq. 17, on summed log-probabilities): ``loss = (h − 1/(2β))²`` with
    ``h = (πc − ρc) − (πr − ρr)``; rewards ``β(π − ρ)``."""
    chosen, rejected = policy.chosen - reference.chosen, policy.rejected - reference.rejected
    loss = (chosen - rejected - 1 / (2 * beta)) ** 2
    return loss, beta * chosen, beta * rejected


def simpo(policy: ReplyLogps, beta: float, gamma: float):
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    eq. 6): rewards ``β π / |y|`` (length-normalised, no reference), ``loss = −log σ(rc − rr − γ)``."""
    chosen = beta * policy.chosen / policy.chosen_tokens
    rejected = beta * policy.rejected / policy.rejected_tokens
    return -F.logsigmoid(chosen - rejected - gamma), chosen, rejected


def log1m_exp(x: Tensor) -> Tensor:
    """``log(1 − exp(x))`` for ``x < 0``, accurate everywhere (Mächler 2012, "Accurately Computing
    log(1 − exp(−|a|))"): ``log(−expm1(x))`` near 0, ``log1p(−exp(x))`` below ``−log 2``."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo(policy: ReplyLogps, orpo_lambda: float):
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    eqs. 2-7): with ``ℓ = π / |y|`` (the mean token log-probability) and ``log odds(y) = ℓ − log(1 − e^ℓ)``,
    ``loss = −ℓc + λ · (−log σ(log odds(c) − log odds(r)))``: the chosen reply's NLL per token plus
    the odds-ratio term. Rewards: the log-odds."""
    mean_c, mean_r = policy.chosen / policy.chosen_tokens, policy.rejected / policy.rejected_tokens
    odds_c, odds_r = mean_c - log1m_exp(mean_c), mean_r - log1m_exp(mean_r)
    return -mean_c - orpo_lambda * F.logsigmoid(odds_c - odds_r), odds_c, odds_r


def pair_losses(
    objective: str,
    policy: ReplyLogps,
    reference: ReplyLogps | None,
    *,
    beta: float | None = None,
    gamma: float = 1.0,
    orpo_lambda: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, chosen_reward, rejected_reward)`` per pair under ``objective``."""
    beta = DEFAULT_BETA[objective] if beta is None else beta
    if objective in NEEDS_REFERENCE and reference is None:
        raise UserError(
            f"{setting('model.objective')} {objective} needs a reference model's log-probabilities"
        )
    if objective == "dpo":
        return dpo(policy, reference, beta, label_smoothing)
    if objective == "ipo":
        return ipo(policy, reference, beta)
    if objective == "simpo":
        return simpo(policy, beta, gamma)
    if objective == "orpo":
        return orpo(policy, orpo_lambda)
    raise UserError(f"{setting('model.objective')} {objective!r} is not a preference objective")
