"""CausalLMModule: the LightningModule that trains and validates any causal LM with nexttoken's
loss, scoreboard and optimizer.

The training gradient is exact: whatever the padding, the gradient-accumulation window and the
number of processes, the step uses the gradient of the window's *token* mean,
``Σ nll / Σ scored tokens`` over every micro-batch of the window on every rank.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from nexttoken.data.preferences import PairBatch
from nexttoken.errors import UserError, setting
from nexttoken.loss import count_scored, fused_next_token_loss, next_token_loss
from nexttoken.metrics import NextTokenMetrics
from nexttoken.models.gpt import PRESETS
from nexttoken.models.load import build_network, is_checkpoint, is_hf_model, load_checkpoint
from nexttoken.models.lora import LoraSettings
from nexttoken.models.protocol import CausalLM
from nexttoken.schedule import DEFAULT_DECAY_FRACTION, WarmupStableDecay, timer_clock
from nexttoken.scoring.preferences import PairSums, ReplyLogps, reply_logps
from nexttoken.training.gradients import clip_by_norm, global_grad_norm
from nexttoken.training.log_throttle import LogThrottle
from nexttoken.training.nonfinite import NonFiniteGuard, OnNonFinite
from nexttoken.training.objectives import (
    DEFAULT_BETA,
    NEEDS_REFERENCE,
    Objective,
    check_settings,
    pair_losses,
)
from nexttoken.training.optim import (
    MUON_ADJUST_LR,
    MUON_MOMENTUM,
    MUON_ORIGINAL_LR,
    MuonAdjustLR,
    OptimizerName,
    build_optimizer,
    group_name,
)

# The fused linear+cross-entropy path pays once the vocabulary is much wider than the model
# (the logits dominate memory); below that the plain matmul is cheaper (benchmarks/loss_memory.py).
FUSED_LOSS_MIN_VOCAB_RATIO = 8
# The schedule's length when the trainer has no step limit (max_steps -1 and no epoch limit).
FALLBACK_SCHEDULE_STEPS = 100_000

FusedLoss = Literal["auto", "on", "off"]
Schedule = Literal["cosine", "wsd"]
Reference = Literal["auto", "copy", "base", "cached"]
# torch.compile, when left to "auto": measured on a 2-core CPU at small GPT shapes it makes a step
# only 5-8% faster and costs 1-2 minutes of compilation on a cold inductor cache, which a run repays
# only after 500-15,000 steps (benchmarks/README.md, small_model_speed.py --compile-check): off on
# CPUs. On a GPU the fused kernels pay for long runs: on from this many optimizer steps (or with no
# step limit); gpu_check.py measures it.
COMPILE_MIN_STEPS_GPU = 1000

# The peak learning rate when model.lr is not given, by what trains. From scratch the small GPTs
# train well at 3e-3. A pretrained model's own weights need far less: 3e-3 took SmolLM2-135M's
# response loss from 4.3 to 10-12 within 5 steps, 1e-4 fine-tuned it to 98/100 exact match (README,
# instruction tuning). LoRA adapters start from B = 0 and take larger steps: 1e-3 (the README's run).
DEFAULT_LR = {"scratch": 3e-3, "fine-tune": 1e-4, "lora": 1e-3}


class CausalLMModule(L.LightningModule):
    """Next-token training of nexttoken's GPT (``model`` = a preset name, or a nexttoken checkpoint to
    start from) or a Hugging Face causal LM (``model`` = a local folder or .gguf file), whole or with
    LoRA adapters (``lora``).

    Args:
        model: a GPT preset (``tiny``, ``mini``, ``small``, ...), a nexttoken checkpoint (``.ckpt``,
            its weights and tokenizer are the start), or a local HF model folder / GGUF file.
        vocab_size: set from the data's tokenizer when left out.
        block_size, n_layer, n_head, n_embd, dropout, bias: override the preset's shape.
        attn_dropout: the built-in GPT's dropout of the attention weights; default ``dropout``. On a
            CPU it is the dearest dropout: the attention kernel that drops runs the whole score matrix.
        lr: the peak learning rate; by default 3e-3 for a model trained from scratch, 1e-4 to
            fine-tune a pretrained model's weights, 1e-3 for LoRA adapters (``DEFAULT_LR``).
        weight_decay, betas, warmup_steps, min_lr: AdamW and its warmup + cosine schedule;
            ``max_steps`` of the schedule is the trainer's number of optimizer steps.
        fused_loss: ``auto`` (fused where the vocabulary is ≥ 8x the width), ``on`` or ``off``.
        on_nonfinite: a NaN/inf loss ``stop``s training (naming the step and the last good
            checkpoint, which is kept) or ``skip``s that optimizer step.
        compile: ``torch.compile`` the model and its loss together (one graph per mode); ``auto``:
            on a GPU for runs of 1000+ steps, off on a CPU (see ``COMPILE_MIN_STEPS_GPU``).
        trust_remote_code: allow a HF model folder's own code to run (off unless you ask).
        lora: train LoRA adapters with these settings and freeze the pretrained ``model`` (None: train
            every weight; ``lora: {r: 16}``, see :class:`~nexttoken.models.lora.LoraSettings`).
            Checkpoints then hold the adapters, the optimizer state, and the base model's path and sha256.
        schedule: ``cosine`` (warmup, then cosine to ``min_lr``) or ``wsd`` (warmup, the peak, then a
            late 1 - sqrt decay to ``min_lr``; ``decay-start.ckpt`` keeps the weights at its start).
        decay_fraction: ``wsd``: the share of the run after warmup that decays (default 0.2), in steps,
            on the clock, or whichever runs out first.
        decay_steps: ``wsd``: decay over the run's last this many optimizer steps instead; a run
            continued from ``decay-start.ckpt`` with it decays from there over this many steps.
        ema: validate, report and checkpoint an exponential moving average of the weights with this
            decay (``nexttoken.training.averaging``); None: the raw weights.
        objective: ``sft`` (next-token loss on the scored tokens), or on preference pairs ``dpo``,
            ``ipo``, ``simpo`` or ``orpo`` (:mod:`nexttoken.training.objectives`).
        beta, gamma, orpo_lambda, label_smoothing: the preference objectives' constants (``beta``
            by default 0.1, 2.0 for SimPO; ``gamma``: SimPO's margin; ``label_smoothing``: DPO's).
        reference: the frozen reference of ``dpo``/``ipo``: ``copy`` (a frozen copy of the starting
            weights), ``base`` (LoRA only: the base with the adapters switched off, no copy),
            ``cached`` (the starting weights' log-probabilities of every training and validation pair,
            computed once before training and held with the pairs; no model held), or ``auto``
            (``base`` with LoRA, else ``copy``).
        optimizer: ``adamw`` (everything), or ``muon``: Muon on the hidden matrices (attention and MLP
            projections), AdamW on embeddings, the output head, norms, biases and LoRA adapters
            (:mod:`nexttoken.training.optim`).
        muon_lr, muon_momentum, muon_adjust_lr: Muon's peak learning rate (default: ``lr`` with
            ``match_rms_adamw``, Moonlight's per-matrix scale; 0.02 with Keller Jordan's ``original``),
            its Nesterov momentum, and the per-matrix scale of its learning rate (torch's ``adjust_lr_fn``).
    """

    def __init__(
        self,
        model: str = "tiny",
        vocab_size: int | None = None,
        block_size: int | None = None,
        n_layer: int | None = None,
        n_head: int | None = None,
        n_embd: int | None = None,
        dropout: float = 0.0,
        attn_dropout: float | None = None,
        bias: bool = False,
        lr: float | None = None,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 50,
        min_lr: float | None = None,
        fused_loss: FusedLoss = "auto",
        on_nonfinite: OnNonFinite = "stop",
        compile: bool | Literal["auto"] = "auto",
        trust_remote_code: bool = False,
        lora: LoraSettings | None = None,
        schedule: Schedule = "cosine",
        decay_fraction: float | None = None,
        decay_steps: int | None = None,
        ema: float | None = None,
        objective: Objective = "sft",
        beta: float | None = None,
        gamma: float = 1.0,
        orpo_lambda: float = 0.1,
        label_smoothing: float = 0.0,
        reference: Reference = "auto",
        optimizer: OptimizerName = "adamw",
        muon_lr: float | None = None,
        muon_momentum: float = MUON_MOMENTUM,
        muon_adjust_lr: MuonAdjustLR = MUON_ADJUST_LR,
    ) -> None:
        super().__init__()
        check_schedule_settings(schedule, decay_fraction, decay_steps, ema, lora)
        if optimizer not in OptimizerName.__args__:
            raise UserError(f"{setting('model.optimizer')} must be adamw or muon, got {optimizer!r}")
        if muon_adjust_lr not in MuonAdjustLR.__args__:
            raise UserError(
                f"{setting('model.muon_adjust_lr')} must be one of {', '.join(MuonAdjustLR.__args__)}, got "
                f"{muon_adjust_lr!r}"
            )
        if muon_lr is not None and not muon_lr > 0:
            raise UserError(f"{setting('model.muon_lr')} must be positive, got {muon_lr}")
        if not 0 <= muon_momentum < 1:
            raise UserError(f"{setting('model.muon_momentum')} must be in [0, 1), got {muon_momentum}")
        if fused_loss not in FusedLoss.__args__:
            raise UserError(
                f"{setting('model.fused_loss')} must be one of {', '.join(FusedLoss.__args__)}, got "
                f"{fused_loss!r}"
            )
        check_settings(objective, beta, gamma, orpo_lambda, label_smoothing)
        if reference not in Reference.__args__:
            raise UserError(
                f"{setting('model.reference')} must be one of {', '.join(Reference.__args__)}, got {reference!r}"
            )
        if on_nonfinite not in OnNonFinite.__args__:
            raise UserError(f"{setting('model.on_nonfinite')} must be stop or skip, got {on_nonfinite!r}")
        if model.endswith(".gguf") and not Path(model).expanduser().is_file():
            raise UserError(
                f"{setting('model.model')} {model}: no such file; pass a local .gguf file or a GPT preset"
            )
        if model not in PRESETS and not is_hf_model(model) and not is_checkpoint(model):
            raise UserError(
                f"{setting('model.model')} {model!r} is neither a GPT preset ({', '.join(PRESETS)}), a "
                "nexttoken checkpoint (.ckpt) nor a local Hugging Face model folder or .gguf file"
            )
        settings = LoraSettings.of(lora)  # a checkpoint's hyperparameters hold them as plain values
        if reference == "base" and settings is None:
            raise UserError(
                f"{setting('model.reference')} base is the LoRA base with its adapters switched off, but "
                f"this run trains every weight; use {setting('model.reference')} copy or add "
                f"{setting('model.lora.r')}"
            )
        if settings is not None and model in PRESETS:
            raise UserError(
                f"{setting('model.lora.r')} adapts a pretrained model, but {setting('model.model')} {model} is a "
                "preset with random weights; pass a nexttoken checkpoint (.ckpt), a Hugging Face model folder "
                "or a .gguf file"
            )
        # The hyperparameters (and so checkpoints) keep plain values: safe loading (weights_only)
        # refuses objects of other classes. save_hyperparameters reads this local.
        lora = None if settings is None else settings.to_dict()
        self.save_hyperparameters()
        self.lora = settings
        # A LoRA checkpoint holds the adapters only: the frozen base comes from the base model's file.
        self.strict_loading = settings is None
        self.lora_modules: list[str] = []
        self.base_fingerprint: str | None = None
        self.base_held_in_bf16 = False
        self.model: CausalLM | None = None
        self.tokenizer = None
        self.val_metrics = NextTokenMetrics()
        self._window_nll = torch.zeros((), dtype=torch.float64)
        self._window_tokens = torch.zeros((), dtype=torch.int64)
        self._window_reply_tokens = torch.zeros((), dtype=torch.int64)
        # The scored tokens trained on so far: every micro-batch, process and part of the run (it is
        # kept in the checkpoint), summed on the device.
        self._tokens_seen = torch.zeros((), dtype=torch.int64)
        # This optimizer step's global gradient norm before clipping (device), for the clip and the log.
        self._grad_norm: Tensor | None = None
        self._loss_scale: int | None = None
        self._nonfinite = NonFiniteGuard(on_nonfinite)
        self._log_throttle = LogThrottle()
        self.compiled, self.compile_reason = False, ""
        self.preference = objective != "sft"
        self.val_pairs = PairSums()
        # The frozen reference model of dpo/ipo (in a list: not a submodule, so never trained, saved
        # or handed to the optimizer); None with reference "base" (the adapters switched off).
        self._reference: list[CausalLM] = []
        self.reference_note: str | None = None
        # reference "cached": per split, every pair's reference log-probabilities, indexed by pair.
        self._cached_reference: dict[str, ReplyLogps] = {}

    def configure_callbacks(self) -> list[L.Callback]:
        """The callbacks the settings ask for while training: the decay-start checkpoint of ``wsd``,
        the EMA of the weights (``ema``)."""
        from lightning.pytorch.trainer.states import TrainerFn

        if self._trainer is None or self._trainer.state.fn != TrainerFn.FITTING:
            return []
        callbacks: list[L.Callback] = []
        if self.hparams.schedule == "wsd":
            from nexttoken.training.decay_start import DecayStartCheckpoint

            callbacks.append(DecayStartCheckpoint())
        if self.hparams.ema is not None:
            from nexttoken.training.averaging import ExponentialMovingAverage

            callbacks.append(ExponentialMovingAverage(self.hparams.ema))
        return callbacks

    # ----------------------------------------------------------------- model
    def configure_model(self) -> None:
        """Build the network once the data (and so the vocabulary) is known."""
        if self.model is not None:
            return
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        if self.tokenizer is None and datamodule is not None:
            self.tokenizer = datamodule.tokenizer
        if self.hparams.vocab_size is None:
            if self.tokenizer is None:
                raise ValueError("vocab_size is unknown: pass it, or train with a TextDataModule")
            self.hparams.vocab_size = self.tokenizer.vocab_size
        self.model = self._build_network()
        if self.lora is not None:
            from nexttoken.models.lora import attach_lora, weights_fingerprint

            self.lora_modules = attach_lora(self.model, self.lora)
            self.base_fingerprint = weights_fingerprint(self.hparams.model)
        self._setup_preference(datamodule)
        self.compiled, self.compile_reason = self._compile_choice()
        if self.compiled:
            # The network and the loss in one graph: elementwise work around the head (and the
            # fused loss, which calls model.hidden) is compiled too, not only model.forward.
            self._compiled_nll_sum = torch.compile(self._nll_sum)

    def _setup_preference(self, datamodule: Any) -> None:
        """Check that the objective fits the data, and make the reference model of dpo/ipo."""
        self.check_data_format(getattr(datamodule, "data_format", None))
        hp = self.hparams
        if hp.objective not in NEEDS_REFERENCE:
            return
        mode = hp.reference if hp.reference != "auto" else ("base" if self.lora is not None else "copy")
        if mode == "base":
            self.reference_note = "reference: the LoRA base with the adapters switched off (no second copy)"
            return
        if mode == "cached":
            self._cache_reference(datamodule)
            return
        import copy

        reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        size = sum(t.numel() * t.element_size() for t in (*reference.parameters(), *reference.buffers()))
        self._reference = [reference]
        self.reference_note = (
            f"reference: a frozen copy of the starting weights, {size / 2**20:,.1f} MiB more memory "
            f"({setting('model.reference')})"
        )

    def _cache_reference(self, datamodule: Any) -> None:
        """The starting weights' log-probabilities of every pair of both splits, computed now (before
        any step, and before a checkpoint's weights would be loaded) and kept in memory."""
        import time

        from nexttoken.data.preferences import PairSet
        from nexttoken.scoring.preferences import score_pairs

        examples = getattr(datamodule, "examples", None)
        if examples is None:
            raise UserError(
                f"{setting('model.reference')} cached needs the preference pairs of the data; use "
                f"{setting('model.reference')} copy"
            )
        started = time.perf_counter()
        for split in ("train", "val"):
            self._cached_reference[split] = score_pairs(self.model, PairSet(getattr(examples, split)))
        seconds = time.perf_counter() - started
        n = sum(len(c.chosen) for c in self._cached_reference.values())
        size = sum(
            getattr(c, name).numel() * getattr(c, name).element_size()
            for c in self._cached_reference.values()
            for name in ReplyLogps.__dataclass_fields__
        )
        self.reference_note = (
            f"reference: the starting weights' log-probabilities of all {n:,} pairs, computed once in "
            f"{seconds:.1f} s and held in {size / 2**10:,.1f} KiB ({setting('model.reference')} cached)"
        )

    def check_data_format(self, data_format: str | None) -> None:
        """Preference objectives train on preference pairs, and preference pairs need one."""
        if data_format == "preference" and not self.preference:
            raise UserError(
                f"the data are preference pairs; train on them with {setting('model.objective')} dpo, ipo, "
                "simpo or orpo"
            )
        if self.preference and data_format is not None and data_format != "preference":
            raise UserError(
                f"{setting('model.objective')} {self.hparams.objective} trains on preference pairs (records with "
                f"'chosen' and 'rejected'), but the data are {data_format}"
            )

    def _compile_choice(self) -> tuple[bool, str]:
        mode = self.hparams.compile
        if self.preference:  # the pairs' scoring path (score_rows) runs uncompiled
            return False, "preference objectives run uncompiled"
        if mode is True or mode is False:
            return mode, "set by you"
        trainer = self._trainer
        if trainer is None or trainer.strategy.root_device.type != "cuda":
            return False, "auto: off on a CPU"
        steps = trainer.max_steps
        if steps is None or steps < 0 or steps >= COMPILE_MIN_STEPS_GPU:
            return True, f"auto: a GPU run of {COMPILE_MIN_STEPS_GPU:,}+ steps"
        return False, f"auto: a GPU run shorter than {COMPILE_MIN_STEPS_GPU:,} steps"

    def _build_network(self) -> CausalLM:
        hp = self.hparams
        if is_checkpoint(hp.model):
            return self._network_from_checkpoint(hp.model)
        network = build_network(hp)
        if not is_hf_model(hp.model):
            self.hparams.block_size = network.config.block_size
        return network

    def _network_from_checkpoint(self, path: str) -> CausalLM:
        """The network of a nexttoken checkpoint, as the starting point of this run."""
        base = load_checkpoint(path)
        if base.lora is not None:
            raise UserError(
                f"{setting('model.model')} {path} is a LoRA checkpoint; merge it first (nexttoken export "
                f"{path} OUT --merge) and fine-tune the merged folder"
            )
        if self.tokenizer is None:
            self.tokenizer = base.tokenizer
        elif base.tokenizer is not None and base.tokenizer.fingerprint != self.tokenizer.fingerprint:
            raise UserError(
                f"{setting('model.model')} {path} was trained with another tokenizer ({base.tokenizer.kind}, "
                f"vocab {base.tokenizer.vocab_size}) than the data's ({self.tokenizer.kind}, vocab "
                f"{self.tokenizer.vocab_size}); leave {setting('data.tokenizer')} out to use the checkpoint's"
            )
        network = base.network
        block_size, limit = self.hparams.block_size, network.max_context
        if block_size is not None and limit is not None and block_size > limit:
            raise UserError(
                f"{setting('data.block_size')} {block_size} is longer than {path}'s context ({limit}); use at "
                f"most {limit}"
            )
        return network.train()

    @property
    def uses_fused_loss(self) -> bool:
        """Whether :meth:`nll_sum` takes the fused linear + cross-entropy path (``fused_loss`` and
        the model decide; ``auto``: a vocabulary at least 8x the model's width)."""
        mode = self.hparams.fused_loss
        if not self.model.logits_are_linear:
            return False  # softcapped or scaled logits (some HF models) are not hidden @ W.T
        if not isinstance(self.model.lm_head, torch.nn.Linear):
            return False  # an adapted head (LoRA) is not just hidden @ W.T
        if mode != "auto":
            return mode == "on"
        head = self.model.lm_head
        return head.weight.shape[0] >= FUSED_LOSS_MIN_VOCAB_RATIO * head.weight.shape[1]

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids)

    def nll_sum(self, input_ids: Tensor, targets: Tensor, document_ids: Tensor | None = None) -> Tensor:
        """Σ -log Q(target) in nats over the scored positions of a batch, in fp32.

        ``input_ids`` and ``targets`` are (B, T) token ids, already shifted (``targets[:, t]`` follows
        ``input_ids[:, t]``); targets equal to ``IGNORE_INDEX`` (padding) are not scored.
        ``document_ids`` (B, T): packed documents or chat examples, kept apart (``CausalLM.forward``).
        """
        compiled = getattr(self, "_compiled_nll_sum", None)
        return (compiled or self._nll_sum)(input_ids, targets, document_ids)

    def _nll_sum(self, input_ids: Tensor, targets: Tensor, document_ids: Tensor | None = None) -> Tensor:
        if self.uses_fused_loss:
            head = self.model.lm_head
            hidden = self.model.hidden(input_ids, document_ids=document_ids)
            return fused_next_token_loss(hidden, head.weight, targets, bias=head.bias, reduction="sum")
        return next_token_loss(self.model(input_ids, document_ids=document_ids), targets, reduction="sum")

    # ----------------------------------------------------------------- training
    def holds_base_in_bf16(self) -> bool:
        """Whether this fit holds the frozen base weights in bf16: bf16-mixed rounds every one of them
        to bf16 for its matmul anyway (identical steps, less memory). Only under Lightning's own
        autocast plugin (single device, DDP): FSDP flattens parameters and needs one dtype."""
        from lightning.pytorch.plugins.precision import MixedPrecision

        plugin = self.trainer.precision_plugin
        return self.lora is not None and type(plugin) is MixedPrecision and plugin.precision == "bf16-mixed"

    def on_fit_start(self) -> None:
        if self.holds_base_in_bf16():
            from nexttoken.models.lora import hold_base_weights

            hold_base_weights(self.model, torch.bfloat16)
            self.base_held_in_bf16 = True

    def on_fit_end(self) -> None:
        # Back to fp32 for what runs outside autocast (the report's sample). These are the bf16-rounded
        # values; checkpoints hold no base weights, so every later load reads the exact ones again.
        if self.base_held_in_bf16:
            from nexttoken.models.lora import hold_base_weights

            hold_base_weights(self.model, torch.float32)
            self.base_held_in_bf16 = False

    def lora_summary(self, audit) -> str:
        """What LoRA adapts: its settings, the trainable share, the base and every adapted module."""
        from nexttoken.models.lora import describe_modules

        lora, hp = self.lora, self.hparams
        trainable = sum(r.numel for r in audit.records)
        total = trainable + sum(r.numel for r in audit.frozen)
        lines = [
            f"lora: rank {lora.r}, alpha {lora.alpha:g} (update scale {lora.scale:g}), dropout "
            f"{lora.dropout:g}, weight decay {lora.weight_decay:g}; {trainable:,} trainable params "
            f"({100 * trainable / total:.2f}% of {total:,}); base {hp.model} (sha256 {self.base_fingerprint[:12]}…)",
            f"lora: {len(self.lora_modules)} modules adapted"
            + (
                " (their frozen weights held in bf16 while bf16-mixed trains):"
                if self.holds_base_in_bf16()
                else ":"
            ),
        ]
        lines += [f"  {pattern}" for pattern in describe_modules(self.lora_modules)]
        return "\n".join(lines)

    def objective_line(self) -> str:
        """The preference objective, its constants, and (dpo/ipo) the reference and what it costs."""
        hp = self.hparams
        beta = DEFAULT_BETA[hp.objective] if hp.beta is None else hp.beta
        constants = {
            "dpo": f"beta {beta:g}, label smoothing {hp.label_smoothing:g}",
            "ipo": f"beta {beta:g}",
            "simpo": f"beta {beta:g}, gamma {hp.gamma:g}",
            "orpo": f"lambda {hp.orpo_lambda:g}",
        }[hp.objective]
        line = f"objective: {hp.objective} ({constants}); loss = the per-pair mean over each step's pairs"
        return line + (f"\n{self.reference_note}" if self.reference_note else "")

    def model_summary_line(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return f"{self.hparams.model} ({n / 1e6:.2f}M parameters, vocab {self.hparams.vocab_size})"

    # ----------------------------------------------------------------- preference pairs
    def reference_logps(self, batch: PairBatch) -> ReplyLogps | None:
        """The frozen reference's reply log-probabilities (None for objectives without one)."""
        if self.hparams.objective not in NEEDS_REFERENCE:
            return None
        if self._cached_reference:  # by pair: validation batches index the validation split
            cached = self._cached_reference[
                "val" if self.trainer.validating or self.trainer.sanity_checking else "train"
            ]
            index = batch.pair_ids.cpu()
            return ReplyLogps(
                *(getattr(cached, name)[index].to(self.device) for name in ReplyLogps.__dataclass_fields__)
            )
        if self._reference:
            reference = self._reference[0]
            if reference.lm_head.weight.device != self.device:
                reference.to(self.device)
            return reply_logps(reference, batch)
        from nexttoken.models.lora import adapters_off

        with adapters_off(self.model):
            return reply_logps(self.model, batch)

    def pair_terms(self, batch: PairBatch, grad: bool) -> tuple[ReplyLogps, Tensor, Tensor, Tensor]:
        """``(policy log-probs, loss, chosen reward, rejected reward)`` per pair of ``batch``."""
        hp = self.hparams
        reference = self.reference_logps(batch)
        policy = reply_logps(self.model, batch, grad=grad)
        loss, chosen, rejected = pair_losses(
            hp.objective,
            policy,
            reference,
            beta=hp.beta,
            gamma=hp.gamma,
            orpo_lambda=hp.orpo_lambda,
            label_smoothing=hp.label_smoothing,
        )
        return policy, loss, chosen, rejected

    def _preference_step(self, batch: PairBatch) -> Tensor:
        policy, loss, _, _ = self.pair_terms(batch, grad=True)
        total = loss.sum()
        pairs = torch.tensor(batch.n_pairs, device=total.device)
        self._window_nll = self._window_nll.to(total.device) + total.detach().double()
        self._window_tokens = self._window_tokens.to(total.device) + pairs
        scored = (policy.chosen_tokens + policy.rejected_tokens).sum().to(total.device)
        self._window_reply_tokens = self._window_reply_tokens.to(total.device) + scored
        # As for tokens: a constant now (the first micro-batch's pairs), the window's pair count at
        # on_before_optimizer_step, so the step follows the per-pair mean over the whole window.
        return total.float() / self._loss_scale

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        if isinstance(batch, PairBatch):
            return self._preference_step(batch)
        input_ids, targets, *document_ids = batch  # (input_ids, targets[, document_ids])
        nll = self.nll_sum(input_ids, targets, *document_ids)
        tokens = count_scored(targets)
        self._window_nll = self._window_nll.to(nll.device) + nll.detach().double()
        self._window_tokens = self._window_tokens.to(tokens.device) + tokens
        # Scale by a constant (the tokens the first micro-batch held, fixed for the run);
        # on_before_optimizer_step turns the accumulated gradient into that of the window's true
        # token mean, so no look-ahead is needed and short or padded micro-batches weigh right.
        return nll / self._loss_scale

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning divided each micro-batch loss by accumulate_grad_batches and DDP averaged over
        # ranks, so the gradient is Σ∇nll / (N · W · capacity). Make it Σ∇nll / Σtokens (all ranks).
        window_tokens = self._window_tokens.clone()
        window_nll = self._window_nll.clone()
        if self.trainer.world_size > 1:
            window_tokens = self.trainer.strategy.reduce(window_tokens.double(), reduce_op="sum")
            window_nll = self.trainer.strategy.reduce(window_nll, reduce_op="sum")
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size * self._loss_scale
        factor = scale / window_tokens.clamp(min=1)
        loss = (window_nll / window_tokens.clamp(min=1)).float()
        # Rescale every gradient and look for NaN/inf in them and in the loss on the device, without
        # waiting for it: a non-finite step is skipped inside the optimizer's own kernel (optimizers
        # without that are checked on the host at once) and reported at the next check.
        self._nonfinite.before_step(self, optimizer, loss, factor)
        if self.preference:  # window_tokens counts pairs; train/tokens_seen counts the replies' scored tokens
            window_tokens = self._window_reply_tokens.clone()
            if self.trainer.world_size > 1:
                window_tokens = self.trainer.strategy.reduce(window_tokens.double(), reduce_op="sum")
            self._window_reply_tokens = torch.zeros_like(self._window_reply_tokens)
        self._tokens_seen = self._tokens_seen.to(window_tokens.device) + window_tokens.to(torch.int64)
        log = self._log_throttle(self.trainer, self.trainer.global_step + 1)  # self.log costs Python time
        # The norm of the window's true gradient (rescaled above), before clipping; clipping reuses it.
        self._grad_norm = self.grad_norm() if log or self.trainer.gradient_clip_val else None
        if log:
            self.log("train/loss", loss, prog_bar=True)
            if not self.preference:
                self.log("train/perplexity", loss.exp(), prog_bar=False)
            # float64: exact to 2**53 tokens (Lightning keeps a float64 as it is, and rounds ints to float32).
            self.log("train/tokens_seen", self._tokens_seen.double())
            if self._grad_norm is not None:
                self.log("train/grad_norm", self._grad_norm)
            # CPU tensors: logging a Python float would copy it to the GPU, which waits for the GPU.
            # train/lr is the first group's; train/lr_<name> each group's (decay, no_decay, lora). Not
            # train/lr/<name>: MLflow's file store keeps a metric in a file named by it, and train/lr
            # cannot be a file and a folder.
            for i, group in enumerate(optimizer.param_groups):
                lr = torch.tensor(float(group["lr"]))
                if i == 0:
                    self.log("train/lr", lr)
                self.log(f"train/lr_{group_name(group, i)}", lr)
        self._window_nll = torch.zeros_like(self._window_nll)
        self._window_tokens = torch.zeros_like(self._window_tokens)

    def grad_norm(self) -> Tensor | None:
        """The global L2 norm of the gradients now held, on the device (all processes' shards under FSDP)."""
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = self.trainer.strategy
        sharded = isinstance(strategy, FSDPStrategy) or type(strategy).__name__ == "ModelParallelStrategy"
        reduce = functools.partial(strategy.reduce, reduce_op="sum") if sharded else None
        return global_grad_norm(self.parameters(), reduce)

    @property
    def tokens_seen(self) -> int:
        """The scored tokens trained on so far, over every process and every part of a resumed run
        (reading it waits for the device)."""
        return int(self._tokens_seen)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Every log_every_n_steps steps, when Lightning reads the logged values anyway.
        self._nonfinite.maybe_check(self, self.trainer.log_every_n_steps)

    def on_validation_start(self) -> None:
        self._nonfinite.check(self)

    def on_train_end(self) -> None:
        self._nonfinite.check(self)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # Lightning refuses to clip under mixed precision when the optimizer unscales gradients
        # itself (fused AdamW, which build_optimizer picks), because with fp16's loss scaler the
        # gradients would still be scaled here. bf16-mixed has no scaler: the gradients are the
        # true ones, so clip them exactly as Lightning would. (16-mixed keeps Lightning's check.)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if gradient_clip_val and scaler is None and getattr(optimizer, "_step_supports_amp_scaling", False):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:  # by the norm on_before_optimizer_step computed (and logs): computed once per step
                norm = self._grad_norm if self._grad_norm is not None else self.grad_norm()
                if norm is not None:
                    clip_by_norm(params, gradient_clip_val, norm)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._loss_scale is None:
            # The constant must be the same on every rank: DDP averages the ranks' gradients BEFORE
            # on_before_optimizer_step rescales them. Micro-batches of chat examples differ in
            # shape from rank to rank, so take the largest first micro-batch of any rank.
            units = batch.n_pairs if isinstance(batch, PairBatch) else batch[1].numel()
            scale = torch.tensor(units, device=self.device)
            if self.trainer.world_size > 1:
                scale = self.trainer.strategy.reduce(scale, reduce_op="max")
            self._loss_scale = int(scale)

    # ----------------------------------------------------------------- validation
    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        if isinstance(batch, PairBatch):
            with torch.no_grad():
                self.val_pairs.add(*self.pair_terms(batch, grad=False))
            return
        input_ids, targets, n_bytes, *document_ids = batch  # (input_ids, targets, n_bytes[, document_ids])
        nll = self.nll_sum(input_ids, targets, *document_ids)
        self.val_metrics.update(nll, count_scored(targets), n_bytes.sum())

    def on_validation_epoch_end(self) -> None:
        if self.preference:
            self._end_preference_validation()
            return
        if int(self.val_metrics.tokens) == 0 and self.trainer.world_size == 1:
            return
        # compute() sums the three states over every process, then divides once.
        results = self.val_metrics.compute()
        scored = {"tokens": int(results.pop("tokens")), "bytes": int(results.pop("bytes", 0))}
        self.val_metrics.reset()
        if self.trainer.sanity_checking:  # a couple of batches, not the held-out set's score
            return
        for name, value in results.items():
            self.log(f"val/{name}", value.float(), prog_bar=name in ("loss", "perplexity"))
        self.last_validation = {**{k: float(v) for k, v in results.items()}, **scored}
        self.last_validation_step = self.trainer.global_step

    def _end_preference_validation(self) -> None:
        sums = self.val_pairs.to_dict()
        self.val_pairs = PairSums()
        if self.trainer.world_size > 1:  # every process's sums added, then divided once
            names = list(sums)
            values = torch.tensor([float(sums[k]) for k in names], dtype=torch.float64, device=self.device)
            values = self.trainer.strategy.reduce(values, reduce_op="sum")
            sums = {
                k: (int(v) if isinstance(sums[k], int) else float(v)) for k, v in zip(names, values.tolist())
            }
        if self.trainer.sanity_checking or not sums["pairs"]:
            return
        means = PairSums(**sums).means()
        for name, value in means.items():
            if name != "pairs":
                self.log(
                    f"val/{name}",
                    torch.tensor(value, dtype=torch.float32),
                    prog_bar=name in ("loss", "accuracy"),
                )
        self.last_validation = {**means, "sums": sums}
        self.last_validation_step = self.trainer.global_step

    # ----------------------------------------------------------------- optimizer
    def configure_optimizers(self):
        hp = self.hparams
        total = self.trainer.estimated_stepping_batches
        # What the schedule made of the settings; `nexttoken fit` prints these in its start summary
        # (the settings named with nexttoken.errors.setting, spelled there as fit's flags).
        self.schedule_notes: list[str] = []
        # A time limit (trainer.max_time) puts the cosine on the clock too (nexttoken.schedule).
        clock = timer_clock(self.trainer)
        max_steps = int(total) if math.isfinite(total) else None
        if max_steps is None and clock is None:
            max_steps = FALLBACK_SCHEDULE_STEPS
            self.schedule_notes.append(
                f"the run has no step or time limit, so the cosine schedule spans {max_steps:,} steps; set "
                f"{setting('trainer.max_steps')} or {setting('trainer.max_time')} to fit it to the run"
            )
        warmup_steps = hp.warmup_steps if max_steps is None else min(hp.warmup_steps, max(max_steps // 10, 1))
        if warmup_steps < hp.warmup_steps:
            self.schedule_notes.append(
                f"warmup capped at {warmup_steps} step{'' if warmup_steps == 1 else 's'} (a tenth of the "
                f"run's {max_steps:,}) instead of {setting('model.warmup_steps')} {hp.warmup_steps}"
            )
        lr = self.peak_lr()
        if hp.lr is None and (self.lora is not None or hp.model not in PRESETS):
            what = "LoRA adapters" if self.lora is not None else "fine-tuning a pretrained model"
            self.schedule_notes.append(
                f"learning rate {lr:g}, the default for {what}; {setting('model.lr')} sets it"
            )
        if hp.get("optimizer", "adamw") == "muon":
            from lightning.pytorch.strategies import FSDPStrategy

            strategy = self.trainer.strategy
            if isinstance(strategy, FSDPStrategy) or type(strategy).__name__ == "ModelParallelStrategy":
                # Muon orthogonalizes whole matrices; a process holds only a shard of each.
                raise UserError(
                    f"{setting('model.optimizer')} muon needs each matrix whole, and a sharded strategy splits "
                    f"them; use {setting('trainer.strategy')} ddp, or {setting('model.optimizer')} adamw"
                )
        optimizer, schedule = build_optimizer(
            self.model,
            lr=lr,
            weight_decay=hp.weight_decay,
            lora_weight_decay=self.lora.weight_decay if self.lora is not None else 0.0,
            betas=tuple(hp.betas),
            warmup_steps=warmup_steps,
            max_steps=max_steps,
            min_lr=hp.min_lr,
            clock=clock,
            # fp16's loss scaler must unscale before clipping, which Lightning cannot do for a fused
            # optimizer (it unscales inside its own step): use the foreach kernel there.
            fused=False if str(self.trainer.precision) in ("16-mixed", "16") else None,
            **self._muon_settings(),
        )
        if hp.schedule == "wsd":
            schedule = self._warmup_stable_decay(optimizer, schedule, clock)
        if hp.ema is not None:
            from nexttoken.training.averaging import describe_ema

            self.schedule_notes.append(describe_ema(hp.ema))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _warmup_stable_decay(self, optimizer, cosine, clock) -> WarmupStableDecay:
        """The ``wsd`` schedule in place of the cosine ``build_optimizer`` made, with its warmup, length
        and floor."""
        hp = self.hparams
        if hp.decay_steps is not None and cosine.max_steps is None:
            raise UserError(
                f"{setting('model.decay_steps')} needs a step limit ({setting('trainer.max_steps')}); on a "
                f"time limit alone use {setting('model.decay_fraction')}"
            )
        fraction = DEFAULT_DECAY_FRACTION if hp.decay_fraction is None else hp.decay_fraction
        schedule = WarmupStableDecay(
            optimizer,
            warmup_steps=cosine.warmup_steps,
            max_steps=cosine.max_steps,
            min_lr_ratio=cosine.min_lr_ratio,
            decay_fraction=fraction,
            decay_steps=hp.decay_steps,
            clock=clock,
        )
        steps = schedule.steps_decay()
        if hp.decay_steps is not None:
            length = f"the last {hp.decay_steps:,} steps"
        else:
            length = f"the last {fraction:g} of the run after warmup" + (
                f" ({steps[1]:,} steps" + (" or the clock, whichever comes first)" if clock else ")")
                if steps
                else " (on the clock)"
            )
        start = f", from step {steps[0]:,}" if steps and not (clock and hp.decay_steps is None) else ""
        self.schedule_notes.append(
            f"schedule: warmup-stable-decay: the peak, then 1 - sqrt down to the floor over {length}{start}; "
            "the checkpoint at the decay's start is kept (decay-start.ckpt)"
        )
        return schedule

    def _muon_settings(self) -> dict:
        hp = self.hparams
        return {
            "optimizer": hp.get("optimizer", "adamw"),
            "muon_lr": hp.get("muon_lr"),
            "muon_momentum": hp.get("muon_momentum", MUON_MOMENTUM),
            "muon_adjust_lr": hp.get("muon_adjust_lr", MUON_ADJUST_LR),
        }

    def optimizer_summary(self, audit) -> str | None:
        """The start summary's optimizer line for a Muon run (what each optimizer gets, with its settings
        and the flags that set them); None for AdamW, which the weight-decay line covers."""
        hp = self.hparams
        if hp.get("optimizer", "adamw") != "muon":
            return None
        adjust = hp.get("muon_adjust_lr", MUON_ADJUST_LR)
        muon_lr = hp.get("muon_lr")
        if muon_lr is None:
            muon_lr = MUON_ORIGINAL_LR if adjust == "original" else self.peak_lr()
        scale = "0.2 sqrt(max(rows, cols))" if adjust == "match_rms_adamw" else "sqrt(max(1, rows/cols))"
        return (
            f"optimizer: muon (lr {muon_lr:g} [{setting('model.muon_lr')}] x {scale} per matrix "
            f"[{setting('model.muon_adjust_lr')} {adjust}], Nesterov momentum "
            f"{hp.get('muon_momentum', MUON_MOMENTUM):g} [{setting('model.muon_momentum')}], 5 Newton-Schulz "
            f"steps, decoupled weight decay {hp.weight_decay:g}) beside adamw (lr {self.peak_lr():g}, betas "
            f"{tuple(hp.betas)}): {audit.optimizer_split()}"
        )

    def peak_lr(self) -> float:
        """``model.lr``, or the default for what trains (``DEFAULT_LR``)."""
        hp = self.hparams
        if hp.lr is not None:
            return hp.lr
        if self.lora is not None:
            return DEFAULT_LR["lora"]
        return DEFAULT_LR["scratch"] if hp.model in PRESETS else DEFAULT_LR["fine-tune"]

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Never save weights past an unreported non-finite step (and call the previous ones good).
        self._nonfinite.check(self)
        # A checkpoint carries its tokenizer, so it can be evaluated or sampled on its own.
        if self.tokenizer is not None:
            checkpoint["tokenizer"] = self.tokenizer.to_dict()
        # The run's token count goes on from here when it resumes (train/tokens_seen).
        checkpoint["tokens_seen"] = self.tokens_seen
        if self.lora is not None:
            # The adapters only (the optimizer state is theirs too); the base is named and fingerprinted.
            trainable = {name for name, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
            checkpoint["lora"] = {
                "base_model": str(self.hparams.model),
                "sha256": self.base_fingerprint,
                "modules": list(self.lora_modules),
            }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        from nexttoken.data.tokenizers import Tokenizer

        saved = Tokenizer.from_dict(checkpoint["tokenizer"]) if "tokenizer" in checkpoint else None
        if self.tokenizer is None:
            self.tokenizer = saved
        elif saved is not None and saved.fingerprint != self.tokenizer.fingerprint:
            raise UserError(
                f"the checkpoint was trained with a different tokenizer ({saved.kind}, vocab "
                f"{saved.vocab_size}) than the data gives now ({self.tokenizer.kind}, vocab "
                f"{self.tokenizer.vocab_size}); use the run's data settings, or start a new run without "
                f"{setting('ckpt_path')}"
            )
        if self.lora is not None:
            self._check_lora_checkpoint(checkpoint)
        saved_optimizer = checkpoint.get("hyper_parameters", {}).get("optimizer", "adamw")
        if saved_optimizer != self.hparams.get("optimizer", "adamw") and checkpoint.get("optimizer_states"):
            raise UserError(
                f"the checkpoint was trained with {setting('model.optimizer')} {saved_optimizer}, and its "
                f"optimizer state fits no other; continue it with {saved_optimizer}, or start a new run without "
                f"{setting('ckpt_path')}"
            )
        self._tokens_seen = torch.tensor(int(checkpoint.get("tokens_seen", 0)), dtype=torch.int64)
        own = self.state_dict()
        for name, tensor in checkpoint["state_dict"].items():
            if name in own and own[name].shape != tensor.shape:
                raise UserError(
                    f"the checkpoint's {name} has shape {tuple(tensor.shape)} but this model's has "
                    f"{tuple(own[name].shape)}; use the run's model and data settings (its config.yaml), or "
                    f"start a new run without {setting('ckpt_path')}"
                )

    def _check_lora_checkpoint(self, checkpoint: dict) -> None:
        """A LoRA checkpoint fits only the base it was trained on and exactly these adapters."""
        from nexttoken.models.lora import check_fingerprint

        saved = checkpoint.get("lora")
        if saved is None:
            raise UserError(
                f"the checkpoint is not a LoRA run (it holds every weight); drop {setting('model.lora')} to "
                f"continue it, or start a new LoRA run without {setting('ckpt_path')}"
            )
        check_fingerprint(saved, self.hparams.model, "the checkpoint's adapter", actual=self.base_fingerprint)
        expected = {name for name, p in self.named_parameters() if p.requires_grad}
        given = set(checkpoint["state_dict"])
        if given != expected:
            missing, extra = sorted(expected - given), sorted(given - expected)
            raise UserError(
                f"the checkpoint's adapters do not fit this model ({len(missing)} missing, e.g. "
                f"{(missing or ['-'])[0]}; {len(extra)} unexpected, e.g. {(extra or ['-'])[0]}); "
                "use the run's model settings (its config.yaml)"
            )


def check_schedule_settings(
    schedule: str, decay_fraction: float | None, decay_steps: int | None, ema: float | None, lora: Any
) -> None:
    """The schedule's and the averaging's settings, checked before anything is built."""
    if schedule not in Schedule.__args__:
        raise UserError(f"{setting('model.schedule')} must be cosine or wsd, got {schedule!r}")
    if schedule != "wsd":
        given = [
            name
            for name, value in (("decay_fraction", decay_fraction), ("decay_steps", decay_steps))
            if value is not None
        ]
        if given:
            raise UserError(
                f"{setting('model.' + given[0])} applies to {setting('model.schedule')} wsd, but the schedule is "
                f"{schedule}"
            )
    if decay_fraction is not None and not 0.0 < decay_fraction <= 1.0:
        raise UserError(f"{setting('model.decay_fraction')} must be in (0, 1], got {decay_fraction}")
    if decay_steps is not None and decay_steps < 1:
        raise UserError(f"{setting('model.decay_steps')} must be at least 1, got {decay_steps}")
    if ema is not None and not 0.0 < ema < 1.0:
        raise UserError(
            f"{setting('model.ema')} is the average's decay, between 0 and 1 (e.g. 0.999), got {ema}"
        )
    if ema is not None and lora is not None:
        raise UserError(
            f"{setting('model.ema')} averages every weight, and a LoRA run's checkpoints hold the adapters only; "
            f"drop {setting('model.ema')} or {setting('model.lora')}"
        )
