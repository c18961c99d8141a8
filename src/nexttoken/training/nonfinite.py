"""Non-finite training steps (NaN or inf in the loss or in a gradient): found on the device, kept
out of the weights, and reported without making a GPU wait for the host on every step.

Each optimizer step, :meth:`NonFiniteGuard.before_step` rescales the gradients and checks them and
the loss in one multi-tensor kernel per (device, dtype) (``torch._amp_foreach_non_finite_check_and_unscale_``,
the kernel torch's own loss scaler uses), leaving a 0/1 flag on the device. Optimizers that can skip
a step themselves (fused AdamW: ``_step_supports_amp_scaling``) get that flag as ``found_inf``, and
their kernel leaves every parameter, moment and step count untouched when it is 1: no host sync at
all. The flag is read on the host only at :meth:`NonFiniteGuard.check`: every ``log_every_n_steps``
steps, before any checkpoint is written, before validation and at the end of training. Other
optimizers are checked on the host at once (one sync per step, as before).

``stop``: the first non-finite step and every later one are skipped on the device, so the weights
stay those from before it; the next check raises, naming the step and the last good checkpoint.
``skip``: non-finite steps are skipped and training goes on; the next check prints a warning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from nexttoken.errors import UserError, setting

if TYPE_CHECKING:
    import lightning as L

OnNonFinite = Literal["stop", "skip"]


class NonFiniteGuard:
    """Finds, skips and reports non-finite optimizer steps of one LightningModule (see module doc)."""

    def __init__(self, policy: OnNonFinite) -> None:
        self.policy = policy
        self._count: Tensor | None = None  # non-finite steps so far (device)
        self._first_step: Tensor | None = None  # first unreported one, -1 if none (device)
        self._first_loss: Tensor | None = None  # its loss (device)
        self._reported = 0
        self._last_check_step = 0

    def before_step(
        self, module: L.LightningModule, optimizer: torch.optim.Optimizer, loss: Tensor, factor: Tensor
    ) -> None:
        """Multiply every gradient by ``factor`` (a scalar tensor) and flag a non-finite ``loss`` or
        gradient for this step; skip the step on the device where the optimizer allows it."""
        trainer = module.trainer
        grads: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for p in module.parameters():
            if p.grad is not None:
                grads.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        found = (~torch.isfinite(loss)).float().reshape(1)
        for (device, _), group in grads.items():
            found_here = torch.zeros(1, device=device)
            inv_scale = factor.to(device=device, dtype=torch.float32).reshape(1)
            torch._amp_foreach_non_finite_check_and_unscale_(group, found_here, inv_scale)
            found = found + found_here.to(found.device)
        if trainer.world_size > 1:  # a gradient shard may be bad on one rank only (FSDP)
            found = trainer.strategy.reduce(found, reduce_op="sum")
        if self._count is None:
            self._count = torch.zeros((), dtype=torch.int64, device=found.device)
            self._first_step = torch.full((), -1, dtype=torch.int64, device=found.device)
            self._first_loss = torch.zeros((), dtype=torch.float32, device=found.device)
        bad = found.reshape(()) > 0
        if self.policy == "stop":
            bad = bad | (self._count > 0)  # stopping: keep the weights from before the first bad step
        step = trainer.global_step + 1
        first = bad & (self._first_step < 0)
        self._first_step = torch.where(first, step, self._first_step)
        self._first_loss = torch.where(first, loss.to(self._first_loss.device), self._first_loss)
        self._count = self._count + bad
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None and getattr(optimizer, "_step_supports_amp_scaling", False):
            optimizer.found_inf = bad.float()  # the fused kernel skips the whole step if 1
            return
        if bool(bad):  # this optimizer cannot skip a step by itself: decide on the host, now
            optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without gradients as they are
            self.check(module)

    def maybe_check(self, module: L.LightningModule, every: int) -> None:
        """:meth:`check` if ``every`` optimizer steps have passed since the last check."""
        step = module.trainer.global_step
        if step - self._last_check_step >= max(1, every):
            self.check(module)

    def check(self, module: L.LightningModule) -> None:
        """Read the flags on the host (one sync): warn about skipped steps, or stop training."""
        self._last_check_step = module.trainer.global_step
        if self._count is None:
            return
        count = int(self._count)
        if count == self._reported:
            return
        step, loss = int(self._first_step), float(self._first_loss)
        more = count - self._reported - 1
        self._reported = count
        self._first_step.fill_(-1)
        what = (
            f"non-finite loss ({loss})"
            if not torch.isfinite(torch.tensor(loss))
            else (f"non-finite gradient (loss {loss:.4f})")
        )
        if self.policy == "skip":
            extra = f" (and {more} more such step{'s' if more > 1 else ''} since)" if more > 0 else ""
            module.print(f"warning: {what} at step {step}; the step was skipped{extra}")
            return
        callback = module.trainer.checkpoint_callback
        last_good = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        raise UserError(
            f"{what} at step {step}; training stopped (no update since), the last good checkpoint is "
            f"{last_good or '(none saved yet)'}; lower {setting('model.lr')}, or pass "
            f"{setting('model.on_nonfinite')} skip to skip such steps"
        )
