"""Make an instruction task whose answers can be checked exactly: metric unit conversions.

    python examples/instruct/make_data.py OUT_DIR [--train 3000] [--test 100] [--seed 0]

writes ``OUT_DIR/train.jsonl`` and ``OUT_DIR/test.jsonl``: chat records (``messages``: a system
message, the question, the answer), for example::

    Convert 47 km to m.      -> 47000
    Convert 4520 g to kg.    -> 4.52

Each question is asked once: the held-out ``test.jsonl`` shares no question with ``train.jsonl``
(``nexttoken fit`` holds out its own validation records from ``train.jsonl`` besides).
"""

from __future__ import annotations

import argparse
import json
import random
from decimal import Decimal
from pathlib import Path

SYSTEM = "Answer with the number only."
# (larger unit, smaller unit, how many of the smaller make one of the larger)
UNITS = [
    ("km", "m", 1000),
    ("m", "cm", 100),
    ("m", "mm", 1000),
    ("cm", "mm", 10),
    ("kg", "g", 1000),
    ("g", "mg", 1000),
    ("L", "mL", 1000),
]


def questions() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Every (question, answer), to a smaller unit (values 1..999) and to a larger one (1..9999)."""
    down, up = [], []
    for large, small, factor in UNITS:
        for value in range(1, 1000):
            down.append((f"Convert {value} {large} to {small}.", str(value * factor)))
        for value in range(1, 10000):
            answer = format((Decimal(value) / factor).normalize(), "f")
            up.append((f"Convert {value} {small} to {large}.", answer))
    return down, up


def record(question: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=3000, help="training records")
    parser.add_argument("--test", type=int, default=100, help="held-out records")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    test, train = [], []
    for pairs in questions():  # half of each set converts down, half up
        rng.shuffle(pairs)
        test += pairs[: args.test // 2]
        train += pairs[args.test // 2 : args.test // 2 + args.train // 2]
    rng.shuffle(test)
    rng.shuffle(train)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("test", test)):
        with open(args.out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for question, answer in part:
                f.write(json.dumps(record(question, answer)) + "\n")
    print(
        f"{args.out}/train.jsonl: {len(train)} records; {args.out}/test.jsonl: {len(test)} held-out records"
    )


if __name__ == "__main__":
    main()
