"""Training throughput: nexttoken's step through Lightning vs a minimal hand-written PyTorch loop, and MFU.

    python benchmarks/train_throughput.py                  # ~1-3 min on 2 cores
    python benchmarks/train_throughput.py --steps 40 --batch 16
    python benchmarks/train_throughput.py --compile-check  # torch.compile vs eager, compile time included

Same model (GPT preset ``small`` at block 256, vocab 4096: 12.3M parameters, 10.6M without
embeddings), same batches, same AdamW (``nexttoken.training.optim.build_optimizer``), same initial weights:

(a) ``Trainer.fit`` on ``CausalLMModule`` with ``nexttoken fit``'s production trainer defaults
    (``nexttoken.commands.fit.trainer_defaults()``: progress bar, CSV logger every 10 steps, checkpointing,
    gradient clipping at 1.0, the throughput callback), the module's own loss choice (fused here);
(b) a minimal loop: forward, ``next_token_loss``, backward, AdamW step, zero_grad (``--hand-clip``
    adds the same gradient clipping).

Paired steps: after each step of (a), a callback runs one step of (b) on the same batch and
times it; (a)'s step is everything between the end of one (b) step and the start of the next
(Lightning's loop, data, logging, progress bar, the step itself). So (a) and (b) alternate step by
step and a busy moment on a shared machine hits both alike. tokens/s = median over the timed steps
(the first ``--warmup`` pairs are not timed).

MFU = tokens/s x ``GPT.flops_per_token(256)`` (6N + attention) / the fp32 matmul peak, measured and
cached by ``nexttoken.training.throughput`` (the highest reading kept). The last two lines are the goals:
MFU >= 0.40, then (a)/(b) >= 0.95.

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
from nexttoken.peak import measure_matmul_peak, store_matmul_peak
from nexttoken.training.optim import build_optimizer
from nexttoken.training.threads import fastest_num_threads
from nexttoken.training.throughput import mfu

RATIO_GOAL, MFU_GOAL = 0.95, 0.40


def build(preset: str, vocab: int, block: int) -> GPT:
    torch.manual_seed(1234)
    return GPT(GPTConfig.from_preset(preset, vocab, block_size=block))


class HandLoop:
    """(b): the minimal loop, one step at a time."""

    def __init__(self, args: argparse.Namespace, max_steps: int, compile: bool = False) -> None:
        self.model = build(args.preset, args.vocab, args.block)
        if compile:
            self.model.compile()
        self.optimizer, self.schedule = build_optimizer(
            self.model, lr=args.lr, warmup_steps=10, max_steps=max_steps
        )
        self.clip = args.hand_clip
        self.model.train()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        plain_step(self.model, self.optimizer, x, y, clip=1.0 if self.clip else None, schedule=self.schedule)


def paired_run(args: argparse.Namespace) -> tuple[list[float], list[float], dict]:
    """Lightning fit of (a) with one (b) step after each of its steps; returns both step times."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    from nexttoken.commands.fit import trainer_defaults
    from nexttoken.training.module import CausalLMModule

    total = args.warmup + args.steps
    batches = random_batches(total, args.batch, args.block, args.vocab)
    hand = HandLoop(args, total)

    class Paired(L.Callback):
        def __init__(self) -> None:
            self.b_start: list[float] = []
            self.b_end: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.b_start.append(time.perf_counter())
            hand.step(*batch)
            self.b_end.append(time.perf_counter())

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
    }
    # a[i] is step i+1 of (a); drop warm-up steps from both.
    return a[args.warmup - 1 :], b[args.warmup :], info


def choose_threads(args: argparse.Namespace, batch: int) -> None:
    """--threads auto: time the training step under 1 thread and all cores, keep the faster."""
    if args.threads != "auto":
        return
    cores = torch.get_num_threads()
    hand = HandLoop(args, 100)
    x, y = random_batches(1, batch, args.block, args.vocab, seed=99)[0]
    hand.step(x, y)
    best, medians = fastest_num_threads(lambda: hand.step(x, y), candidates=sorted({1, cores}))
    print("threads: " + ", ".join(f"{n}: {t * 1e3:.0f} ms/step" for n, t in medians.items()) + f" -> {best}")


def throughput_main(args: argparse.Namespace) -> None:
    choose_threads(args, args.batch)
    model = build(args.preset, args.vocab, args.block)
    tokens_per_step = args.batch * args.block
    flops_per_token = model.flops_per_token(args.block)
    print(
        f"GPT {args.preset}: {model.num_parameters() / 1e6:.2f}M parameters "
        f"({model.num_parameters(True) / 1e6:.2f}M non-embedding), block {args.block}, vocab {args.vocab}, "
        f"batch {args.batch} ({tokens_per_step} tokens/step), {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    threads, cores = torch.get_num_threads(), os.cpu_count() or torch.get_num_threads()
    readings = [measure_matmul_peak("cpu", torch.float32)]
    a, b, info = paired_run(args)
    readings.append(measure_matmul_peak("cpu", torch.float32))
    peak = store_matmul_peak(max(readings), "cpu", torch.float32)  # the cache keeps the highest reading
    # The machine's peak is that of all its cores; under load 1 thread may train faster, but MFU is
    # then still counted against what the whole CPU can do, whichever thread count reads higher.
    torch.set_num_threads(cores)
    peak_all = store_matmul_peak(measure_matmul_peak("cpu", torch.float32), "cpu", torch.float32)
    torch.set_num_threads(threads)
    machine_peak = max(peak, peak_all)
    fit_tps, hand_tps = tokens_per_step / statistics.median(a), tokens_per_step / statistics.median(b)
    pair_ratio = statistics.median(bi / ai for ai, bi in zip(a, b))
    best_a = tokens_per_step / min(a)
    print(
        f"{flops_per_token / 1e6:.1f} MFLOP per token (6N + attention); fp32 matmul peak (cached, highest "
        f"reading kept): {peak / 1e9:.0f} GFLOP/s with {threads} thread(s) ({max(readings) / 1e9:.0f} around this "
        f"run), {peak_all / 1e9:.0f} GFLOP/s with all {cores} cores"
    )
    print(
        f"(a) nexttoken + Lightning: {fit_tps:8.0f} tokens/s median, {best_a:8.0f} best  ({len(a)} steps; "
        f"fused_loss={info['fused_loss']}, precision {info['precision']}, gradient_clip_val={info['clip']})"
    )
    print(
        f"(b) hand-written loop:     {hand_tps:8.0f} tokens/s median, {tokens_per_step / min(b):8.0f} best  "
        f"({len(b)} steps; clip={args.hand_clip})"
    )
    print(f"median of per-pair ratios (a)/(b): {pair_ratio:.3f}")
    print(
        f"MFU of (a): {mfu(fit_tps, flops_per_token, peak):.3f} of the {threads}-thread peak, "
        f"{mfu(fit_tps, flops_per_token, machine_peak):.3f} of the machine's peak "
        f"({machine_peak / 1e9:.0f} GFLOP/s); best step {mfu(best_a, flops_per_token, machine_peak):.3f}"
    )
    ratio = fit_tps / hand_tps
    utilization = mfu(fit_tps, flops_per_token, machine_peak)
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
        help="the module's fused_loss setting (the hand loop always uses the plain loss)",
    )
    parser.add_argument("--no-clip", action="store_true", help="turn (a)'s production gradient clipping off")
    parser.add_argument("--hand-clip", action="store_true", help="(b) clips gradients too")
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
