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
"""

from __future__ import annotations

import re
from typing import Annotated, Dict, List, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model

from unmask.errors import rule_bounds
from unmask.sampling.options import OPTIONS, Option
from unmask.sampling.spec import ALIASES, SAMPLERS

FinishReason = Literal["stop", "length"]
# parameters of the decoding path that are not sampler options, as the request calls them
FIELDS = {"length": "max_tokens", "num_samples": "n"}

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


def sampler_options(body: BaseModel) -> dict:
    """The sampler options a request gives (library names -> values; fields left out are absent)."""
    given = {name: getattr(body, option.field) for name, option in OPTIONS.items() if option.field}
    return {name: value for name, value in given.items() if value is not None}


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


# the sampler fields, from the option table (MDM options are refused on an AR checkpoint, except steps = max_tokens)
Sampling = create_model(
    "Sampling", __base__=Fields, __doc__=Fields.__doc__, __module__=__name__,
    **{option.field: request_field(option) for option in OPTIONS.values() if option.field},
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


class Health(Response):
    status: Literal["ok"] = Field(description="Always `ok` (the server answers).")
    model: str = Field(description="The served model's id.")
    objective: str = Field(description="mdm, ar, ...")
    running: int = Field(description="Requests being decoded.")
    waiting: int = Field(description="Requests waiting for a decoding slot.")
    served: int = Field(description="Requests decoded (finished, failed or cancelled).")
    cancelled: int = Field(description="Requests stopped because their client went away.")
    batching: Batching = Field(description="Counters of the scheduler that merges requests' forwards.")
