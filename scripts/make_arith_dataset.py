"""Write arithmetic word problems as JSONL for the `qa` env: `python scripts/make_arith_dataset.py OUT.jsonl`.

Each record: {"question": "...", "answer": "<integer>", "expression": "<the arithmetic>"}; `expression`
reaches the reward as a field and shows what a calculator call would compute. Seeded: the same
arguments always write the same file.
"""
from __future__ import annotations

import argparse
import json
import random

NAMES = ["Ann", "Ben", "Cleo", "Dev", "Eva", "Finn"]
THINGS = ["apples", "books", "coins", "marbles", "pens", "stamps"]


def problem(rng: random.Random) -> dict:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    kind = rng.choice(["add", "sub", "mul"])
    if kind == "add":
        question, expression = f"{name} has {a} {thing} and gets {b} more. How many {thing} now?", f"{a} + {b}"
    elif kind == "sub":
        a, b = max(a, b), min(a, b)
        question, expression = f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?", f"{a} - {b}"
    else:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        question, expression = f"{name} has {a} bags with {b} {thing} each. How many {thing} in all?", f"{a} * {b}"
    answer = {"add": a + b, "sub": a - b, "mul": a * b}[kind]
    return {"question": question, "answer": str(answer), "expression": expression}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output .jsonl file")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with open(args.out, "w") as f:
        for _ in range(args.count):
            f.write(json.dumps(problem(rng)) + "\n")


if __name__ == "__main__":
    main()
