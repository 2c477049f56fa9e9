"""Request and response bodies of the HTTP API: the OpenAI completion fields plus the diffusion
fields, each documented, so that the OpenAPI schema at ``/openapi.json`` describes the API. The
sampler fields (``sampler``, ``steps``, ``temperature``, ...) are derived from the option table
(:mod:`unmask.sampling.options`): every option with a ``field`` is a request field of its type, range
(``field_rule``, else ``rule``) or choices, described by its help; :func:`field_of` is how the server
spells a parameter in its errors.

Request fields are strict, as in the OpenAI API: an integer field takes a JSON integer (not
``"4"``, ``4.0`` or ``true``), a boolean field ``true`` or ``false``; a float field takes any
number. Text fields refuse what a tokenizer cannot take: lone surrogates (``"\\ud800"`` is a valid
JSON escape but no Unicode text) and NUL characters.

Structured output: ``response_format`` as OpenAI defines it (``text``, ``json_object``,
``json_schema``) and the extension fields ``regex`` and ``choice`` (vLLM's guided_regex and
guided_choice); :func:`constraint_of` reads them as one :class:`~unmask.constraints.Constraint`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model

from unmask.constraints.spec import JSON_OBJECT_DEPTH, Constraint
from unmask.errors import rule_bounds
from unmask.sampling.options import OPTIONS, Option
from unmask.sampling.spec import ALIASES, SAMPLERS
from unmask.steering.options import GUIDE_OPTIONS

FinishReason = Literal["stop", "length"]
# parameters of the decoding path that are not sampler options, as the request calls them
FIELDS = {"length": "max_tokens", "num_samples": "n", "json_schema": "response_format", "json_object": "response_format"}

UNTOKENIZABLE = re.compile("[\x00\ud800-\udfff]")


def tokenizable(text: str) -> str:
    """``text`` if it holds neither a lone surrogate nor NUL; raises ValueError saying where."""
    bad = UNTOKENIZABLE.search(text)
    if bad:
        what = "NUL" if bad.group() == "\x00" else f"a lone surrogate (\\u{ord(bad.group()):04x}), not Unicode text"
        raise ValueError(f"character {bad.start()} is {what}; send valid Unicode without NUL characters")
    return text


def all_tokenizable(texts: Union[str, List[str]]) -> Union[str, List[str]]:
    for i, text in enumerate([texts] if isinstance(texts, str) else texts):
        try:
            tokenizable(text)
        except ValueError as exc:
            raise ValueError(str(exc) if isinstance(texts, str) else f"item {i}: {exc}") from None
    return texts


Text = Annotated[str, AfterValidator(tokenizable)]
Texts = Annotated[Union[str, List[str]], AfterValidator(all_tokenizable)]


class Request(BaseModel):
    """A request body: unknown fields are refused, types are strict."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Response(BaseModel):
    """A response body (or event): exactly the documented fields."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(Request):
    include_usage: bool = Field(False, description="Send one more chunk before `data: [DONE]`: no choices, the usage of the whole request "
                                                   "(every other chunk then has `usage: null`).")


def field_of(name: str) -> str:
    """The request field of a decoding parameter (an option without a field keeps its name)."""
    option = OPTIONS.get(name)
    return FIELDS.get(name, name) if option is None else option.field or name


def constraint_of(body: BaseModel) -> Constraint | None:
    """The constraint a request gives (None: none); more than one is refused (an OptionError naming
    them, as do a regex that is not a string of one and a schema that is not an object)."""
    form = body.response_format
    kind = None if form is None else form.type
    return Constraint.one_of(regex=body.regex, choice=body.choice, json_object=kind == "json_object",
                             json_schema=form.json_schema.schema_ if kind == "json_schema" else None)


def bounds(rule: str | None) -> dict:
    """A range in the table's notation (``">= 0"``, ``"(0, 1]"``) as pydantic's bounds (ge, gt, le, lt)."""
    keywords = {">": "gt", ">=": "ge", "<": "lt", "<=": "le"}
    return {} if rule is None else {keywords[op]: bound for op, bound in rule_bounds(rule)}


def request_field(option: Option) -> tuple[object, object]:
    """(annotation, Field) of a served option: its type (a Literal of its choices; samplers and
    their other names for ``sampler``), its range, its help; None when not given."""
    choices = (*SAMPLERS, *ALIASES) if option.name == "sampler" else option.choices
    kind = option.type if choices is None else Literal[tuple(choices)]  # type: ignore[valid-type]
    limits = {key: int(value) if option.type is int else value for key, value in bounds(option.field_rule or option.rule).items()}
    return Optional[kind], Field(None, description=option.help, **limits)


def guide_field(option: Option) -> tuple[object, object]:
    """(annotation, Field) of a guide option: as :func:`request_field`, but ``reward`` and ``energy``
    take the name of one of the server's rewards."""
    if option.name in ("reward", "energy"):
        use = "best-of, svdd or smc maximise" if option.name == "reward" else "edlm uses as its energy (a log-density)"
        return Optional[str], Field(None, description=f"The name of one of this server's rewards (GET /v1/models lists them), which "
                                                      f"{use}; the server's operator configures them, a request names no code or file.")
    return request_field(option)


