"""GPU check: GPT-2 124M training through nexttoken on one CUDA GPU, in a few minutes.

    python benchmarks/gpu_check.py                       # on an H100/H200: ~4-6 min
    python benchmarks/gpu_check.py --skip fp32,compile   # lighter
    python benchmarks/gpu_check.py --dry-run             # the same code on the CPU, tiny model (~2 min)

Sections (each fails soft: an error is recorded in the summary and the next section runs):

1. environment: torch/lightning versions, GPU name and count, which fused linear + cross-entropy
   nexttoken uses (torch's ``F.linear_cross_entropy`` for fp32 where torch >= 2.13 has it, its own
   chunked implementation otherwise and under bf16 autocast).
2. auto_precision: what ``nexttoken.precision.auto_precision`` picks on this GPU (expected: bf16-mixed).
3. matmul peak: measured bf16 (and fp32) 8192-square matmul FLOP/s, next to the peak MFU is counted
   against (``nexttoken.peak.peak_flops``: the datasheet's dense number on a known GPU, else measured).
4. training step, GPT-2 124M (preset ``gpt2``, vocab 50257, block 1024, batch 16), random tokens,
   through the production path: ``CausalLMModule`` + ``lightning.Trainer`` with ``nexttoken fit``'s
   trainer defaults (progress bar, logging, gradient clipping, throughput callback; checkpointing off).
   Runs: bf16-mixed eager; bf16-mixed with ``compile=True``; bf16-mixed with the plain loss; 32-true.
   Each: tokens/s (synchronized, over the timed steps), peak memory, MFU against the peak of the math
   its matmuls run in (``peak_flops``, as ``nexttoken fit`` counts it; the peak and its source are
   printed), and host syncs per step (``torch.cuda.set_sync_debug_mode``: every
   operation that makes the CPU wait for the GPU during the timed steps, counted).
5. the same bf16-mixed step as a plain PyTorch loop (same model, loss, AdamW, bf16 autocast (on the
   CPU too), clipping, compile setting as the fastest Lightning run): Lightning's overhead on a fast
   GPU step.
6. fused loss: plain vs fused (each implementation this torch has), hidden 768, vocab 50257, 8192
   tokens, fp32 and under bf16 autocast: loss and gradients equal to the plain path's, peak memory
   (goal: <= 1/5 of the plain path's) and time.
7. multi-GPU smoke (DDP, 2 steps): only with more than one GPU; skipped otherwise.

The last lines are ``GPU_CHECK_SUMMARY {json}`` (every number, every error) and the goal lines:
MFU >= 0.40 of the bf16 peak (the dense datasheet number on a known GPU); Lightning/plain loop >= 0.95;
fused/plain peak memory <= 0.20.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

try:  # run from a checkout without installing: use its src/
    import nexttoken  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch
from _common import plain_step, random_batches

SUMMARY: dict = {"sections": {}}


def section(name: str):
    """Decorator: run a section, record its result or its error, never raise."""

    def wrap(fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            print(f"\n== {name}", flush=True)
            try:
                result = fn(*args, **kwargs)
                SUMMARY["sections"][name] = {"ok": True, **(result or {})}
            except Exception as error:  # noqa: BLE001 - fail soft, report, go on
                traceback.print_exc()
                SUMMARY["sections"][name] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
                result = None
            finally:
                SUMMARY["sections"].setdefault(name, {})["seconds"] = round(time.perf_counter() - start, 1)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            return result

        return run

    return wrap


def has_fused_loss() -> bool:
    from nexttoken.loss import torch_has_fused_loss

    return torch_has_fused_loss()


class SyncCounter:
    """Counts operations that make the host wait for the GPU (torch's sync debug mode) in a block."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.count = device, 0
        self._catch = None

    def __enter__(self):
        if self.device.type == "cuda":
            self._catch = warnings.catch_warnings(record=True)
            self._records = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        if self._catch is not None:
            torch.cuda.set_sync_debug_mode("default")
            self.count = sum("synchroniz" in str(w.message) for w in self._records)
            self._catch.__exit__(*exc)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device, baseline: int = 0) -> float | None:
    if device.type != "cuda":
        return None
    return round((torch.cuda.max_memory_allocated(device) - baseline) / 2**30, 3)


