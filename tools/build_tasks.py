"""Rebuild the offline lm-eval tasks in src/unmask/evaluation/tasks/ from the embedded corpus.

    python tools/build_tasks.py

Both are made from the held-out (validation) works only, deterministically (seed 0):
* shakespeare_next_line (multiple choice): four preceding lines; pick the true next line among it
  and three lines drawn from the OTHER held-out works. Chance: 25%.
* shakespeare_word_order (multiple choice): four preceding lines; pick the next line in its true
  word order among it and three shuffles of its words after the first. Chance: 25%; local word statistics suffice.
* shakespeare_complete (generate_until): four preceding lines and the first half of a line;
  generate the rest of the line (exact match, case and punctuation ignored).
"""

import json
import random
from pathlib import Path

from unmask.data import shakespeare_works

OUT = Path(__file__).resolve().parents[1] / "src" / "unmask" / "evaluation" / "tasks"


def usable(line: str) -> bool:
    """A line of verse or prose: at least 4 words, not a speaker name or stage direction."""
    s = line.strip()
    return len(s.split()) >= 4 and not s.startswith("[") and not s.isupper() and len(s) <= 80


def main() -> None:
    rng = random.Random(0)
    works = {name: [l.rstrip() for l in text.splitlines() if l.strip()] for name, text in shakespeare_works("validation")}
    pool = {name: [l.strip() for l in lines if usable(l)] for name, lines in works.items()}
    next_line, word_order, complete = [], [], []
    for name, lines in works.items():
        candidates = [i for i in range(4, len(lines)) if usable(lines[i]) and all(l.strip() for l in lines[i - 4 : i])]
        for i in rng.sample(candidates, 50):
            context = "\n".join(lines[i - 4 : i])
            others = [l for other, ls in pool.items() if other != name for l in ls]
            choices = [lines[i].strip()] + rng.sample(others, 3)
            order = list(range(4))
            rng.shuffle(order)
            next_line.append({"context": context, "choices": [choices[k] for k in order], "label": order.index(0), "work": name})
        for i in rng.sample(candidates, 50):
            words = lines[i].strip().split()
            shuffles: list[str] = []
            while len(shuffles) < 3:
                # the first word stays: every choice then tokenises to the same tokens, so no choice
                # wins by being shorter (a model with uniform predictions scores chance)
                rest = words[1:]
                rng.shuffle(rest)
                perm = words[:1] + rest
                if perm != words and " ".join(perm) not in shuffles:
                    shuffles.append(" ".join(perm))
            choices = [" ".join(words)] + shuffles
            order = list(range(4))
            rng.shuffle(order)
            word_order.append({"context": "\n".join(lines[i - 4 : i]), "choices": [choices[k] for k in order], "label": order.index(0), "work": name})
        for i in rng.sample(candidates, 25):
            words = lines[i].strip().split()
            half = len(words) // 2
            complete.append({"context": "\n".join(lines[i - 4 : i]) + "\n" + " ".join(words[:half]), "target": " ".join(words[half:]), "work": name})
    for fname, rows in (
        ("shakespeare_next_line.jsonl", next_line), ("shakespeare_word_order.jsonl", word_order), ("shakespeare_complete.jsonl", complete)
    ):
        with open(OUT / fname, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"wrote {OUT / fname}: {len(rows)} examples")


if __name__ == "__main__":
    main()