def guide_options(body: BaseModel) -> dict:
    """The guide options a request gives (library names -> values; fields left out are absent)."""
    given = {name: getattr(body, option.field) for name, option in GUIDE_OPTIONS.items()}
    return {name: value for name, value in given.items() if value is not None}


def sampler_options(body: BaseModel) -> dict:
    """The sampler options a request gives (library names -> values; fields left out are absent)."""
    given = {name: getattr(body, option.field) for name, option in OPTIONS.items() if option.field}
    return {name: value for name, value in given.items() if value is not None}


class TextFormat(Request):
    type: Literal["text"] = Field(..., description="Text as the model writes it (no constraint).")


class JsonObjectFormat(Request):
    type: Literal["json_object"] = Field(..., description=(
        f"Any JSON object, nested at most {JSON_OBJECT_DEPTH} deep: its members are strings, numbers, booleans, null, or objects and "
        "arrays of those (deeper nesting makes an automaton too large to compile per request; give a json_schema for more)."))


class JsonSchema(Request):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$", description="The schema's name (letters, digits, _ and -, at most 64); "
                                                                          "not used in decoding.")
    description: Optional[Text] = Field(None, description="What the reply is for; accepted for compatibility, unused.")
    schema_: Dict[str, Any] = Field(..., alias="schema", description=(
        "The JSON Schema the reply follows (outlines-core's subset: types, properties (written in their order), required, enum, const, "
        "items, anyOf/oneOf/allOf, $ref, string lengths and patterns, ...). Refused, naming response_format, when it is no valid "
        "schema, when outlines-core cannot turn it into a regex, or when its automaton takes longer than the server's "
        "compile_seconds to compile (a schema that allows any JSON value, such as {}, does)."))
    strict: Optional[bool] = Field(None, description="Accepted for compatibility: the reply always follows the schema, strict or not.")


class JsonSchemaFormat(Request):
    type: Literal["json_schema"] = Field(..., description="A reply that follows json_schema.schema.")
    json_schema: JsonSchema = Field(..., description="The schema and its name.")


ResponseFormat = Annotated[Union[TextFormat, JsonObjectFormat, JsonSchemaFormat], Field(discriminator="type")]


class Fields(Request):
    """Fields shared by /v1/completions and /v1/chat/completions (the sampler fields besides)."""

    model: Text = Field(..., description="The served model's id (see GET /v1/models).")
    max_tokens: int = Field(16, ge=1, description="Tokens to generate per choice (an MDM fills exactly this many positions; EOS ends the text early).")
    stop: Optional[Texts] = Field(None, description="Up to 4 strings; the text ends before the first one generated (not with infill).")
    n: int = Field(1, ge=1, description="Choices per prompt.")
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1, description="Same seed, same request: same text (also while other requests are decoded alongside).")
    stream: bool = Field(False, description="Server-sent events: chunks of committed text, then `data: [DONE]`.")
    stream_options: Optional[StreamOptions] = Field(None, description="With stream: `{\"include_usage\": true}` adds a last chunk with the usage.")
    user: Optional[Text] = Field(None, description="Accepted for compatibility; unused.")
    response_format: Optional[ResponseFormat] = Field(None, description=(
        f"Structured output: `{{\"type\": \"json_object\"}}` (any JSON object, nested at most {JSON_OBJECT_DEPTH} deep) or "
        "`{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}`: the text (a chat's reply) is then such "
        "JSON. It may end before max_tokens (at EOS); a max_tokens too short for it is refused, naming the fewest tokens that work. "
        "`{\"type\": \"text\"}`: no constraint. At most one of response_format (json_object, json_schema), regex and choice; "
        "not with stop."))
    regex: Optional[Text] = Field(None, description=(
        "Structured output (vLLM's guided_regex): the text matches this regex in full. Rust regex syntax (outlines-core): "
        "\\d is any Unicode digit, [0-9] an ASCII one."))
    choice: Optional[List[Text]] = Field(None, min_length=1, description="Structured output (vLLM's guided_choice): the text is one of "
                                                                        "these strings.")


