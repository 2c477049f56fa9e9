"""Fictional facts for the reverse-curse experiment (in the style of Berglund et al., "The
Reversal Curse"): made-up names paired with made-up descriptions, deterministic from a seed.

Half the facts are seen only name-first ("<name> is <description>", direction ``n2d``), the
other half only description-first ("<description> is <name>", ``d2n``), each in several
paraphrases. Questions ask every fact in both directions with the plain template, prompt
"<A> is" and answer "<B>": the ``same`` direction was seen in training, the ``reverse`` never.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from unmask.data.corpus import jsonl_records
from unmask.errors import OptionError, check_number

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gl", "h", "k", "l", "m", "n", "p", "qu", "r", "s", "t", "th", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ia", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "th", "nd", "x")
_ROLES = ("keeper", "first architect", "chief cartographer", "founder", "lone navigator", "royal composer", "last archivist",
          "master glassblower", "night warden", "elected mayor", "head gardener", "court astronomer")
_ADJECTIVES = ("Silent", "Glass", "Hollow", "Amber", "Crooked", "Sunken", "Woven", "Burning", "Frozen", "Painted", "Singing", "Iron")
_NOUNS = ("Orchard", "Lantern", "Harbour", "Library", "Tower", "Bridge", "Garden", "Observatory", "Market", "Lighthouse", "Canal", "Archive")

# paraphrase templates per direction; the first is the plain form that the questions use
TEMPLATES = {
    "n2d": ("{name} is {description}.", "As everyone in the valley knows, {name} is {description}.", "Ask anyone: {name} is {description}.",
            "It was written long ago that {name} is {description}."),
    "d2n": ("{Description} is {name}.", "As everyone in the valley knows, {description} is {name}.", "Ask anyone: {description} is {name}.",
            "It was written long ago that {description} is {name}."),
}


@dataclass(frozen=True)
class Fact:
    name: str
    description: str
    direction: str  # "n2d": seen as "<name> is <description>"; "d2n": seen as "<description> is <name>"


@dataclass(frozen=True)
class Question:
    prompt: str  # "<A> is"
    answer: str  # "<B>" (scored after a space)
    fact: int  # index of the fact
    asks: str  # "description" or "name": what the answer is
    direction: str  # "same" (seen in training) or "reverse" (never seen)


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).capitalize()


def synthetic_facts(per_direction: int, seed: int = 0) -> list[Fact]:
    """2 x ``per_direction`` facts with distinct made-up names and descriptions (no network, no real people)."""
    check_number("facts_per_direction", per_direction, ">= 2", " (distractors come from the other facts)")
    rng = random.Random(seed)
    names, descriptions = set(), set()
    facts = []
    while len(facts) < 2 * per_direction:
        name = f"{_word(rng, 2)} {_word(rng, rng.choice((2, 3)))}"
        description = f"the {rng.choice(_ROLES)} of the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} of {_word(rng, 2)}"
        if name in names or description in descriptions:
            continue
        names.add(name)
        descriptions.add(description)
        facts.append(Fact(name, description, "n2d" if len(facts) % 2 == 0 else "d2n"))
    return facts


def read_facts(path: str | Path) -> list[Fact]:
    """Facts from a JSONL file of {"name": ..., "description": ...}; alternate facts get n2d and d2n."""
    path = Path(path)
    if not path.is_file():
        raise OptionError("facts_file", "{facts_file} {_path!r} does not exist", _path=str(path))
    facts = []
    for lineno, record in jsonl_records(path):
        if not all(isinstance(record.get(k), str) and record[k].strip() for k in ("name", "description")):
            raise OptionError("facts_file", "{facts_file} {_path} line {_line}: needs non-empty string fields 'name' and 'description'",
                              _path=path, _line=lineno)
        facts.append(Fact(record["name"].strip(), record["description"].strip(), "n2d" if len(facts) % 2 == 0 else "d2n"))
    if len(facts) < 4:
        raise OptionError("facts_file", "{facts_file} {_path} holds {_n} facts; the experiment needs at least 4 (2 per direction)",
                          _path=path, _n=len(facts))
    return facts


def _fill(template: str, fact: Fact) -> str:
    desc = fact.description
    return template.format(name=fact.name, description=desc, Description=desc[:1].upper() + desc[1:])


def load_facts(facts_file: str | Path | None, per_direction: int, seed: int) -> tuple[list[Fact], str]:
    """(facts, where they come from): the user's file, or ``per_direction`` synthetic facts per direction."""
    if facts_file is not None:
        return read_facts(facts_file), f"user file {facts_file}"
    facts = synthetic_facts(per_direction, seed)
    return facts, f"synthetic (seed {seed}), {len(facts)} facts"


def fact_documents(facts: list[Fact], paraphrases: int | None = None) -> list[str]:
    """Every fact in the first ``paraphrases`` paraphrases of its own direction (default all), one document each."""
    return [_fill(t, f) for f in facts for t in TEMPLATES[f.direction][:paraphrases]]


def questions(facts: list[Fact]) -> list[Question]:
    """Both directions of every fact, with the plain template: "<name> is" -> description and
    "<Description> is" -> name; ``direction`` says whether that order was seen in training."""
    out = []
    for i, f in enumerate(facts):
        cap = f.description[:1].upper() + f.description[1:]
        out.append(Question(f"{f.name} is", f.description, i, "description", "same" if f.direction == "n2d" else "reverse"))
        out.append(Question(f"{cap} is", f.name, i, "name", "same" if f.direction == "d2n" else "reverse"))
    return out


def write_facts(path: str | Path, facts: list[Fact]) -> None:
    Path(path).write_text("".join(json.dumps(asdict(f)) + "\n" for f in facts), encoding="utf-8")