# --------------------------------------------------------------------------- sections
@section("environment")
def environment(args, device):
    import lightning

    info = {
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "torch_has_fused_loss": has_fused_loss(),
    }
    from nexttoken.loss import fused_loss_backend

    info["fused_loss_fp32"] = fused_loss_backend(torch.float32)
    info["fused_loss_bf16_autocast"] = fused_loss_backend(torch.bfloat16)
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        info["memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    print(json.dumps(info))
    return info


@section("auto_precision")
def check_auto_precision(args, device):
    from nexttoken.precision import auto_precision

    precision, reason = auto_precision(device)
    expected = (
        "bf16-mixed" if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8 else None
    )
    print(f"auto_precision: {precision} ({reason})")
    ok = expected is None or precision == expected
    if not ok:
        raise AssertionError(f"auto_precision picked {precision}, expected {expected}")
    return {"precision": precision, "reason": reason, "expected": expected}


@section("matmul_peak")
def matmul_peak(args, device):
    from nexttoken.peak import measure_matmul_peak, peak_flops

    size = 256 if args.tiny else 8192
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        flops = measure_matmul_peak(device, dtype, size=size, repeats=5)
        out[f"measured_{name}_tflops"] = round(flops / 1e12, 2)
        # What MFU is counted against for this dtype, and where that number comes from.
        out[f"mfu_peak_{name}"] = peak_flops(device, dtype).describe()
    out["fp32_matmul_precision"] = torch.get_float32_matmul_precision()
    print(json.dumps(out))
    return out


def model_shape(args) -> dict:
    if args.tiny:
        return {"preset": "tiny", "vocab": 512, "block": 64}
    return {"preset": "gpt2", "vocab": 50257, "block": 1024}


def trainer_settings() -> dict:
    """nexttoken fit's trainer defaults; a copy of the speed-relevant ones if the CLI can't load."""
    try:
        from nexttoken.commands.fit import trainer_defaults

        defaults = trainer_defaults()
        callbacks = [c for c in defaults.get("callbacks", []) if type(c).__name__ != "ModelCheckpoint"]
        return {
            "log_every_n_steps": defaults.get("log_every_n_steps", 10),
            "gradient_clip_val": defaults.get("gradient_clip_val", 1.0),
            "callbacks": callbacks,
            "source": "nexttoken.commands.fit.trainer_defaults",
        }
    except Exception as error:  # noqa: BLE001
        from nexttoken.training.throughput import ThroughputCallback

        return {
            "log_every_n_steps": 10,
            "gradient_clip_val": 1.0,
            "callbacks": [ThroughputCallback()],
            "source": f"fallback copy ({type(error).__name__}: {error})",
        }


def lightning_run(args, device, precision: str, fused_loss: str, compile: bool) -> dict:
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    from nexttoken.peak import peak_flops, precision_dtype
    from nexttoken.training.module import CausalLMModule

    shape = model_shape(args)
    total = args.warmup + args.steps
    batches = random_batches(total, args.batch, shape["block"], shape["vocab"])
    counter = SyncCounter(device)

    class Timer(L.Callback):
        """Synchronized clock at the end of the warm-up and of the last step: honest tokens/s; host
        syncs counted in between (the two clock syncs excluded)."""

        start = end = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx + 1 == args.warmup:
                sync(device)
                self.start = time.perf_counter()
                counter.__enter__()
            elif batch_idx + 1 == total:
                counter.__exit__(None, None, None)
                sync(device)
                self.end = time.perf_counter()

    module = CausalLMModule(
        model=shape["preset"],
        vocab_size=shape["vocab"],
        block_size=shape["block"],
        fused_loss=fused_loss,
        compile=compile,
    )
    settings = trainer_settings()
    timer = Timer()
    reset_peak(device)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator=device.type,
            devices=1,
            precision=precision,
            max_steps=total,
            default_root_dir=tmp,
            logger=CSVLogger(tmp, name=""),
            enable_checkpointing=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            log_every_n_steps=settings["log_every_n_steps"],
            gradient_clip_val=settings["gradient_clip_val"],
            callbacks=[*settings["callbacks"], timer],
        )
        sink = io.StringIO()  # the progress bar still renders (its cost counts), out of sight
        with warnings.catch_warnings(), contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            started = time.perf_counter()
            trainer.fit(
                module,
                train_dataloaders=DataLoader(batches, batch_size=None, pin_memory=device.type == "cuda"),
            )
            fit_seconds = time.perf_counter() - started
    seconds = timer.end - timer.start
    tokens = args.steps * args.batch * shape["block"]
    tps = tokens / seconds
    fpt = module.model.flops_per_token(shape["block"])
    out = {
        "precision": precision,
        "compile": compile,
        "fused_loss": module.uses_fused_loss,
        "tokens_per_sec": round(tps),
        "step_ms": round(1000 * seconds / args.steps, 2),
        "first_steps_s": round(fit_seconds - seconds, 1),  # set-up, warm-up steps, compilation
        "host_syncs_per_step": round(counter.count / max(1, args.steps - 1), 2)
        if device.type == "cuda"
        else None,
        "peak_mem_gib": peak_gib(device),
        "flops_per_token": fpt,
        "trainer_defaults": settings["source"],
        "final_loss": float(trainer.callback_metrics.get("train/loss", math.nan)),
    }
    # The peak nexttoken fit counts MFU against: the math its matmuls ran in, on this device.
    peak = peak_flops(device, precision_dtype(precision))
    out["mfu"] = round(tps * fpt / peak.flops, 4)
    out["mfu_peak"] = peak.describe()
    out["mfu_peak_is_datasheet"] = not peak.measured
    print(json.dumps(out), flush=True)
    del module, trainer
    return out


