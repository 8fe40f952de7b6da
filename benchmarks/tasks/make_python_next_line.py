"""Write `python_next_line.jsonl`: which line comes next in a held-out standard-library file.

    python benchmarks/tasks/make_python_next_line.py   # deterministic; the .jsonl is committed

Each item: the 8 lines before a code line of a file the default model never trained on
(`corpus.build().held_out`, the default recipe's split), the true next line, and 3 distractors: code lines of the same
indentation from other held-out files (so indentation gives nothing away). 60 items, 4 choices,
chance 25%. A local multiple-choice task for the default model (lm-eval task
`python_next_line.yaml`; benchmarks/likelihood_batching.py --task).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from mosaic_dllm.train import corpus

HERE = Path(__file__).parent
ITEMS, CONTEXT_LINES = 60, 8


def code_lines(text: str) -> list[int]:
    """Indices of lines worth predicting: code (not blank, not a comment), 12 to 70 characters."""
    lines = text.splitlines()
    return [
        i
        for i, line in enumerate(lines)
        if i >= CONTEXT_LINES and 12 <= len(line.strip()) <= 70 and not line.strip().startswith(("#", '"', "'"))
    ]


def indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def main() -> None:
    source = corpus.build()  # the default recipe's split
    names = list(source.held_out)
    files = {name: text.splitlines() for name, text in zip(names, source.texts(source.held_out), strict=True)}
    rng = random.Random(0)
    items = []
    while len(items) < ITEMS:
        name = names[len(items) % len(names)]
        lines = files[name]
        at = rng.choice(code_lines("\n".join(lines)))
        truth, pad = lines[at], indent(lines[at])
        others = [
            line
            for other, other_lines in files.items()
            if other != name
            for line in other_lines
            if indent(line) == pad and 12 <= len(line.strip()) <= 70 and not line.strip().startswith("#")
        ]
        distractors = rng.sample(sorted(set(others) - {truth}), 3)
        choices = [truth, *distractors]
        rng.shuffle(choices)
        context = "\n".join(lines[at - CONTEXT_LINES : at]) + "\n"
        items.append(
            {"file": name, "line": at + 1, "context": context, "choices": choices, "gold": choices.index(truth)}
        )
    with open(HERE / "python_next_line.jsonl", "w") as out:
        for item in items:
            out.write(json.dumps(item) + "\n")


if __name__ == "__main__":
    main()