# the sampler fields, from the option table (MDM options are refused on an AR checkpoint, except steps = max_tokens)
Sampling = create_model(
    "Sampling", __base__=Fields, __doc__=Fields.__doc__, __module__=__name__,
    **{option.field: request_field(option) for option in OPTIONS.values() if option.field},
    **{option.field: guide_field(option) for option in GUIDE_OPTIONS.values()},
    stream_canvas=(bool, Field(False, description="With stream: also send `event: canvas` frames with the whole partially unmasked canvas "
                                                  "after every step.")),
)


class CompletionRequest(Sampling):
    prompt: Texts = Field("", description="A prompt or a list of prompts (each gets n choices).")
    infill: bool = Field(False, description="MDM: the prompt is a template whose [MASK] / [MASK:n] spans are filled (max_tokens is then unused).")


class TextPart(Request):
    type: Literal["text"] = Field(..., description="Only text parts: this model reads text.")
    text: Text = Field(..., description="The part's text; a message's parts are joined with line breaks.")


class Message(Request):
    role: Literal["developer", "system", "user", "assistant"] = Field(
        ..., description="Who speaks; `developer` is OpenAI's newer name for `system` and formatted the same.")
    content: Union[Text, List[TextPart]] = Field(..., description="The text, or a list of text parts.")
    name: Optional[Text] = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$",
                                 description="The speaker's name (letters, digits, _ and -), formatted as `Role (name): content`.")


class ChatRequest(Sampling):
    messages: List[Message] = Field(..., min_length=1, description="The conversation; formatted as plain text (see the README).")
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="OpenAI's newer name for max_tokens (give one of them).")


class ErrorDetail(Response):
    message: str = Field(description="What is wrong, naming the field and what would be right.")
    type: str = Field(description="invalid_request_error, rate_limit_exceeded, timeout or cancelled.")
    param: Optional[str] = Field(None, description="The request field at fault (null: the request as a whole).")
    code: Optional[str] = Field(None, description="A machine-readable reason, where there is one.")


class ErrorBody(Response):
    error: ErrorDetail = Field(description="The error, OpenAI-style.")


class Usage(Response):
    prompt_tokens: int = Field(description="Prompt tokens over all choices (each choice decodes its own copy of its prompt).")
    completion_tokens: int = Field(description="Generated tokens over all choices, up to the end of each text.")
    total_tokens: int = Field(description="prompt_tokens + completion_tokens.")


class Answer(Response):
    id: str = Field(description="The request's id.")
    created: int = Field(description="Unix time the answer was made.")
    model: str = Field(description="The served model's id.")
    usage: Usage = Field(description="Token counts.")
    nfe: int = Field(description="Network forward calls the request took.")
    steps: int = Field(description="Denoising steps taken (AR: one per token).")
    seed: int = Field(description="The seed used (the request's, or a drawn one): the same request with it gives the same text.")


class CompletionChoice(Response):
    text: str = Field(description="The generated text (infill: the whole filled template).")
    index: int = Field(description="Position among the choices: prompt i's choice j is at i * n + j.")
    logprobs: None = Field(None, description="Always null (not computed).")
    finish_reason: FinishReason = Field(description="`stop`: EOS or a stop string ended the text; `length`: every position was filled.")


class CompletionResponse(Answer):
    object: Literal["text_completion"] = Field("text_completion", description="Always `text_completion`.")
    choices: List[CompletionChoice] = Field(description="n choices per prompt.")


class ChatMessageOut(Response):
    role: Literal["assistant"] = Field("assistant", description="Always `assistant`.")
    content: str = Field(description="The generated reply.")


class ChatChoice(Response):
    index: int = Field(description="Position among the n choices.")
    message: ChatMessageOut = Field(description="The reply.")
    finish_reason: FinishReason = Field(description="`stop`: EOS or a stop string ended the reply; `length`: every position was filled.")


class ChatResponse(Answer):
    object: Literal["chat.completion"] = Field("chat.completion", description="Always `chat.completion`.")
    choices: List[ChatChoice] = Field(description="n choices.")


# ---- streamed events (the `data:` of each server-sent event) ------------------------------------
class Chunk(Response):
    id: str = Field(description="The request's id (the same in every chunk).")
    created: int = Field(description="Unix time the stream began.")
    model: str = Field(description="The served model's id.")
    usage: Optional[Usage] = Field(None, description="With stream_options.include_usage: null, except in the last chunk (no choices), which has "
                                                     "the usage of the whole request. Absent otherwise.")


