"""The task suite of benchmarks/structured.py: a prompt, a constraint, a generation length and the
check that says whether a text is valid (Python's ``re.fullmatch`` for the regexes and the choice,
``json.loads`` + ``jsonschema`` for the JSON tasks).

Every regex is written so that Rust's regex syntax (outlines-core, which compiles the constraint)
and Python's ``re`` (which checks the output) read it alike: ``[0-9]``, never ``\\d`` (Unicode
digits in Rust). The JSON Schemas are checked by ``jsonschema`` in full. Number ranges are
written as enums: ``Constraint.json_schema`` refuses ``minimum``/``maximum`` (outlines-core's regex
of a schema cannot express them).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from unmask.constraints import Constraint

DATE = r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
EMAIL = r"[a-z][a-z0-9._]{0,15}@[a-z][a-z0-9]{0,11}(\.[a-z]{2,6}){1,2}"
PHONE = r"\+1 [2-9][0-9]{2}-[0-9]{3}-[0-9]{4}"
ONE_TO_100 = r"([1-9]|[1-9][0-9]|100)"
LABELS = ("comedy", "tragedy", "history", "romance")

SCHEMAS = {
    "person": {  # a string with a pattern, an integer range (as an enum)
        "type": "object",
        "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z]{1,11}$"}, "age": {"type": "integer", "enum": list(range(121))}},
        "required": ["name", "age"],
    },
    "play": {  # a nested object, an enum
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 24},
            "author": {"type": "object", "properties": {"first": {"type": "string", "maxLength": 12}, "last": {"type": "string", "maxLength": 12}},
                       "required": ["first", "last"]},
            "genre": {"enum": list(LABELS)},
        },
        "required": ["title", "author", "genre"],
    },
    "tags": {  # an array of enums with bounds on its length, a boolean
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"enum": ["king", "queen", "fool", "ghost"]}, "minItems": 1, "maxItems": 3},
                       "staged": {"type": "boolean"}},
        "required": ["tags", "staged"],
    },
    "place": {  # numbers with ranges (whole degrees, as enums)
        "type": "object",
        "properties": {"lat": {"type": "integer", "enum": list(range(-90, 91))}, "lon": {"type": "integer", "enum": list(range(-180, 181))}},
        "required": ["lat", "lon"],
    },
    "scene": {  # patterns, an integer range, an array of strings
        "type": "object",
        "properties": {
            "act": {"type": "string", "pattern": "^[IV]{1,3}$"},
            "scene": {"type": "integer", "enum": list(range(1, 10))},
            "cast": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 3},
        },
        "required": ["act", "scene", "cast"],
    },
    "order": {  # the largest: nested objects in an array, enums, patterns, ranges
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{4}$"},
            "customer": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                                          "email": {"type": "string", "pattern": "^" + EMAIL + "$"}},
                         "required": ["name", "email"]},
            "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
                "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"},
                                                 "qty": {"type": "integer", "enum": list(range(1, 100))}},
                "required": ["sku", "qty"]}},
            "status": {"enum": ["open", "paid", "shipped"]},
        },
        "required": ["id", "customer", "items", "status"],
    },
}
LARGEST_SCHEMA = "order"


@dataclass(frozen=True)
class Task:
    """``prompt`` (the text before the generated region), ``constraint``, ``length`` generated tokens
    (a multiple of the benchmark's block length) and how the output is checked: ``pattern`` (a
    regex matched in full), ``choices`` (one of them exactly) or ``schema`` (JSON Schema)."""

    name: str
    prompt: str
    constraint: Constraint
    length: int
    pattern: str | None = None
    choices: tuple[str, ...] | None = None
    schema: dict | None = None

    def valid(self, text: str) -> bool:
        """Whether ``text`` (the output up to its first EOS) is a valid answer."""
        if self.pattern is not None:
            return re.fullmatch(self.pattern, text) is not None
        if self.choices is not None:
            return text in self.choices
        import jsonschema

        try:
            value = json.loads(text)
        except ValueError:
            return False
        if self.schema is None:  # json_object: any object
            return isinstance(value, dict)
        return jsonschema.Draft202012Validator(self.schema).is_valid(value)


def regex_task(name: str, prompt: str, pattern: str, length: int) -> Task:
    return Task(name, prompt, Constraint.regex(pattern), length, pattern=pattern)


def schema_task(name: str, length: int) -> Task:
    return Task(f"json {name}", f"{name}: ", Constraint.json_schema(SCHEMAS[name]), length, schema=SCHEMAS[name])


SCHEMA_LENGTHS = {"person": 24, "play": 48, "tags": 24, "place": 24, "scene": 32}
"""Generated tokens of each schema task: the fewest its automaton needs, rounded up to blocks of 8
(``order``, 82 tokens at the least, only in the timing on random networks)."""


def tasks() -> list[Task]:
    """The suite: four regexes, a choice, five JSON Schemas and any JSON object."""
    return [
        regex_task("date", "Date: ", DATE, 16),
        regex_task("email", "Email: ", EMAIL, 16),
        regex_task("phone", "Phone: ", PHONE, 16),
        regex_task("int 1-100", "Number: ", ONE_TO_100, 8),
        Task("choice", "Genre: ", Constraint.choice(LABELS), 8, choices=LABELS),
        *(schema_task(name, length) for name, length in SCHEMA_LENGTHS.items()),
        Task("json object", "Object: ", Constraint.json_object(), 16),
    ]


INFILL_TEMPLATE = '{"title": "[MASK:5]", "author": {"first": "William", "last": "[MASK:3]"}, "genre": "tragedy"}'
"""The infilling example: fixed keys, fixed values on both sides of the gaps, masked values."""
INFILL_SCHEMA = "play"
