"""Training throughput: nexttoken's step through Lightning vs a minimal hand-written PyTorch loop, and MFU.

    python benchmarks/train_throughput.py                  # ~1-3 min on 2 cores
    python benchmarks/train_throughput.py --steps 40 --batch 16
    python benchmarks/train_throughput.py --compile-check  # torch.compile vs eager, compile time included

Same model (GPT preset ``small`` at block 256, vocab 4096: 12.3M parameters, 10.6M without
embeddings), same batches, same initial weights, and the same math on both sides:

(a) ``Trainer.fit`` on ``CausalLMModule`` with ``nexttoken fit``'s production trainer defaults
    (``nexttoken.commands.fit.trainer_defaults()``: its precision, progress bar, CSV logger every 10 steps,
    checkpointing, gradient clipping at 1.0, the throughput callback), the module's own loss choice;
(b) a minimal loop: forward and loss under the same autocast as (a)'s precision (bf16-mixed on a CPU
    with native bf16), the same loss (fused or plain, as the module chose), backward, the same
    clipping, the same AdamW (``nexttoken.training.optim.build_optimizer``: fused kernel, same warmup), zero_grad.

A line before the results says what both run, or what differs (a compiled module, or a precision the
hand loop does not copy). (a)/(b) is then Lightning's and nexttoken's per-step overhead only.

Paired steps: after each step of (a), a callback runs one step of (b) on the same batch and
times it; (a)'s step is everything between the end of one (b) step and the start of the next
(Lightning's loop, data, logging, progress bar, the step itself). So (a) and (b) alternate step by
step and a busy moment on a shared machine hits both alike. tokens/s = median over the timed steps
(the first ``--warmup`` pairs are not timed).

MFU = tokens/s x ``GPT.flops_per_token(256)`` (6N + attention) / the peak of the math the matmuls run
in (``nexttoken.peak.peak_flops``: on a CPU the measured peak over every thread count, cached; it is
read again after the run and the higher reading kept). The peak and its source are printed. The last
two lines are the goals: MFU >= 0.40, then (a)/(b) >= 0.95.

``--compile-check`` instead measures ``torch.compile`` against eager for the default ``nexttoken fit``
run (preset, batch, block and max_steps read from the code's defaults): steady-state step time
(paired, hand loop), compile time (first training and first validation steps), and the end-to-end
ratio for the default run length.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import statistics
import tempfile
import time
import warnings

import torch
from _common import plain_step, random_batches

from nexttoken.models.gpt import GPT, GPTConfig
from nexttoken.peak import peak_flops, precision_dtype
from nexttoken.training.optim import build_optimizer
from nexttoken.training.threads import fastest_num_threads
from nexttoken.training.throughput import mfu

RATIO_GOAL, MFU_GOAL = 0.95, 0.40


def build(preset: str, vocab: int, block: int) -> GPT:
    torch.manual_seed(1234)
    return GPT(GPTConfig.from_preset(preset, vocab, block_size=block))


class HandLoop:
    """(b): the minimal loop, one step at a time. ``math``: what (a) runs (:func:`fit_math`);
    by default fp32, the plain loss, no clipping."""

    def __init__(
        self, args: argparse.Namespace, max_steps: int, compile: bool = False, math: dict | None = None
    ) -> None:
        math = math or {}
        self.model = build(args.preset, args.vocab, args.block)
        if compile:
            self.model.compile()
        self.optimizer, self.schedule = build_optimizer(
            self.model, lr=args.lr, warmup_steps=math.get("warmup_steps", 10), max_steps=max_steps
        )
        self.autocast = math.get("autocast")
        self.fused = math.get("fused_loss", False)
        self.clip = math.get("clip")
        self.model.train()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        plain_step(
            self.model,
            self.optimizer,
            x,
            y,
            fused=self.fused,
            clip=self.clip,
            schedule=self.schedule,
            autocast=self.autocast,
        )


def build_module(args: argparse.Namespace):
    """(a)'s module, with (b)'s initial weights."""
    from nexttoken.training.module import CausalLMModule

    class Module(CausalLMModule):
        def _build_network(self):
            network = build(args.preset, args.vocab, args.block)  # the same initial weights as (b)
            self.hparams.block_size = network.config.block_size
            return network

    module = Module(
        model=args.preset,
        vocab_size=args.vocab,
        block_size=args.block,
        lr=args.lr,
        warmup_steps=10,
        fused_loss=args.fused_loss,
    )
    module.configure_model()  # built now (on a CPU, never compiled), so its loss choice is known
    return module


def fit_math(args: argparse.Namespace, module, total: int) -> dict:
    """What (a) computes, for (b) to compute the same: precision (autocast dtype), loss, clipping,
    warmup; and ``differs``, what (b) cannot copy."""
    from nexttoken.commands.fit import trainer_defaults

    precision = str(trainer_defaults()["precision"])
    differs = []
    autocast = None
    if precision == "bf16-mixed":
        autocast = torch.bfloat16
    elif precision not in ("32-true", "32"):
        differs.append(f"(a) runs {precision}, (b) fp32")
    if module.compiled:
        differs.append("(a) is compiled, (b) eager")
    return {
        "precision": precision,
        "autocast": autocast,
        "fused_loss": module.uses_fused_loss,
        "clip": None if args.no_clip else 1.0,
        # The module caps its warmup at a tenth of the run.
        "warmup_steps": min(module.hparams.warmup_steps, max(total // 10, 1)),
        "differs": differs,
    }


def describe_math(math: dict) -> str:
    what = (
        f"{math['precision']} ({'bf16 autocast' if math['autocast'] else 'fp32'}), "
        f"{'fused' if math['fused_loss'] else 'plain'} loss, fused AdamW (build_optimizer), "
        f"gradient clipping {math['clip'] or 'off'}, warmup {math['warmup_steps']} steps"
    )
    if math["differs"]:
        return f"(a) and (b) differ: {'; '.join(math['differs'])}; otherwise both run {what}"
    return f"same math on both sides: {what}"


def paired_run(args: argparse.Namespace, module, math: dict) -> tuple[list[float], list[float], dict]:
    """Lightning fit of (a) with one (b) step after each of its steps; returns both step times."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    from nexttoken.commands.fit import trainer_defaults

    total = args.warmup + args.steps
    batches = random_batches(total, args.batch, args.block, args.vocab)
    hand = HandLoop(args, total, math=math)

    class Paired(L.Callback):
        def __init__(self) -> None:
            self.b_start: list[float] = []
            self.b_end: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.b_start.append(time.perf_counter())
            hand.step(*batch)
            self.b_end.append(time.perf_counter())

    paired = Paired()
    with tempfile.TemporaryDirectory() as out_dir:
        defaults = trainer_defaults()
        defaults.pop("logger")
        defaults.update(
            max_steps=total,
            default_root_dir=out_dir,
            accelerator="cpu",
            devices=1,
            logger=CSVLogger(out_dir, name=""),
            callbacks=[*defaults["callbacks"], paired],
            limit_val_batches=0,
            num_sanity_val_steps=0,
        )
        if args.no_clip:
            defaults["gradient_clip_val"] = None
        sink = io.StringIO()
        quiet = contextlib.redirect_stdout(sink) if args.quiet else contextlib.nullcontext()
        quiet_err = contextlib.redirect_stderr(sink) if args.quiet else contextlib.nullcontext()
        with warnings.catch_warnings(), quiet, quiet_err:
            warnings.simplefilter("ignore")
            logging.getLogger("lightning.pytorch").setLevel(logging.WARNING if args.quiet else logging.INFO)
            trainer = L.Trainer(**defaults)
            trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    a = [paired.b_start[i] - paired.b_end[i - 1] for i in range(1, len(paired.b_start))]
    b = [paired.b_end[i] - paired.b_start[i] for i in range(len(paired.b_start))]
    info = {
        "fused_loss": module.uses_fused_loss,
        "precision": str(trainer.precision),
        "clip": defaults.get("gradient_clip_val"),
        "compiled": getattr(module, "compiled", False),
    }
    if info["compiled"] and not any("compiled" in d for d in math["differs"]):
        math["differs"].append("(a) was compiled, (b) eager")
        print(describe_math(math))
    if info["precision"] != math["precision"] or info["fused_loss"] != math["fused_loss"]:
        raise RuntimeError(f"(a) ran {info}, not what (b) copied: {math}")
    # a[i] is step i+1 of (a); drop warm-up steps from both.
    return a[args.warmup - 1 :], b[args.warmup :], info