@section("train_step")
def train_step(args, device):
    skip = set(filter(None, args.skip.split(",")))
    runs = [("bf16-mixed", "auto", False), ("bf16-mixed", "auto", True), ("bf16-mixed", "off", False)]
    runs.append(("32-true", "auto", False))
    runs = [
        r for r in runs if not ("compile" in skip and r[2]) and not ("fp32" in skip and r[0] == "32-true")
    ]
    results = {}
    for precision, fused_loss, compile in runs:
        name = f"{precision}/fused_loss={fused_loss}/compile={compile}"
        try:
            results[name] = lightning_run(args, device, precision, fused_loss, compile)
        except Exception as error:  # noqa: BLE001 - one failed run must not hide the others
            traceback.print_exc()
            results[name] = {"error": f"{type(error).__name__}: {error}"}
    bf16 = results.get("bf16-mixed/fused_loss=auto/compile=False", {})
    fp32 = results.get("32-true/fused_loss=auto/compile=False", {})
    if bf16.get("tokens_per_sec") and fp32.get("tokens_per_sec"):
        results["speed_ratio_bf16_over_fp32"] = round(bf16["tokens_per_sec"] / fp32["tokens_per_sec"], 3)
    if bf16.get("peak_mem_gib") and fp32.get("peak_mem_gib"):
        results["memory_ratio_bf16_over_fp32"] = round(bf16["peak_mem_gib"] / fp32["peak_mem_gib"], 3)
    bf16_runs = {k: v for k, v in results.items() if k.startswith("bf16") and v.get("tokens_per_sec")}
    if bf16_runs:
        best = max(bf16_runs, key=lambda k: bf16_runs[k]["tokens_per_sec"])
        results["best_bf16"] = best
        results["best_bf16_mfu"] = bf16_runs[best].get("mfu")
        results["best_bf16_mfu_peak"] = bf16_runs[best].get("mfu_peak")
        results["best_bf16_mfu_peak_is_datasheet"] = bf16_runs[best].get("mfu_peak_is_datasheet")
    return results


