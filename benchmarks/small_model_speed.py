"""Small shapes: ``nexttoken fit``'s training step against a textbook PyTorch loop, side by side.

    python benchmarks/small_model_speed.py                          # shapes a and b, defaults and fp32
    python benchmarks/small_model_speed.py --shape a --precision 32-true
    python benchmarks/small_model_speed.py --profile                # where a step's time goes, per shape

Shapes (tiny Shakespeare, bytes tokenizer, the character-level recipes' models):
(a) 4 layers, 4 heads, width 128, context 64, batch 12;
(b) 6 layers, 6 heads, width 384, context 256, batch 16.

nexttoken = ``nexttoken fit`` itself (``nexttoken.commands.fit.run_lightning_cli``: the Trainer with its
production defaults, ``CausalLMModule``, ``TextDataModule``, the thread choice, progress bar, logging,
checkpointing, the throughput callback), with ``--trainer.max_time null`` (pairing doubles the wall
time, and the 8-minute safety net would then bend the schedule) and one more callback that pairs it
with the textbook.

textbook = written here, the way the classic tutorials train a GPT: pre-norm blocks of ``nn.Linear``
(separate query, key and value projections), ``nn.LayerNorm``, GELU and
``F.scaled_dot_product_attention(is_causal=True)``, a tied output head, ``F.cross_entropy`` on the
logits, ``torch.optim.AdamW`` with torch's default implementation, ``clip_grad_norm_``, a LambdaLR
warmup + cosine, batches cut with ``torch.stack`` from the token tensor in memory. Its hyperparameters
and architecture are nexttoken's (no biases, weight decay on matmul weights only, lr 3e-3, betas
(0.9, 0.95), clipping at 1.0, warmup min(50, steps/10), cosine to lr/10) and its weights are copied
from nexttoken's model before the first step, so in fp32 both compute the same function: their loss
curves must agree to 1e-4 for the first 20 steps. The textbook always runs fp32: at nexttoken's
default precision (bf16-mixed on a CPU with native bf16) the two sides run different math, and a
line says so; the 32-true rows compare the same math. MFU (shape b) is against
``nexttoken.peak.peak_flops`` for each side's math, printed with its source.

Pairing: after each nexttoken step a callback runs one textbook step on the same blocks of the same
token stream. nexttoken's step time is everything between two textbook steps (Lightning's loop,
loading the batch, the step, logging, the progress bar, callbacks); the textbook's is its get_batch,
forward, backward, clipping, AdamW and schedule. Both run in one process with the same threads (the
count nexttoken picked), alternating step by step, so a busy moment on a shared machine hits both.
tokens/s = tokens per step / median step time, after ``--warmup`` untimed steps.

Last lines: ``small_model_speed[shape, precision] nexttoken/textbook tokens/s: ratio=... goal>=... PASS|MISS``
(goals: 1.3 for shape a, 1.15 for shape b) and the curve check.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

SHAPES = {
    "a": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, goal=1.3),
    "b": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=16, goal=1.15),
}
CURVE_STEPS, CURVE_TOLERANCE = 20, 1e-4
LR, BETAS, WEIGHT_DECAY, WARMUP = 3e-3, (0.9, 0.95), 0.1, 50  # CausalLMModule's defaults


# --------------------------------------------------------------------------- the textbook
class TextbookAttention(nn.Module):
    # --textbook-qkv fused: one (C, 3C) projection, as nexttoken's GPT has (to measure that lever).
    FUSED_QKV = False

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_embd, n_embd, bias=False)
        self.key = nn.Linear(n_embd, n_embd, bias=False)
        self.value = nn.Linear(n_embd, n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        if self.FUSED_QKV:
            weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])
            qkv = F.linear(x, weight).split(C, dim=2)
        else:
            qkv = (layer(x) for layer in (self.query, self.key, self.value))
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in qkv)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class TextbookBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd, bias=False)
        self.attn = TextbookAttention(n_embd, n_head)
        self.ln2 = nn.LayerNorm(n_embd, bias=False)
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.fc_out = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class TextbookGPT(nn.Module):
    def __init__(self, vocab: int, block_size: int, n_layer: int, n_head: int, n_embd: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, n_embd)
        self.pos = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(TextbookBlock(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.head = nn.Linear(n_embd, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def copy_from(self, gpt) -> None:
        """Take nexttoken's GPT weights (its fused c_attn split into query, key and value)."""
        with torch.no_grad():
            self.tok.weight.copy_(gpt.wte.weight)
            self.pos.weight.copy_(gpt.wpe.weight)
            self.ln_f.weight.copy_(gpt.ln_f.weight)
            for mine, theirs in zip(self.blocks, gpt.blocks, strict=True):
                q, k, v = theirs.attn.c_attn.weight.chunk(3, dim=0)
                for layer, w in zip((mine.attn.query, mine.attn.key, mine.attn.value), (q, k, v)):
                    layer.weight.copy_(w)
                mine.attn.proj.weight.copy_(theirs.attn.c_proj.weight)
                mine.ln1.weight.copy_(theirs.ln_1.weight)
                mine.ln2.weight.copy_(theirs.ln_2.weight)
                mine.fc.weight.copy_(theirs.mlp.c_fc.weight)
                mine.fc_out.weight.copy_(theirs.mlp.c_proj.weight)


