"""Write arithmetic problems as JSONL for the `qa` env: `python scripts/make_arith_dataset.py OUT.jsonl`.

`--style words` (default): word problems, each record {"question", "answer", "expression", "tool_calls"}:
`expression` is the arithmetic, `tool_calls` the one calculator call that solves it (the demonstrations
of a warm start make it before answering: fastarcher/envs/qa.py `oracle_action`).
`--style sums`: every "What is a + b?" with 0 <= a, b <= --max-operand, in order (--count is ignored).

Seeded: the same arguments always write the same file. The example presets read the files this script
wrote into examples/data/ (tests/test_examples.py checks that they match).
"""
from __future__ import annotations

import argparse
import json
import random

NAMES = ["Ann", "Ben", "Cleo", "Dev", "Eva", "Finn"]
THINGS = ["apples", "books", "coins", "marbles", "pens", "stamps"]


def word_problem(rng: random.Random) -> dict:
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
    return {"question": question, "answer": str(answer), "expression": expression,
            "tool_calls": [{"name": "calculator", "arguments": {"expression": expression}}]}


def records(style: str, count: int, seed: int, max_operand: int) -> list[dict]:
    if style == "sums":
        return [{"question": f"What is {a} + {b}?", "answer": str(a + b)}
                for a in range(max_operand + 1) for b in range(max_operand + 1)]
    rng = random.Random(seed)
    return [word_problem(rng) for _ in range(count)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output .jsonl file")
    parser.add_argument("--style", choices=["words", "sums"], default="words")
    parser.add_argument("--count", type=int, default=200, help="word problems to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-operand", type=int, default=9, help="largest operand of --style sums")
    args = parser.parse_args(argv)
    with open(args.out, "w") as f:
        for record in records(args.style, args.count, args.seed, args.max_operand):
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
