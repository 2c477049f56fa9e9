"""What a request constrains its output to: a regex, a JSON Schema, a choice among strings, or any
JSON object; each as the regex (Rust ``regex`` syntax, as outlines-core reads it) that its text
must match in full."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from unmask.errors import OptionError

Kind = Literal["regex", "json_schema", "choice", "json_object"]
KINDS: tuple[Kind, ...] = ("regex", "json_schema", "choice", "json_object")

JSON_OBJECT_DEPTH = 2
"""How deep ``json_object`` output may nest: the outer object (depth 1) may hold objects and arrays
(depth 2) whose members are strings, numbers, booleans or null. Depth 3 (outlines-core's regex of
``{"type": "object"}``) takes about 17 s to compile for a 4096-token vocabulary; depth 2 about 0.6 s."""

_META = set("\\.+*?()|[]{}^$#&-~")  # the characters Rust's regex_syntax::escape escapes; Python's re reads them alike


def escape(text: str) -> str:
    """``text`` as a regex that matches exactly it, in both Rust's and Python's regex syntax."""
    return "".join("\\" + c if c in _META else c for c in text)


def json_object_regex(depth: int = JSON_OBJECT_DEPTH, whitespace: str | None = None) -> str:
    """A regex of the JSON objects nested at most ``depth`` deep (an object of scalars is depth 1),
    built from outlines-core's JSON pieces; ``whitespace``: the pattern allowed between tokens
    (outlines-core's default, ``[ ]?``, when None)."""
    from outlines_core.json_schema import BOOLEAN, NULL, NUMBER, STRING, WHITESPACE

    ws = WHITESPACE if whitespace is None else whitespace
    scalar = f"({STRING}|{NUMBER}|{BOOLEAN}|{NULL})"

    def value(d: int) -> str:
        return scalar if d == 0 else f"({scalar}|{obj(d)}|{array(d)})"

    def obj(d: int) -> str:
        member = f"{STRING}{ws}:{ws}{value(d - 1)}"
        return rf"\{{{ws}({member}({ws},{ws}{member})*)?{ws}\}}"

    def array(d: int) -> str:
        return rf"\[{ws}({value(d - 1)}({ws},{ws}{value(d - 1)})*)?{ws}\]"

    return obj(depth)


@dataclass(frozen=True)
class Constraint:
    """``kind`` and its ``value``: a regex (str), a JSON Schema (its JSON text without spaces, keys
    in their given order: the order of properties is the order of the output's fields), the choices (a tuple of str) or, for ``json_object``, the depth (int).
    Hashable: it keys the cache of compiled automata."""

    kind: Kind
    value: str | tuple[str, ...] | int

    @classmethod
    def regex(cls, pattern: str) -> "Constraint":
        return cls("regex", pattern)

    @classmethod
    def json_schema(cls, schema: dict | str) -> "Constraint":
        """A JSON Schema given as a dict or as JSON text (refused here when the text is not JSON)."""
        return cls("json_schema", _canonical_schema(schema))

    @classmethod
    def choice(cls, options: Sequence[str]) -> "Constraint":
        """Exactly one of ``options`` (at least one; each a string)."""
        if isinstance(options, str) or not options or not all(isinstance(o, str) for o in options):
            raise OptionError("choice", "{choice} must be a non-empty list of strings, got {_got!r}", _got=options)
        return cls("choice", tuple(options))

    @classmethod
    def json_object(cls, depth: int = JSON_OBJECT_DEPTH) -> "Constraint":
        if not isinstance(depth, int) or depth < 1:
            raise OptionError("json_object", "{json_object} depth must be an integer >= 1, got {_got!r}", _got=depth)
        return cls("json_object", depth)

    @classmethod
    def parse(cls, kind: str, value: Any = None) -> "Constraint":
        """The constraint named ``kind`` (one of :data:`KINDS`) with its value as a request gives it:
        a regex string, a schema (dict or JSON text), a list of strings, nothing for ``json_object``."""
        if kind not in KINDS:
            raise OptionError("constraint", "{constraint} {_kind!r} is not one of {_kinds}", _kind=kind, _kinds=", ".join(KINDS))
        if kind == "regex":
            if not isinstance(value, str):
                raise OptionError("regex", "{regex} must be a string, got {_got!r}", _got=value)
            return cls.regex(value)
        if kind == "json_schema":
            return cls.json_schema(value)
        if kind == "choice":
            return cls.choice(value)
        return cls.json_object() if value is None else cls.json_object(value)

    @classmethod
    def one_of(cls, regex: str | None = None, json_schema: dict | str | None = None, choice: Sequence[str] | None = None,
               json_object: bool = False) -> "Constraint | None":
        """The constraint a caller gives by one of these parameters (None when it gives none);
        more than one is refused, naming them."""
        given = {name: value for name, value in (("regex", regex), ("json_schema", json_schema), ("choice", choice or None),
                                                  ("json_object", json_object or None)) if value is not None}
        if len(given) > 1:
            names = list(given)
            raise OptionError(names[1], " and ".join("{%s}" % name for name in names) + ": give one constraint")
        if not given:
            return None
        (kind, value), = given.items()
        return cls.json_object() if kind == "json_object" else cls.parse(kind, list(value) if kind == "choice" else value)

    def to_regex(self) -> str:
        """The regex the output text must match in full. A JSON Schema that is not valid, or that
        outlines-core cannot turn into a regex, raises an :class:`OptionError` naming ``json_schema``."""
        if self.kind == "regex":
            return self.value
        if self.kind == "choice":
            return "|".join(f"({escape(option)})" for option in self.value)
        if self.kind == "json_object":
            return json_object_regex(self.value)
        return _schema_regex(self.value)


def _canonical_schema(schema: dict | str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise OptionError("json_schema", "{json_schema} is not valid JSON: {_why}", _why=str(exc)) from None
    if not isinstance(schema, dict):
        raise OptionError("json_schema", "{json_schema} must be a JSON object, got {_got!r}", _got=schema)
    return json.dumps(schema, separators=(",", ":"))


def _schema_regex(schema_text: str) -> str:
    import jsonschema
    from outlines_core.json_schema import build_regex_from_schema

    schema = json.loads(schema_text)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise OptionError("json_schema", "{json_schema} is not a valid JSON Schema: {_why}", _why=exc.message) from None
    dropped = sorted(set(unexpressed(schema)))
    if dropped:
        raise OptionError("json_schema", "{json_schema} uses {_words}, which its regex cannot express (output could break "
                          "them); express the range or rule with enum or a pattern instead", _words=", ".join(dropped))
    try:
        return build_regex_from_schema(schema_text)
    except (ValueError, TypeError) as exc:
        raise OptionError("json_schema", "{json_schema} cannot be turned into a regex: {_why}", _why=str(exc)) from None


# keywords the regex of outlines-core (0.2) leaves out: output would match the regex and break them
UNEXPRESSED = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "uniqueItems", "minProperties",
               "maxProperties", "not", "if", "contains", "propertyNames", "patternProperties", "dependentSchemas",
               "dependentRequired")
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")


def unexpressed(schema) -> list[str]:
    """The keywords of ``schema`` (and its subschemas) that its regex would leave out: those of
    :data:`UNEXPRESSED`, and a string ``pattern`` beside ``minLength``/``maxLength`` (the pattern
    wins and the bounds are dropped)."""
    if isinstance(schema, list):
        return [word for item in schema for word in unexpressed(item)]
    if not isinstance(schema, dict):
        return []
    found = [key for key in UNEXPRESSED if key in schema]
    if "pattern" in schema and ("minLength" in schema or "maxLength" in schema):
        found.append("pattern with minLength/maxLength")
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            found += [word for sub in value.values() for word in unexpressed(sub)]
        elif key not in ("enum", "const", "default", "examples") and isinstance(value, (dict, list)):
            found += unexpressed(value)
    return found