def choose_threads(args: argparse.Namespace, batch: int, math: dict | None = None) -> None:
    """--threads auto: time the training step under 1 thread and all cores, keep the faster."""
    if args.threads != "auto":
        return
    cores = torch.get_num_threads()
    hand = HandLoop(args, 100, math=math)
    x, y = random_batches(1, batch, args.block, args.vocab, seed=99)[0]
    hand.step(x, y)
    best, medians = fastest_num_threads(lambda: hand.step(x, y), candidates=sorted({1, cores}))
    print("threads: " + ", ".join(f"{n}: {t * 1e3:.0f} ms/step" for n, t in medians.items()) + f" -> {best}")


def throughput_main(args: argparse.Namespace) -> None:
    total = args.warmup + args.steps
    module = build_module(args)
    math = fit_math(args, module, total)
    choose_threads(args, args.batch, math)
    model = build(args.preset, args.vocab, args.block)
    tokens_per_step = args.batch * args.block
    flops_per_token = model.flops_per_token(args.block)
    print(
        f"GPT {args.preset}: {model.num_parameters() / 1e6:.2f}M parameters "
        f"({model.num_parameters(True) / 1e6:.2f}M non-embedding), block {args.block}, vocab {args.vocab}, "
        f"batch {args.batch} ({tokens_per_step} tokens/step), {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    print(describe_math(math))
    dtype = precision_dtype(math["precision"])
    before = peak_flops("cpu", dtype)  # measured on first use, then cached
    a, b, info = paired_run(args, module, math)
    peak = peak_flops("cpu", dtype, refresh=True)  # read again; the cache keeps the higher reading
    fit_tps, hand_tps = tokens_per_step / statistics.median(a), tokens_per_step / statistics.median(b)
    pair_ratio = statistics.median(bi / ai for ai, bi in zip(a, b))
    best_a = tokens_per_step / min(a)
    print(
        f"{flops_per_token / 1e6:.1f} MFLOP per token (6N + attention); MFU peak: {peak.describe()} "
        f"(before the run: {before.flops / 1e9:.0f} GFLOP/s)"
    )
    print(
        f"(a) nexttoken + Lightning: {fit_tps:8.0f} tokens/s median, {best_a:8.0f} best  ({len(a)} steps; "
        f"fused_loss={info['fused_loss']}, precision {info['precision']}, gradient_clip_val={info['clip']})"
    )
    print(
        f"(b) hand-written loop:     {hand_tps:8.0f} tokens/s median, {tokens_per_step / min(b):8.0f} best  "
        f"({len(b)} steps; fused_loss={math['fused_loss']}, autocast {math['autocast']}, clip={math['clip']})"
    )
    print(f"median of per-pair ratios (a)/(b): {pair_ratio:.3f}")
    utilization = mfu(fit_tps, flops_per_token, peak.flops)
    hand_mfu = mfu(hand_tps, flops_per_token, peak.flops)
    print(
        f"MFU of (a): {utilization:.3f} ({fit_tps * flops_per_token / 1e9:.0f} GFLOP/s), best step "
        f"{mfu(best_a, flops_per_token, peak.flops):.3f}; of (b): {hand_mfu:.3f}; of {peak.describe()}"
    )
    ratio = fit_tps / hand_tps
    print(
        f"mfu lightning/machine_peak: ratio={utilization:.3f} goal>={MFU_GOAL:.2f} "
        f"{'PASS' if utilization >= MFU_GOAL else 'MISS'}"
    )
    print(
        f"train_throughput lightning/hand: ratio={ratio:.3f} goal>={RATIO_GOAL:.2f} "
        f"{'PASS' if ratio >= RATIO_GOAL else 'MISS'}"
    )


# --------------------------------------------------------------------------- torch.compile, end to end
def compile_main(args: argparse.Namespace) -> None:
    import inspect

    if not args.warm_cache:
        # A first run compiles from scratch; inductor's on-disk caches would hide most of that.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")

    from nexttoken.commands.fit import trainer_defaults
    from nexttoken.data.datamodule import TextDataModule
    from nexttoken.training.module import CausalLMModule

    def default(cls, name):
        return inspect.signature(cls.__init__).parameters[name].default

    defaults = trainer_defaults()
    preset = args.preset_override or default(CausalLMModule, "model")
    batch = args.batch_override or default(TextDataModule, "batch_size")
    block = default(TextDataModule, "block_size")
    vocab = default(TextDataModule, "vocab_size")
    run_steps = defaults["max_steps"]
    validations = run_steps // defaults["val_check_interval"] + 1  # + the final one
    ns = argparse.Namespace(
        **{**vars(args), "preset": preset, "vocab": vocab, "block": block, "batch": batch}
    )
    choose_threads(ns, batch)
    print(
        f"default nexttoken fit: preset {preset}, batch {batch} x block {block}, vocab {vocab}, "
        f"{run_steps} steps, {validations} validations; {torch.get_num_threads()} threads"
    )
    batches = random_batches(args.warmup + args.steps, batch, block, vocab)

    eager = HandLoop(ns, run_steps)
    compiled = HandLoop(ns, run_steps, compile=True)
    eager_first = compiled_first = 0.0
    for i in range(2):  # the first steps: compilation (forward+backward graphs), then a settle step
        t = time.perf_counter()
        eager.step(*batches[i])
        eager_first += time.perf_counter() - t
        t = time.perf_counter()
        compiled.step(*batches[i])
        compiled_first += time.perf_counter() - t
    # Validation runs the model in eval mode without gradients: another graph to compile.
    x_val = batches[0][0]
    t = time.perf_counter()
    with torch.no_grad():
        compiled.model.eval()
        compiled.model(x_val)
        compiled.model.train()
    compiled_val_first = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        eager.model.eval()
        eager.model(x_val)
        eager.model.train()
    eager_val_first = time.perf_counter() - t

    te, tc = [], []
    for x, y in batches[2:]:
        t = time.perf_counter()
        eager.step(x, y)
        te.append(time.perf_counter() - t)
        t = time.perf_counter()
        compiled.step(x, y)
        tc.append(time.perf_counter() - t)
    step_e, step_c = statistics.median(te), statistics.median(tc)
    compile_cost = (compiled_first - 2 * step_c) + (compiled_val_first - eager_val_first)
    e2e_eager = run_steps * step_e
    e2e_compiled = compile_cost + run_steps * step_c
    steady = step_c / step_e
    print(
        f"steady state: eager {step_e * 1e3:.1f} ms/step, compiled {step_c * 1e3:.1f} ms/step "
        f"(median of {len(te)} paired steps)"
    )
    print(
        f"compile time: {compiled_first - 2 * step_c:.1f} s training graphs + "
        f"{compiled_val_first - eager_val_first:.1f} s validation graph"
    )
    print(
        f"default run ({run_steps} steps): eager {e2e_eager:.0f} s, compiled {e2e_compiled:.0f} s of training "
        f"steps (validation passes add the same to both)"
    )
    print(f"compile steady-state compiled/eager step time: ratio={steady:.3f}")
    ratio = e2e_compiled / e2e_eager
    print(
        f"compile end_to_end compiled/eager time: ratio={ratio:.3f} goal<1.0 {'PASS' if ratio < 1 else 'MISS'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--threads",
        default="auto",
        help="torch threads: a number, or auto (default): time a step with 1 and with all "
        "cores and keep the faster (on a shared CPU 1 thread can be several times faster)",
    )
    parser.add_argument(
        "--fused-loss",
        default="auto",
        choices=["auto", "on", "off"],
        help="the module's fused_loss setting (the hand loop uses the loss the module chose)",
    )
    parser.add_argument(
        "--no-clip",
        action="store_true",
        help="turn gradient clipping off, (a)'s production setting and (b)'s",
    )
    parser.add_argument("--verbose", dest="quiet", action="store_false", help="show Lightning's output")
    parser.add_argument("--compile-check", action="store_true", help="torch.compile vs eager, end to end")
    parser.add_argument(
        "--warm-cache",
        action="store_true",
        help="--compile-check: keep inductor's on-disk cache (default: a fresh one, as a first run)",
    )
    parser.add_argument("--preset-override", default=None, help="--compile-check: another preset")
    parser.add_argument("--batch-override", type=int, default=None, help="--compile-check: another batch")
    args = parser.parse_args()
    if args.threads != "auto":
        torch.set_num_threads(int(args.threads))
    if args.compile_check:
        compile_main(args)
    else:
        throughput_main(args)


if __name__ == "__main__":
    main()