@section("plain_loop")
def plain_loop(args, device):
    """The fastest Lightning bf16-mixed run's step without Lightning: same model, loss choice,
    AdamW, clipping, compile setting."""
    from nexttoken.models.gpt import GPT, GPTConfig
    from nexttoken.training.module import FUSED_LOSS_MIN_VOCAB_RATIO
    from nexttoken.training.optim import build_optimizer

    train = SUMMARY["sections"].get("train_step", {})
    best = train.get("best_bf16", "bf16-mixed/fused_loss=auto/compile=False")
    reference = train.get(best, {})
    compile = bool(reference.get("compile", False))
    shape = model_shape(args)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(shape["preset"], shape["vocab"], block_size=shape["block"])).to(device)
    if compile:
        model.compile()
    optimizer, schedule = build_optimizer(model, lr=3e-4, warmup_steps=10, max_steps=1000)
    ratio = shape["vocab"] >= FUSED_LOSS_MIN_VOCAB_RATIO * model.config.n_embd
    use_fused = "fused_loss=auto" in best and ratio
    total = args.warmup + args.steps
    batches = random_batches(total, args.batch, shape["block"], shape["vocab"])
    dtype = torch.bfloat16 if best.startswith("bf16") else None  # as the Lightning run, CPU included
    start = None
    for i, (x, y) in enumerate(batches):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        plain_step(model, optimizer, x, y, fused=use_fused, schedule=schedule, autocast=dtype)
        if i + 1 == args.warmup:
            sync(device)
            start = time.perf_counter()
    sync(device)
    seconds = time.perf_counter() - start
    tps = args.steps * args.batch * shape["block"] / seconds
    out = {
        "tokens_per_sec": round(tps),
        "step_ms": round(1000 * seconds / args.steps, 2),
        "fused_loss": use_fused,
        "compile": compile,
        "compared_with": best,
    }
    if reference.get("tokens_per_sec"):
        out["lightning_over_plain"] = round(reference["tokens_per_sec"] / tps, 3)
    print(json.dumps(out))
    return out


