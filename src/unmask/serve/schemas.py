"""Request and response bodies of the HTTP API: the OpenAI completion fields plus the diffusion
fields, each documented, so that the OpenAPI schema at ``/openapi.json`` describes the API."""

from __future__ import annotations

from typing import List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from unmask.sampling.cache import CACHES
from unmask.sampling.generate import SAMPLERS

SamplerName = Literal[tuple(SAMPLERS)]  # type: ignore[valid-type]
CacheName = Literal[tuple(CACHES)]  # type: ignore[valid-type]


class Sampling(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., description="The served model's id (see GET /v1/models).")
    max_tokens: int = Field(16, ge=1, description="Tokens to generate per choice (an MDM fills exactly this many positions; EOS ends the text early).")
    temperature: Optional[float] = Field(None, ge=0, le=2, description="Sampling temperature; 0 is greedy. Default: the sampler's own (1, threshold: 0).")
    top_p: Optional[float] = Field(None, gt=0, le=1, description="Nucleus sampling mass (1: off).")
    stop: Union[None, str, List[str]] = Field(None, description="Up to 4 strings; the text ends before the first one generated.")
    n: int = Field(1, ge=1, description="Choices per prompt.")
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1, description="Same seed, same request: same text (also while other requests are decoded alongside).")
    stream: bool = Field(False, description="Server-sent events: chunks of committed text, then `data: [DONE]`.")
    user: Optional[str] = Field(None, description="Accepted for compatibility; unused.")
    # diffusion fields (MDM checkpoints; refused on an AR checkpoint, except steps = max_tokens)
    sampler: Optional[SamplerName] = Field(None, description="MDM sampler (default ancestral).")
    steps: Optional[int] = Field(None, ge=1, description="MDM denoising steps, split evenly over blocks (samplers that take steps; default max_tokens).")
    block_length: Optional[int] = Field(None, ge=1, description="MDM: decode semi-autoregressively in blocks of this many tokens; must divide max_tokens.")
    threshold: Optional[float] = Field(None, gt=0, le=1, description="MDM threshold sampler: commit positions whose top-1 probability reaches this (default 0.9).")
    cfg_scale: Optional[float] = Field(None, ge=0, le=20, description="MDM unsupervised classifier-free guidance scale (needs a prompt; 0: off).")
    cache: Optional[CacheName] = Field(None, description="MDM KV cache of the canvas: none (default), prefix, dual or delayed (approximate).")
    stream_canvas: bool = Field(False, description="With stream: also send `event: canvas` frames with the whole partially unmasked canvas after every step.")


class CompletionRequest(Sampling):
    prompt: Union[str, List[str]] = Field("", description="A prompt or a list of prompts (each gets n choices).")
    infill: bool = Field(False, description="MDM: the prompt is a template whose [MASK] / [MASK:n] spans are filled (max_tokens is then unused).")


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Sampling):
    messages: List[Message] = Field(..., min_length=1, description="The conversation; formatted as plain text (see the README).")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: List[CompletionChoice]
    usage: Usage
    nfe: int = Field(description="Network forward calls the request took.")
    steps: int
    seed: int


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"]


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: List[ChatChoice]
    usage: Usage
    nfe: int
    steps: int
    seed: int