class Textbook:
    """The classic loop: get_batch, forward, cross-entropy, backward, clip, AdamW, LambdaLR."""

    def __init__(self, model: TextbookGPT, data: torch.Tensor, block_size: int, max_steps: int) -> None:
        self.model, self.data, self.T = model, data, block_size
        decay = [p for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith(("tok", "pos"))]
        no_decay = [p for n, p in model.named_parameters() if p.dim() != 2 or n.startswith(("tok", "pos"))]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
            lr=LR,
            betas=BETAS,
        )
        warmup = min(WARMUP, max(max_steps // 10, 1))

        def lr_lambda(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)

    def get_batch(self, blocks) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack([self.data[i * self.T : i * self.T + self.T] for i in blocks])
        y = torch.stack([self.data[i * self.T + 1 : i * self.T + self.T + 1] for i in blocks])
        return x, y

    def step(self, blocks) -> tuple[float, torch.Tensor]:
        x, y = self.get_batch(blocks)
        logits = self.model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item(), x


# --------------------------------------------------------------------------- pairing
class Paired(L.Callback):
    """Runs one textbook step after each nexttoken step, on the same blocks; times both."""

    def __init__(self, shape: dict, max_steps: int, stop_after: int, profile_steps: int = 0) -> None:
        self.shape, self.max_steps, self.profile_steps = shape, max_steps, profile_steps
        self.stop_after = stop_after
        self.textbook: Textbook | None = None
        self.plan = None
        self.start: list[float] = []
        self.end: list[float] = []
        self.losses: list[tuple[float, float]] = []
        self.profiles: dict[str, str] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        import numpy as np

        dataset = trainer.train_dataloader.dataset
        self.plan = dataset.batch_plan(0)
        stream = torch.from_numpy(np.load(dataset.stream_file).astype(np.int64))
        s = self.shape
        model = TextbookGPT(
            pl_module.hparams.vocab_size, s["block_size"], s["n_layer"], s["n_head"], s["n_embd"]
        )
        model.copy_from(pl_module.model)
        self.textbook = Textbook(model.train(), stream, s["block_size"], self.max_steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1
        if step + 1 >= self.stop_after:
            trainer.should_stop = True
        if self.profile_steps:
            # --profile: nexttoken's steps alone (NexttokenProfile); the textbook's after them, with
            # the thread count nexttoken chose.
            if trainer.should_stop:
                self.profiles["textbook"] = profile(
                    lambda i: self.textbook.step(self.plan[i]), self.profile_steps
                )
            return
        self.start.append(time.perf_counter())
        loss, x = self.textbook.step(self.plan[step])
        self.end.append(time.perf_counter())
        if step == 0 and not torch.equal(x, batch[0].cpu()):
            raise AssertionError("the textbook's batch differs from nexttoken's")
        self.losses.append((float(outputs["loss"]), loss))


def profile(step, n: int) -> str:
    """Self CPU time of ``n`` calls of ``step(i)`` grouped by kind, plus the untraced rest."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for i in range(2):
        step(i)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for i in range(2, 2 + n):
            step(i)
        wall = time.perf_counter() - start
    return breakdown(prof.key_averages(), wall, n)


KINDS = (
    ("matmul", ("mm", "addmm", "bmm", "matmul", "linear", "baddbmm", "_weight_int")),
    ("attention", ("scaled_dot_product", "flash", "_efficient_attention", "sdpa")),
    ("optimizer", ("adam", "_foreach", "lerp", "addcdiv", "addcmul", "sqrt", "norm", "clip")),
    ("norm+gelu", ("layer_norm", "gelu", "native_layer_norm")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss", "logsumexp")),
    ("embedding", ("embedding",)),
)


def breakdown(events, wall: float, n: int) -> str:
    totals: dict[str, float] = {}
    traced = 0.0
    for event in events:
        self_s = event.self_cpu_time_total / 1e6
        traced += self_s
        name = event.key.lower()
        kind = next((k for k, needles in KINDS if any(x in name for x in needles)), "other ops")
        totals[kind] = totals.get(kind, 0.0) + self_s
    totals["not in ops (Python, framework)"] = max(0.0, wall - traced)
    lines = [f"{wall / n * 1e3:.1f} ms/step under the profiler:"]
    for kind, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        lines.append(f"    {kind:<32} {seconds / n * 1e3:7.2f} ms  {seconds / wall:6.1%}")
    if os.environ.get("PROFILE_OPS"):
        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[: int(os.environ["PROFILE_OPS"])]
        for e in top:
            lines.append(f"      {e.key:<44} {e.self_cpu_time_total / 1e3 / n:7.2f} ms  x{e.count / n:.0f}")
    return "\n".join(lines)


class NexttokenProfile(L.Callback):
    """--profile: nexttoken's own steps (no textbook in between) under the profiler."""

    def __init__(self, first: int, n: int) -> None:
        self.first, self.n = first, n
        self.prof = None
        self.result = ""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.first:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            self.prof = torch_profile(activities=[ProfilerActivity.CPU])
            self.prof.__enter__()
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.prof is not None and trainer.global_step == self.first + self.n:
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            self.result = breakdown(self.prof.key_averages(), wall, self.n)
            self.prof = None


def run(shape_name: str, precision: str | None, args: argparse.Namespace) -> dict:
    """One nexttoken fit of the shape, paired with the textbook; returns the measurements."""
    import nexttoken.commands.fit as training

    shape = SHAPES[shape_name]
    total = args.warmup + args.steps
    profiler = NexttokenProfile(first=args.warmup, n=args.profile_steps) if args.profile else None
    if args.profile:
        total = args.warmup + args.profile_steps + 1
    paired = Paired(shape, args.run_steps, total, profile_steps=args.profile_steps if args.profile else 0)
    extra = [paired, profiler] if args.profile else [paired]
    defaults = training.trainer_defaults

    def with_pairing(verbose: bool = False) -> dict:
        d = defaults(verbose)
        d["callbacks"] = [*d["callbacks"], *extra]
        return d

    argv = [
        "fit",
        "--data.path", args.data,
        "--data.tokenizer", "bytes",
        "--data.block_size", str(shape["block_size"]),
        "--data.batch_size", str(shape["batch_size"]),
        "--model.n_layer", str(shape["n_layer"]),
        "--model.n_head", str(shape["n_head"]),
        "--model.n_embd", str(shape["n_embd"]),
        "--trainer.max_steps", str(args.run_steps),
        "--trainer.max_time", "null",
    ]  # fmt: skip
    if precision:
        argv += ["--trainer.precision", precision]
    argv += [a for kv in args.set for a in ("--" + kv.partition("=")[0], kv.partition("=")[2])]
    with tempfile.TemporaryDirectory() as tmp:
        argv += ["--trainer.default_root_dir", tmp]
        sink = io.StringIO()
        training.trainer_defaults = with_pairing
        try:
            with (
                warnings.catch_warnings(),
                contextlib.redirect_stdout(sink),
                contextlib.redirect_stderr(sink),
            ):
                warnings.simplefilter("ignore")
                cli = training.run_lightning_cli(argv)
        finally:
            training.trainer_defaults = defaults
    out = sink.getvalue()
    trainer, module = cli.trainer, cli.model
    threads = next((c.choice for c in trainer.callbacks if type(c).__name__ == "AutoThreads"), None)
    result = {
        "shape": shape_name,
        "precision": str(trainer.precision),
        "threads": threads or str(torch.get_num_threads()),
        "compile": module.hparams.get("compile"),
        "flops_per_token": module.model.flops_per_token(shape["block_size"]),
        "tokens_per_step": shape["batch_size"] * shape["block_size"],
        "fused_loss": module.uses_fused_loss,
        "log": out,
    }
    if args.profile:
        result["profile"] = {"nexttoken": profiler.result, "textbook": paired.profiles.get("textbook", "")}
        return result
    a = [paired.start[i] - paired.end[i - 1] for i in range(1, len(paired.start))]  # nexttoken step i
    b = [paired.end[i] - paired.start[i] for i in range(len(paired.start))]
    a, b = a[args.warmup - 1 :], b[args.warmup :]
    result.update(
        nexttoken_s=statistics.median(a),
        textbook_s=statistics.median(b),
        pair_ratio=statistics.median(bi / ai for ai, bi in zip(a, b)),
        losses=paired.losses,
    )
    return result


def report(result: dict, args: argparse.Namespace) -> None:
    from nexttoken.peak import peak_flops, precision_dtype

    shape = SHAPES[result["shape"]]
    name = f"{result['shape']}, {result['precision']}"
    tps_n = result["tokens_per_step"] / result["nexttoken_s"]
    tps_t = result["tokens_per_step"] / result["textbook_s"]
    print(
        f"[{name}] threads {result['threads']}; compile {result['compile']}; fused loss {result['fused_loss']}\n"
        f"  nexttoken fit: {tps_n:9.0f} tokens/s  ({result['nexttoken_s'] * 1e3:.1f} ms/step, median)\n"
        f"  textbook fp32: {tps_t:9.0f} tokens/s  ({result['textbook_s'] * 1e3:.1f} ms/step)\n"
        f"  median of per-pair ratios: {result['pair_ratio']:.3f}"
    )
    if result["precision"] != "32-true":
        print(f"  (the two differ: nexttoken runs {result['precision']}, the textbook fp32)")
    if result["shape"] == "b":
        # The peak nexttoken fit counts MFU against, for the math each side's matmuls run in.
        peak_n = peak_flops("cpu", precision_dtype(result["precision"]))
        peak_32 = peak_flops("cpu", torch.float32)
        f = result["flops_per_token"]
        print(
            f"  MFU: nexttoken {tps_n * f / peak_n.flops:.3f} of {peak_n.describe()}; textbook "
            f"{tps_t * f / peak_32.flops:.3f} of {peak_32.describe()}; {f / 1e6:.1f} MFLOP/token"
        )
    losses = result["losses"][:CURVE_STEPS]
    if args.verbose:
        print("  all losses: " + ", ".join(f"({n:.5f}, {t:.5f})" for n, t in losses))
    worst = max(abs(n - t) for n, t in losses)
    print(
        "  loss curves (nexttoken, textbook), first steps: "
        + ", ".join(f"({n:.4f}, {t:.4f})" for n, t in losses[:5])
    )
    ratio = tps_n / tps_t
    goal = shape["goal"]
    print(
        f"small_model_speed[{name}] nexttoken/textbook tokens/s: ratio={ratio:.3f} goal>={goal} "
        f"{'PASS' if ratio >= goal else 'MISS'}"
    )
    same = worst <= CURVE_TOLERANCE
    print(
        f"small_model_speed[{name}] loss curves, first {len(losses)} steps: max |diff|={worst:.2e} "
        f"goal<={CURVE_TOLERANCE:g} {'PASS' if same else 'MISS' if result['precision'] == '32-true' else '(not expected: ' + result['precision'] + ' vs fp32)'}"
    )


def compile_check(shape_name: str, dtype: torch.dtype | None, args: argparse.Namespace) -> dict:
    """torch.compile of nexttoken's model, loss and optimizer step vs eager, on the shape's step:
    paired steady-state step times and the compile time (the first compiled steps less steady ones)."""
    from _common import random_batches

    from nexttoken.loss import next_token_loss
    from nexttoken.models.gpt import GPT, GPTConfig
    from nexttoken.training.optim import build_optimizer

    s = SHAPES[shape_name]
    config = GPTConfig(257, s["block_size"], s["n_layer"], s["n_head"], s["n_embd"])
    batches = random_batches(args.warmup + args.steps + 2, s["batch_size"], s["block_size"], 257)

    def make(compiled: bool):
        torch.manual_seed(0)
        model = GPT(config).train()
        optimizer, schedule = build_optimizer(model, lr=LR, warmup_steps=WARMUP, max_steps=1000)

        def loss_fn(x, y):
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                return next_token_loss(model(x), y)

        def update():
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

        if compiled:
            loss_fn = torch.compile(loss_fn)
            update = torch.compile(update)

        def step(x, y):
            loss_fn(x, y).backward()
            update()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    eager, compiled = make(False), make(True)
    first = {}
    for name, step in (("eager", eager), ("compiled", compiled)):
        start = time.perf_counter()
        for x, y in batches[:2]:
            step(x, y)
        first[name] = time.perf_counter() - start
    te, tc = [], []
    for x, y in batches[2:]:
        t = time.perf_counter()
        eager(x, y)
        te.append(time.perf_counter() - t)
        t = time.perf_counter()
        compiled(x, y)
        tc.append(time.perf_counter() - t)
    step_e, step_c = statistics.median(te[args.warmup :]), statistics.median(tc[args.warmup :])
    compile_s = first["compiled"] - first["eager"]
    gain = step_e - step_c
    return {
        "shape": shape_name,
        "dtype": str(dtype or torch.float32).replace("torch.", ""),
        "eager_ms": step_e * 1e3,
        "compiled_ms": step_c * 1e3,
        "compile_s": compile_s,
        "break_even_steps": compile_s / gain if gain > 0 else math.inf,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=["a", "b", "both"], default="both")
    parser.add_argument(
        "--precision",
        default="both",
        help="nexttoken's precision: 'default' (its auto choice), '32-true', or 'both' (default)",
    )
    parser.add_argument("--steps", type=int, default=40, help="timed paired steps (default 40)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument(
        "--run-steps",
        type=int,
        default=1000,
        help="the run's --trainer.max_steps, which sets the schedule (warmup min(50, steps/10)); the "
        "benchmark stops after --warmup + --steps of them (default 1000: the start of a 1000-step run)",
    )
    parser.add_argument("--profile", action="store_true", help="profile each side's steps instead")
    parser.add_argument(
        "--compile-check",
        action="store_true",
        help="torch.compile (model, loss, clipping + AdamW step) vs eager per shape: steady-state gain, "
        "compile time (TORCHINDUCTOR_CACHE_DIR decides cold or warm), break-even steps",
    )
    parser.add_argument("--profile-steps", type=int, default=10)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra fit flags")
    parser.add_argument(
        "--textbook-qkv",
        choices=["separate", "fused"],
        default="separate",
        help="the textbook's query/key/value projections (default: three nn.Linear, as tutorials write them)",
    )
    parser.add_argument(
        "--log-every-step",
        action="store_true",
        help="nexttoken's per-step values through self.log every step (the lever LogThrottle removes)",
    )
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--verbose", action="store_true", help="print nexttoken fit's output")
    args = parser.parse_args()
    args.steps = max(args.steps, CURVE_STEPS)
    TextbookAttention.FUSED_QKV = args.textbook_qkv == "fused"
    if args.log_every_step:
        from nexttoken.training.log_throttle import LogThrottle

        LogThrottle.__init__.__defaults__ = (0.0,)
    if not Path(args.data).is_file():
        sys.exit(f"no corpus at {args.data}")
    os.environ.setdefault("NEXTTOKEN_CACHE", str(Path(tempfile.gettempdir()) / "nexttoken-bench-cache"))
    from nexttoken.precision import auto_precision

    shapes = ["a", "b"] if args.shape == "both" else [args.shape]
    precisions = (
        [None, "32-true"]
        if args.precision == "both"
        else [None if args.precision == "default" else args.precision]
    )
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}", flush=True
    )
    if args.compile_check:
        for shape in shapes:
            for precision in precisions:
                dtype = torch.bfloat16 if precision is None and "bf16" in auto_precision()[0] else None
                r = compile_check(shape, dtype, args)
                print(
                    f"compile[{shape}, {r['dtype']}, {torch.get_num_threads()} threads]: eager {r['eager_ms']:.1f} ms, "
                    f"compiled {r['compiled_ms']:.1f} ms per step (steady: {r['compiled_ms'] / r['eager_ms']:.3f}); "
                    f"compile {r['compile_s']:.1f} s; pays after {r['break_even_steps']:.0f} steps  "
                    f"(load {os.getloadavg()[0]:.2f})",
                    flush=True,
                )
        return
    for shape in shapes:
        for precision in precisions:
            result = run(shape, precision, args)
            if args.verbose:
                print(result["log"])
            if args.profile:
                print(f"[{shape}, {result['precision']}] threads {result['threads']}")
                print("  nexttoken fit " + result["profile"]["nexttoken"])
                print("  textbook fp32 " + result["profile"]["textbook"], flush=True)
                continue
            report(result, args)
            print(f"  (load average now {os.getloadavg()[0]:.2f})", flush=True)


if __name__ == "__main__":
    main()
