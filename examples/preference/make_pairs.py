"""Make preference pairs on the unit-conversion task: the correct answer chosen, a wrong one rejected.

    python examples/preference/make_pairs.py OUT_DIR [--train 3000] [--test 100] [--seed 0]

writes ``OUT_DIR/{train,test}_pairs.jsonl`` (``prompt``: the system message and the question;
``chosen``/``rejected``: one assistant message each) and ``OUT_DIR/{train,test}.jsonl`` (the same
questions with the correct answer as chat records, for SFT and exact match). The questions and the
split are those of ``examples/instruct/make_data.py`` (same seed: the same test questions). The
rejected answer uses a wrong factor: ten times too large or too small, or another unit pair's factor
(``Convert 47 km to m.``: chosen ``47000``, rejected ``4700`` or ``47``).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "instruct"))
from make_data import SYSTEM, UNITS, questions, record  # noqa: E402

FACTORS = {(large, small): factor for large, small, factor in UNITS}


def wrong_answer(question: str, answer: str, rng: random.Random) -> str:
    value, source, target = re.fullmatch(r"Convert (\d+) (\w+) to (\w+)\.", question).groups()
    down = (source, target) in FACTORS
    factor = FACTORS[(source, target)] if down else FACTORS[(target, source)]
    wrong = sorted({factor * 10, factor // 10, *FACTORS.values()} - {factor, 1, 0})
    while True:
        other = rng.choice(wrong)
        text = str(int(value) * other) if down else format((Decimal(value) / other).normalize(), "f")
        if text != answer:
            return text


def pair(question: str, answer: str, rng: random.Random) -> dict:
    return {
        "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": answer}],
        "rejected": [{"role": "assistant", "content": wrong_answer(question, answer, rng)}],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    test, train = [], []
    for part in questions():  # the split of make_data.py: half of each set converts down, half up
        rng.shuffle(part)
        test += part[: args.test // 2]
        train += part[args.test // 2 : args.test // 2 + args.train // 2]
    rng.shuffle(test)
    rng.shuffle(train)
    args.out.mkdir(parents=True, exist_ok=True)
    wrong = random.Random(args.seed + 1)
    for name, part in (("train", train), ("test", test)):
        with open(args.out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record(q, a)) + "\n" for q, a in part)
        with open(args.out / f"{name}_pairs.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(pair(q, a, wrong)) + "\n" for q, a in part)
    print(f"{args.out}: {len(train)} training and {len(test)} held-out questions, as chat records and pairs")


if __name__ == "__main__":
    main()
