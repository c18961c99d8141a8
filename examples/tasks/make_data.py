"""Write the example tasks' data: ``tinyswag.jsonl`` (multiple choice in HellaSwag's format),
``tinytext.jsonl`` (documents for rolling perplexity) and ``tinymath.jsonl`` (short generation).

Every item is made here from the scenes below (no public data set is copied); the same seed gives
the same files. Run from the repository root: ``python examples/tasks/make_data.py``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# (activity, what the person does first, how the next sentence starts, the sensible ending)
SCENES = [
    (
        "Making tea",
        "fills a kettle with water and sets it on the stove.",
        "when it whistles,",
        "pours the hot water over a tea bag in a mug.",
    ),
    (
        "Washing a car",
        "sprays the car with a hose and rubs soap on the doors.",
        "then",
        "rinses the soap off and dries the car with a towel.",
    ),
    (
        "Planting a tree",
        "digs a deep hole in the garden with a shovel.",
        "next,",
        "sets the young tree in the hole and fills it with soil.",
    ),
    (
        "Baking bread",
        "mixes flour, water, yeast and salt in a large bowl.",
        "after the dough rises,",
        "shapes it into a loaf and puts it in the hot oven.",
    ),
    (
        "Painting a wall",
        "covers the floor with old sheets and opens a can of paint.",
        "then",
        "dips a roller in the paint and rolls it up and down the wall.",
    ),
    (
        "Tying shoes",
        "sits on the bottom step and pulls on a pair of sneakers.",
        "next,",
        "crosses the laces, loops them and pulls the bow tight.",
    ),
    (
        "Brushing teeth",
        "squeezes toothpaste onto a toothbrush at the sink.",
        "then",
        "brushes every tooth and rinses the mouth with water.",
    ),
    (
        "Ironing a shirt",
        "lays a wrinkled shirt flat on the ironing board.",
        "once the iron is hot,",
        "presses it slowly along the sleeves and the collar.",
    ),
    (
        "Fishing on a lake",
        "rows a small boat to the middle of the lake.",
        "then",
        "baits the hook, casts the line and waits for a bite.",
    ),
    (
        "Changing a tire",
        "loosens the nuts on the flat tire with a wrench.",
        "next,",
        "raises the car with a jack and swaps in the spare wheel.",
    ),
    (
        "Making a sandwich",
        "lays two slices of bread on a cutting board.",
        "then",
        "spreads butter on them and adds cheese and ham.",
    ),
    (
        "Walking a dog",
        "clips a leash to the collar of an excited dog.",
        "outside,",
        "walks the dog around the block and lets it sniff the grass.",
    ),
    (
        "Mopping a floor",
        "fills a bucket with warm soapy water.",
        "then",
        "dips the mop, wrings it out and wipes the kitchen floor.",
    ),
    (
        "Wrapping a present",
        "cuts a sheet of bright paper from a roll.",
        "next,",
        "folds the paper around the box and tapes down the edges.",
    ),
    (
        "Sharpening a pencil",
        "picks up a dull pencil from the desk.",
        "then",
        "turns it in the sharpener until the point is fine.",
    ),
    (
        "Building a snowman",
        "rolls a ball of snow across the yard until it is large.",
        "next,",
        "stacks two smaller balls on top and adds a carrot nose.",
    ),
    (
        "Chopping onions",
        "peels an onion and sets it on a cutting board.",
        "then",
        "slices it into thin rings with a sharp knife.",
    ),
    (
        "Doing laundry",
        "sorts a pile of clothes into whites and colors.",
        "next,",
        "loads the whites into the washing machine and adds soap.",
    ),
    (
        "Setting a table",
        "spreads a clean cloth over the dining table.",
        "then",
        "places a plate, a fork and a knife at every seat.",
    ),
    (
        "Riding a bike",
        "puts on a helmet and wheels a bicycle to the road.",
        "then",
        "pushes off, pedals hard and rides down the street.",
    ),
]
PEOPLE = ["A man", "A woman"]


def tinyswag(rng: random.Random) -> list[dict]:
    """HellaSwag's fields: the context is ``ctx_a`` + ``ctx_b``; four endings, one sensible (``label``),
    the others the sensible endings of other scenes."""
    items = []
    for person in PEOPLE:
        for i, (activity, first, then, ending) in enumerate(SCENES):
            others = [s[3] for j, s in enumerate(SCENES) if j != i]
            endings = rng.sample(others, 3)
            label = rng.randrange(4)
            endings.insert(label, ending)
            pronoun = "he" if person == "A man" else "she"
            items.append(
                {
                    "ind": len(items),
                    "activity_label": activity,
                    "ctx_a": f"{person} {first}",
                    "ctx_b": f"{then} {pronoun}",
                    "ctx": f"{person} {first} {then.capitalize()} {pronoun}",
                    "endings": endings,
                    "label": str(label),
                }
            )
    return items


def tinytext(rng: random.Random, n_docs: int = 8) -> list[dict]:
    """Short stories: each strings five scenes together."""
    docs = []
    for _ in range(n_docs):
        sentences = []
        for activity, first, then, ending in rng.sample(SCENES, 5):
            person, pronoun = rng.choice(
                [("My neighbour", "he"), ("My sister", "she"), ("The old farmer", "he")]
            )
            sentences.append(
                f"{activity} takes a little care. {person} {first} {then.capitalize()} {pronoun} {ending}"
            )
        docs.append({"text": " ".join(sentences)})
    return docs


def tinymath(rng: random.Random, n: int = 24) -> list[dict]:
    items = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        items.append({"question": f"What is {a} plus {b}?", "answer": str(a + b)})
    return items


def main() -> None:
    here = Path(__file__).parent
    rng = random.Random(0)
    for name, rows in (("tinyswag", tinyswag(rng)), ("tinytext", tinytext(rng)), ("tinymath", tinymath(rng))):
        with open(here / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"wrote {here / name}.jsonl ({len(rows)} rows)")


if __name__ == "__main__":
    main()