class CompletionChunkChoice(Response):
    text: str = Field(description="Text committed since the previous chunk of this choice (it never changes afterwards).")
    index: int = Field(description="The choice this text belongs to.")
    logprobs: None = Field(None, description="Always null.")
    finish_reason: Optional[FinishReason] = Field(description="null until the choice's last chunk.")


class CompletionChunk(Chunk):
    object: Literal["text_completion"] = Field(description="Always `text_completion`.")
    choices: List[CompletionChunkChoice] = Field(description="One choice's new text (none in the usage chunk).")


class Delta(Response):
    role: Optional[Literal["assistant"]] = Field(None, description="`assistant`, in each choice's first chunk only.")
    content: str = Field(description="Text committed since the previous chunk of this choice.")


class ChatChunkChoice(Response):
    index: int = Field(description="The choice this text belongs to.")
    delta: Delta = Field(description="The new text.")
    finish_reason: Optional[FinishReason] = Field(description="null until the choice's last chunk.")


class ChatCompletionChunk(Chunk):
    object: Literal["chat.completion.chunk"] = Field(description="Always `chat.completion.chunk`.")
    choices: List[ChatChunkChoice] = Field(description="One choice's new text (none in the usage chunk).")


class CanvasRow(Response):
    index: int = Field(description="The choice (row of the canvas).")
    tokens: List[Optional[str]] = Field(description="The generation region: each position's token piece, or null while masked.")
    committed_at: List[int] = Field(description="Per position: the step that committed it (0: given text, -1: still masked).")


class CanvasFrame(Response):
    id: str = Field(description="The request's id.")
    object: Literal["canvas"] = Field(description="Always `canvas` (sent as `event: canvas`, with stream_canvas).")
    step: int = Field(description="Steps done.")
    nfe: int = Field(description="Network forward calls so far.")
    seconds: float = Field(description="Seconds since decoding began.")
    choices: List[CanvasRow] = Field(description="Every row of the canvas.")


# ---- models and health ----------------------------------------------------------------------------
class ModelCard(Response):
    id: str = Field(description="The id requests pass as `model`.")
    object: Literal["model"] = Field("model", description="Always `model`.")
    created: int = Field(description="Always 0.")
    owned_by: str = Field(description="Always `unmask`.")
    objective: str = Field(description="What the checkpoint was trained for: mdm (masked diffusion) or ar (autoregressive), ...")
    context_length: int = Field(description="Positions per canvas: the prompt, a separator and max_tokens must fit.")
    limits: Dict[str, Union[int, float]] = Field(description="The server's limits per request (the `unmask serve` flags of the same names).")
    rewards: Dict[str, str] = Field(description="The rewards a guided request may name as its `reward` (and, where it says so, its "
                                                "`energy`): name -> its kind (ar, regex, classifier, python).")


class ModelList(Response):
    object: Literal["list"] = Field("list", description="Always `list`.")
    data: List[ModelCard] = Field(description="The one served model.")


class Batching(Response):
    forwards: int = Field(description="Network forwards run.")
    calls: int = Field(description="Network calls of requests served by them.")
    rows: int = Field(description="Canvas rows computed (without filler rows).")
    ticks: int = Field(description="Scheduler rounds.")
    requests_per_forward: int = Field(description="Sum over forwards of the requests sharing each.")
    max_requests_per_forward: int = Field(description="Most requests that shared one forward.")
    mean_requests_per_forward: float = Field(description="requests_per_forward / forwards.")


class Compiling(Response):
    compiled: int = Field(description="Constraints compiled (refused ones included), by this process's engines.")
    reused: int = Field(description="Requests whose constraint was compiled (or refused) before: its outcome is kept, not compiled again.")
    timed_out: int = Field(description="Compiles stopped at the server's compile_seconds limit.")


class Health(Response):
    status: Literal["ok"] = Field(description="Always `ok` (the server answers).")
    model: str = Field(description="The served model's id.")
    objective: str = Field(description="mdm, ar, ...")
    running: int = Field(description="Requests being decoded.")
    waiting: int = Field(description="Requests waiting for a decoding slot.")
    served: int = Field(description="Requests decoded (finished, failed or cancelled).")
    cancelled: int = Field(description="Requests stopped because their client went away.")
    batching: Batching = Field(description="Counters of the scheduler that merges requests' forwards.")
    constraints: Compiling = Field(description="Counters of the structured-output compiler (response_format, regex, choice).")