@section("fused_loss")
def fused_loss_check(args, device):
    """Plain vs fused next-token loss: same loss and gradients, peak memory, time."""
    import torch.nn.functional as F

    from nexttoken.loss import fused_next_token_loss, next_token_loss

    tokens, hidden_size, vocab = (512, 64, 2048) if args.tiny else (8192, 768, 50257)
    implementations = ["chunked"] + (["torch"] if has_fused_loss() else [])
    results = {}
    for mode in ("fp32", "bf16_autocast"):
        g = torch.Generator().manual_seed(0)
        h = torch.randn(tokens, hidden_size, generator=g).to(device).requires_grad_()
        w = (torch.randn(vocab, hidden_size, generator=g) * 0.02).to(device).requires_grad_()
        y = torch.randint(0, vocab, (tokens,), generator=g).to(device)
        y[::97] = -100
        variants = {"plain": lambda h=h, w=w, y=y: next_token_loss(F.linear(h, w), y, reduction="sum")}
        for impl in implementations:
            if mode != "fp32" and impl == "torch":
                continue  # "auto" never takes torch's op under autocast (its loss comes back in bf16)
            variants[impl] = lambda impl=impl, h=h, w=w, y=y: fused_next_token_loss(
                h, w, y, reduction="sum", implementation=impl
            )
        for name, fn in variants.items():
            times, peak = [], None
            for rep in range(4):
                h.grad = w.grad = None
                reset_peak(device)
                base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
                sync(device)
                t = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode != "fp32"):
                    loss = fn()
                loss.backward()
                sync(device)
                times.append(time.perf_counter() - t)
                if rep == 0:
                    peak = peak_gib(device, base)
            results[f"{mode}/{name}"] = {
                "peak_gib": peak,
                "ms": round(1000 * sorted(times[1:])[len(times[1:]) // 2], 2),
                "loss": float(loss.detach()),
                "grads": (h.grad.detach().clone(), w.grad.detach().clone()),
            }
        plain = results[f"{mode}/plain"]
        for impl in implementations:
            r = results.get(f"{mode}/{impl}")
            if r is None:
                continue
            r["loss_rel_diff"] = abs(r["loss"] - plain["loss"]) / abs(plain["loss"])
            r["grad_rel_diff"] = max(
                float((a - b).norm() / b.norm()) for a, b in zip(r["grads"], plain["grads"])
            )
            if plain["peak_gib"] and r["peak_gib"] is not None:
                r["memory_ratio"] = round(r["peak_gib"] / plain["peak_gib"], 3)
            r["time_ratio"] = round(r["ms"] / plain["ms"], 3)
    for key, r in results.items():
        r.pop("grads", None)
        print(key, json.dumps(r), flush=True)
    return results


@section("multi_gpu")
def multi_gpu(args, device):
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2:
        print(f"{n} GPU(s): skipped")
        return {"skipped": f"{n} GPU(s)"}
    import subprocess

    code = (
        "import sys, torch, lightning as L\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / 'src')!r})\n"
        "from torch.utils.data import DataLoader\n"
        "from nexttoken.training.module import CausalLMModule\n"
        "b=[(torch.randint(0,512,(2,64)),torch.randint(0,512,(2,64))) for _ in range(4)]\n"
        "m=CausalLMModule(model='tiny',vocab_size=512,block_size=64)\n"
        "t=L.Trainer(accelerator='gpu',devices=2,strategy='ddp',max_steps=2,logger=False,"
        "enable_checkpointing=False,enable_progress_bar=False,limit_val_batches=0,precision='bf16-mixed')\n"
        "t.fit(m,train_dataloaders=DataLoader(b,batch_size=None))\n"
        "print('ddp ok', t.global_step)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    print(out.stdout[-2000:], out.stderr[-2000:])
    if out.returncode != 0:
        raise RuntimeError(f"DDP smoke failed (exit {out.returncode})")
    return {"ddp": "ok"}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and shapes (CPU logic check)")
    parser.add_argument("--dry-run", action="store_true", help="= --device cpu --tiny")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 16; tiny 4)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; tiny 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; tiny 2)")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the model in the Lightning runs"
    )
    parser.add_argument(
        "--skip",
        default="",
        help="comma list of sections to skip, and of train_step runs: compile, fp32",
    )
    args = parser.parse_args()
    if args.dry_run:
        args.device, args.tiny = "cpu", True
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and not args.tiny:
        print("no CUDA device: running the tiny CPU variant (--tiny)")
        args.tiny = True
    args.batch = args.batch or (4 if args.tiny else 16)
    args.steps = args.steps or (3 if args.tiny else 20)
    args.warmup = args.warmup or (2 if args.tiny else 5)
    os.environ.setdefault("NEXTTOKEN_CACHE", tempfile.mkdtemp(prefix="nexttoken-gpu-check-"))
    SUMMARY["args"] = {k: v for k, v in vars(args).items()}
    started = time.perf_counter()
    skip = set(filter(None, args.skip.split(",")))
    for fn, name in (
        (environment, "environment"),
        (check_auto_precision, "auto_precision"),
        (matmul_peak, "matmul_peak"),
        (train_step, "train_step"),
        (plain_loop, "plain_loop"),
        (fused_loss_check, "fused_loss"),
        (multi_gpu, "multi_gpu"),
    ):
        if name in skip:
            SUMMARY["sections"][name] = {"skipped": "--skip"}
            continue
        fn(args, device)
    SUMMARY["seconds"] = round(time.perf_counter() - started, 1)
    SUMMARY["ok"] = all(s.get("ok", True) for s in SUMMARY["sections"].values())
    print("\nGPU_CHECK_SUMMARY " + json.dumps(SUMMARY, default=str))
    sections = SUMMARY["sections"]
    train = sections.get("train_step", {})
    mfu = train.get("best_bf16_mfu")
    print(f"MFU peak: {train.get('best_bf16_mfu_peak')}")
    name = "dense_bf16_peak" if train.get("best_bf16_mfu_peak_is_datasheet") else "measured_bf16_peak"
    print(f"gpu_check mfu/{name} ({train.get('best_bf16')}): {goal_line(mfu, '>=', 0.40)}")
    ratio = sections.get("plain_loop", {}).get("lightning_over_plain")
    print(f"gpu_check lightning/plain_loop tokens_per_sec: {goal_line(ratio, '>=', 0.95)}")
    for impl in ("chunked", "torch"):
        memory = sections.get("fused_loss", {}).get(f"fp32/{impl}", {}).get("memory_ratio")
        if memory is not None:
            print(f"gpu_check peak_memory fused[{impl}]/plain (fp32): {goal_line(memory, '<=', 0.20)}")
    speed = train.get("speed_ratio_bf16_over_fp32")
    print(f"gpu_check bf16-mixed/32-true tokens_per_sec: {goal_line(speed, '>', 1.0)}")


def goal_line(value, op: str, goal: float) -> str:
    if value is None:
        return f"ratio=nan goal{op}{goal} MISS (not measured)"
    ok = value >= goal if op == ">=" else value <= goal if op == "<=" else value > goal
    return f"ratio={value:.3f} goal{op}{goal} {'PASS' if ok else 'MISS'}"


if __name__ == "__main__":
    main()
