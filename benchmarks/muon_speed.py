"""Muon beside AdamW (``--model.optimizer muon``) against AdamW alone: steps and wall time to reach
AdamW's final validation loss, on shapes (a) and (b) of ``small_model_speed.py``.

    python benchmarks/muon_speed.py                  # shapes a and b
    python benchmarks/muon_speed.py --shape a --steps 300
    python benchmarks/muon_speed.py --lora           # LoRA adapters: AdamW vs Muon on A and B

Shapes (tiny Shakespeare, bytes, the character-level recipes' models), as in small_model_speed.py:
(a) 4 layers, 4 heads, width 128, context 64, batch 12; (b) 6 layers, 6 heads, width 384, context 256,
batch 16.

Each run is nexttoken's GPT trained by ``nexttoken.training.optim.build_optimizer`` (the optimizer and
warmup + cosine schedule ``nexttoken fit`` builds, with its defaults: weight decay 0.1, betas
(0.9, 0.95), warmup min(50, steps/10), cosine to lr/10, clipping at 1.0) in a plain loop under bf16
autocast, the precision ``fit`` picks on this CPU: the loop is the same for both optimizers, so what
differs is the optimizer alone. Same initial weights, same batches (random blocks of the first 90%
of the text, one seed), the same fixed validation blocks (evenly spaced over the last 10%),
validated every ``steps/20`` steps.

The sweep (the same for both): the default peak learning rate x {0.5, 1, 2}, and one more factor of 2
past an edge while the best is at that edge (at most twice). AdamW: 3e-3 (``--model.lr``'s default
from scratch). Muon: 3e-3 too (its default ``--model.muon_lr`` is the AdamW lr, with Moonlight's
per-matrix scale), with the AdamW part (embeddings, head, norms) at the best AdamW lr. The best final
validation loss of each wins. The target is the best
AdamW run's final validation loss; Muon's steps to it are where its validation curve first crosses it
(linear between two validations). The wall time is the training steps' time only (validation left
out), to that step for Muon and to the end for AdamW.

Last lines: ``muon_speed[shape] muon/adamw steps to adamw's final val loss: ratio=... goal<=0.7 PASS|MISS``
(the goal is for shape b; a has the same line for information) and the wall-time ratio.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from nexttoken.loss import next_token_loss
from nexttoken.models.gpt import GPT, GPTConfig
from nexttoken.training.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SHAPES = {
    "a": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, steps=600, val_blocks=64),
    "b": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=16, steps=200, val_blocks=32),
}
ADAMW_LR = 3e-3
SWEEP = (0.5, 1.0, 2.0)
GOAL = 0.7
VOCAB = 259  # nexttoken's bytes tokenizer: 256 bytes and its specials


def byte_tokens(path: Path) -> torch.Tensor:
    return torch.tensor(list(path.read_bytes()), dtype=torch.long)


class Blocks:
    """Training batches (seeded random blocks of the first 90%) and fixed validation blocks (evenly
    spaced over the last 10%)."""

    def __init__(self, tokens: torch.Tensor, block: int, batch: int, val_blocks: int) -> None:
        cut = int(len(tokens) * 0.9)
        self.train, held = tokens[:cut], tokens[cut:]
        self.block, self.batch = block, batch
        starts = torch.linspace(0, len(held) - block - 2, val_blocks).long()
        rows = torch.stack([held[s : s + block + 1] for s in starts.tolist()])
        self.val = (rows[:, :-1], rows[:, 1:])

    def batches(self, steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(steps):
            starts = torch.randint(0, len(self.train) - self.block - 1, (self.batch,), generator=g)
            rows = torch.stack([self.train[s : s + self.block + 1] for s in starts.tolist()])
            out.append((rows[:, :-1], rows[:, 1:]))
        return out


@torch.no_grad()
def val_loss(model: torch.nn.Module, blocks: Blocks) -> float:
    model.eval()
    x, y = blocks.val
    losses = []
    for i in range(0, len(x), 16):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x[i : i + 16])
        losses.append(next_token_loss(logits, y[i : i + 16]) * y[i : i + 16].numel())
    model.train()
    return float(sum(losses) / y.numel())


def train(
    model_factory, blocks: Blocks, batches, steps: int, every: int, **optimizer_settings
) -> dict[str, list]:
    """One run; returns its validation curve [(step, loss)] and the cumulative step time at each step."""
    model = model_factory()
    optimizer, schedule = build_optimizer(
        model, warmup_steps=min(50, max(steps // 10, 1)), max_steps=steps, **optimizer_settings
    )
    curve, elapsed, spent = [(0, val_loss(model, blocks))], [0.0], 0.0
    for step, (x, y) in enumerate(batches[:steps], start=1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = next_token_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        spent += time.perf_counter() - start
        elapsed.append(spent)
        if not math.isfinite(float(loss.detach())):
            curve.append((step, float("inf")))
            break
        if step % every == 0 or step == steps:
            curve.append((step, val_loss(model, blocks)))
    return {"curve": curve, "elapsed": elapsed, "model": model}


def steps_to(curve: list[tuple[int, float]], target: float) -> float | None:
    """The first step at which the validation curve reaches ``target`` (linear between validations)."""
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return s1 if l0 == l1 else s0 + (l0 - target) / (l0 - l1) * (s1 - s0)
    return None


def sweep(label: str, run, center: float, factors: tuple[float, ...] = SWEEP) -> tuple[float, dict]:
    """The best of ``center`` x 0.5, 1, 2 by final validation loss, going one more factor of 2 past
    an edge while the best is there (at most twice): the same rule for every optimizer."""
    results: dict[float, dict] = {}

    def best() -> float:
        return min(results, key=lambda lr: results[lr]["curve"][-1][1])

    todo = [center * m for m in factors]
    for _ in range(3 if len(factors) > 1 else 1):
        for lr in todo:
            results[lr] = run(lr)
            final, spent = results[lr]["curve"][-1][1], results[lr]["elapsed"][-1]
            print(f"  {label} lr {lr:.4g}: final val loss {final:.4f} ({spent:.1f} s of steps)", flush=True)
        lrs = sorted(results)
        todo = [lrs[0] / 2] if best() == lrs[0] else [lrs[-1] * 2] if best() == lrs[-1] else []
        if not todo:
            break
    return best(), results[best()]


def compare(shape_name: str, args: argparse.Namespace) -> None:
    shape = dict(SHAPES[shape_name])
    steps = args.steps or shape["steps"]
    every = max(1, steps // 20)
    blocks = Blocks(
        byte_tokens(DATA / "tinyshakespeare.txt"),
        shape["block_size"],
        shape["batch_size"],
        shape["val_blocks"],
    )
    batches = blocks.batches(steps)
    config = GPTConfig(
        vocab_size=VOCAB, block_size=shape["block_size"], n_layer=shape["n_layer"], n_head=shape["n_head"],
        n_embd=shape["n_embd"],
    )  # fmt: skip
    torch.manual_seed(0)
    initial = GPT(config).state_dict()

    def factory() -> GPT:
        model = GPT(config)
        model.load_state_dict(initial)
        return model

    print(
        f"shape {shape_name}: {steps} steps, validation every {every} on {shape['val_blocks']} blocks",
        flush=True,
    )
    adamw_lr, adamw = sweep(
        "adamw",
        lambda lr: train(factory, blocks, batches, steps, every, lr=lr),
        ADAMW_LR,
        args.factors,
    )
    muon_lr, muon = sweep(
        "muon",
        lambda lr: train(factory, blocks, batches, steps, every, lr=adamw_lr, optimizer="muon", muon_lr=lr),
        ADAMW_LR,
        args.muon_factors or args.factors,
    )
    target = adamw["curve"][-1][1]
    reached = steps_to(muon["curve"], target)
    print(
        f"  adamw (lr {adamw_lr:.4g}) final val loss {target:.4f} at step {steps}; curve: {fmt(adamw['curve'])}"
    )
    print(
        f"  muon (muon_lr {muon_lr:.4g}, adamw lr {adamw_lr:.4g}) final {muon['curve'][-1][1]:.4f}; curve: {fmt(muon['curve'])}"
    )
    if reached is None:
        print(
            f"muon_speed[{shape_name}] muon/adamw steps to adamw's final val loss: ratio=never goal<={GOAL} MISS"
        )
        return
    ratio = reached / steps
    muon_time = muon["elapsed"][min(len(muon["elapsed"]) - 1, math.ceil(reached))]
    time_ratio = muon_time / adamw["elapsed"][-1]
    verdict = "PASS" if ratio <= GOAL else "MISS"
    print(
        f"  muon reaches {target:.4f} at step {reached:.1f} of {steps} ({muon_time:.1f} s vs adamw's {adamw['elapsed'][-1]:.1f} s)"
    )
    print(
        f"muon_speed[{shape_name}] muon/adamw steps to adamw's final val loss: ratio={ratio:.3f} goal<={GOAL} {verdict}"
    )
    print(f"muon_speed[{shape_name}] muon/adamw wall time of the steps to it: ratio={time_ratio:.3f}")


def fmt(curve: list[tuple[int, float]]) -> str:
    return " ".join(f"{s}:{v:.3f}" for s, v in curve[:: max(1, len(curve) // 6)] + curve[-1:])


def lora_compare(args: argparse.Namespace) -> None:
    """LoRA adapters (r 8 on every block matmul) on a shape-(a) GPT pretrained here (300 AdamW steps) on
    tiny Shakespeare, fine-tuned on WikiText-2: the adapters with AdamW (the default) vs with Muon,
    each swept as above around 1e-3 (``--model.lr``'s default for LoRA)."""
    from nexttoken.models.lora import LoraSettings, attach_lora

    shape = SHAPES["a"]
    config = GPTConfig(
        vocab_size=VOCAB, block_size=shape["block_size"], n_layer=shape["n_layer"], n_head=shape["n_head"],
        n_embd=shape["n_embd"],
    )  # fmt: skip
    shakespeare = Blocks(
        byte_tokens(DATA / "tinyshakespeare.txt"), shape["block_size"], shape["batch_size"], 64
    )
    torch.manual_seed(0)
    base = train(lambda: GPT(config), shakespeare, shakespeare.batches(300), 300, 300, lr=ADAMW_LR)["model"]
    base_state = base.state_dict()
    wiki = Blocks(
        byte_tokens(DATA / "wikitext-2" / "valid.txt"), shape["block_size"], shape["batch_size"], 64
    )
    steps = args.steps or 150
    batches = wiki.batches(steps, seed=1)

    def factory() -> GPT:
        model = GPT(config)
        model.load_state_dict(base_state)
        torch.manual_seed(1)
        attach_lora(model, LoraSettings(r=8))
        return model

    print(
        f"lora: base {val_loss(base, wiki):.4f} on WikiText-2 before fine-tuning; {steps} steps", flush=True
    )
    every = max(1, steps // 20)
    adamw_lr, adamw = sweep(
        "adapters adamw",
        lambda lr: train(factory, wiki, batches, steps, every, lr=lr),
        1e-3,
    )
    muon_lr, muon = sweep(
        "adapters muon",
        lambda lr: train(
            factory,
            wiki,
            batches,
            steps,
            every,
            lr=lr,
            optimizer="muon",
            muon_lr=lr,
            muon_adapters=True,
        ),
        1e-3,
    )
    a, m = adamw["curve"][-1][1], muon["curve"][-1][1]
    reached = steps_to(muon["curve"], a)
    print(f"  adapters adamw lr {adamw_lr:.4g}: {a:.4f}; adapters muon lr {muon_lr:.4g}: {m:.4f}")
    print(
        f"muon_speed[lora] muon/adamw final val loss: ratio={m / a:.4f}; muon/adamw steps to adamw's: "
        f"{'never' if reached is None else f'{reached / steps:.3f}'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), action="append")
    parser.add_argument("--steps", type=int, help="steps per run (default: a 600, b 200; lora 150)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)"
    )
    parser.add_argument("--lora", action="store_true", help="LoRA adapters: AdamW vs Muon on A and B")
    parser.add_argument(
        "--factors",
        type=lambda text: tuple(float(x) for x in text.split(",")),
        default=SWEEP,
        help="the sweep's factors of the default learning rate (default 0.5,1,2; 1: no sweep)",
    )
    parser.add_argument(
        "--muon-factors",
        type=lambda text: tuple(float(x) for x in text.split(",")),
        help="Muon's own factors when they differ (1 with --factors 0.5,1,2: AdamW swept, Muon at its default)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.lora:
        lora_compare(args)
        return
    for shape in args.shape or sorted(SHAPES):
        compare(shape, args)


if __name__ == "__main__":
    main()
