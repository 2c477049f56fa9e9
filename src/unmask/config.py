"""Typed configuration dataclasses and named model presets.

Each component receives only its own config: the model a :class:`ModelConfig`, the training
loop a :class:`TrainConfig`. Presets are looked up by name (``ModelConfig.from_name("tiny")``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from unmask.errors import UnmaskError

Objective = Literal["mdm", "ar", "bd3"]


def _known_fields(cls: type, data: dict[str, Any], what: str) -> dict[str, Any]:
    """``data`` if every key is a field of the dataclass ``cls``; else an error naming the unknown keys.

    One policy for every saved config: a key this version does not know is refused rather than
    dropped, because silently ignoring a setting would change what a resumed run computes.
    """
    if not isinstance(data, dict):
        raise UnmaskError(f"{what} config must be a JSON object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise UnmaskError(f"{what} config has unknown keys {sorted(unknown)}; known keys: {sorted(known)}")
    return data


@dataclass(frozen=True)
class ModelConfig:
    """A LLaMA-style Transformer (RMSNorm, SwiGLU, rotary positions).

    ``vocab_size`` is the number of real tokens the head predicts; an MDM's input vocabulary has
    one more row, the MASK token, whose id is ``vocab_size``. ``causal=True`` gives the AR baseline.
    """

    name: str = "custom"
    vocab_size: int = 4096
    context_len: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    intermediate: int = 0  # 0: SwiGLU width from the LLaMA rule (8/3 d rounded up to 64)
    causal: bool = False
    time_conditioning: bool = False  # False: time-agnostic network (RADD), the default
    block_causal: int = 0  # > 0: a position attends only to its own block of this many positions and earlier ones
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise UnmaskError(f"model n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise UnmaskError(f"model head dim {self.n_embd // self.n_head} must be even for rotary positions")
        for key in ("vocab_size", "context_len", "n_layer", "n_head", "n_embd"):
            if getattr(self, key) <= 0:
                raise UnmaskError(f"model {key}={getattr(self, key)} must be positive")
        if self.block_causal < 0:
            raise UnmaskError(f"model block_causal={self.block_causal} must be >= 0 (0: off)")
        if self.causal and self.time_conditioning:
            raise UnmaskError("model time_conditioning is for MDMs; a causal (AR) model has no time input")

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def ffn_dim(self) -> int:
        if self.intermediate:
            return self.intermediate
        return 64 * -(-(8 * self.n_embd // 3) // 64)

    def non_embedding_params(self) -> int:
        """N in C = 6 N D: every weight except the input embedding and the output head."""
        d, f = self.n_embd, self.ffn_dim
        per_layer = 4 * d * d + 3 * d * f + 2 * d
        time = (256 * d + d + d * d + d) if self.time_conditioning else 0
        return self.n_layer * per_layer + d + time

    def total_params(self) -> int:
        return self.non_embedding_params() + (self.vocab_size + 1) * self.n_embd + self.vocab_size * self.n_embd

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise UnmaskError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return cls(**_known_fields(cls, data, "model"))


PRESETS: dict[str, ModelConfig] = {
    # tests and the demo: trains in minutes on a laptop CPU
    "tiny": ModelConfig(name="tiny", context_len=128, n_layer=4, n_head=4, n_embd=128),
    "small": ModelConfig(name="small", context_len=256, n_layer=6, n_head=6, n_embd=384),
    # GPU sizes, roughly following the SMDM/LLaMA width-depth ratios
    "85m": ModelConfig(name="85m", context_len=1024, n_layer=12, n_head=12, n_embd=768),
    "170m": ModelConfig(name="170m", context_len=1024, n_layer=14, n_head=16, n_embd=1024),
    "350m": ModelConfig(name="350m", context_len=1024, n_layer=24, n_head=16, n_embd=1024),
    "1b": ModelConfig(name="1b", context_len=2048, n_layer=22, n_head=32, n_embd=2048, intermediate=5632),
}


# Settings left unset take each objective's own best on validation at the demo budget (tiny preset,
# 600 steps of 16 x 128 tokens; benchmarks/mdm_training_sweep.py and README "Benchmarks"): the MDM
# at a lower learning rate than the AR model, with k-DCE (the same bound, smaller loss spikes).
OBJECTIVE_DEFAULTS: dict[str, dict[str, Any]] = {
    "mdm": {"lr": 2e-3, "loss": "k-dce"},
    "ar": {"lr": 5e-3, "loss": "t-dce"},  # the AR model has no masking loss; recorded for completeness
    "bd3": {"lr": 2e-3, "loss": "t-dce"},  # block diffusion: one t per block (reference section 7)
}


@dataclass(frozen=True)
class TrainConfig:
    """The training loop's settings. Batches hold ``batch_size * grad_accum`` sequences per step."""

    objective: Objective = "mdm"
    loss: Literal["t-dce", "k-dce"] | None = None  # MDM objective (reference section 2); None: the objective's default
    schedule: Literal["linear", "cosine"] = "linear"
    low_discrepancy: bool = True
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float | None = None  # None: the objective's default (OBJECTIVE_DEFAULTS)
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    seed: int = 0
    eval_every: int = 100
    eval_windows: int = 32  # validation windows used during training
    eval_draws: int = 4  # MC draws of t per validation window (MDM)
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    # (step, steps before) for every resume that changed ``steps``: from that step the cosine runs
    # from the LR reached there to the new end. Recorded so that the LR stays a function of the config.
    steps_changes: tuple[tuple[int, int], ...] = ()
    # block diffusion (objective bd3, reference section 7): tokens per block L', and the clipped
    # range [beta, omega] of each block's time t (the mask rate, for the linear schedule)
    block_size: int = 0
    mask_rate_min: float = 0.0
    mask_rate_max: float = 1.0
    init_from: str = ""  # start from this checkpoint's weights (e.g. an MDM fine-tuned into a block model)
    flex_attention: bool = False  # bd3: the 2L training forward through FlexAttention instead of SDPA + boolean mask

    def __post_init__(self) -> None:
        if self.objective not in ("mdm", "ar", "bd3"):
            raise UnmaskError(f"--objective {self.objective!r} is not one of: mdm, ar, bd3")
        if self.objective == "bd3":
            if self.block_size < 1:
                raise UnmaskError(f"--objective bd3 needs --block-size >= 1 (tokens per block), got {self.block_size}")
        elif self.block_size or (self.mask_rate_min, self.mask_rate_max) != (0.0, 1.0) or self.flex_attention:
            raise UnmaskError("--block-size, --mask-rate-min, --mask-rate-max and --flex-attention apply to --objective bd3 only")
        if not 0 <= self.mask_rate_min < self.mask_rate_max <= 1:
            raise UnmaskError(
                f"--mask-rate-min={self.mask_rate_min} and --mask-rate-max={self.mask_rate_max} must satisfy 0 <= min < max <= 1"
            )
        for key, value in OBJECTIVE_DEFAULTS[self.objective].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)  # resolved once, so config.json records the value used
        if self.loss not in ("t-dce", "k-dce"):
            raise UnmaskError(f"--loss {self.loss!r} is not one of: t-dce, k-dce")
        if self.schedule not in ("linear", "cosine"):
            raise UnmaskError(f"--schedule {self.schedule!r} is not one of: linear, cosine")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise UnmaskError(f"--precision {self.precision!r} is not one of: auto, bf16, fp32")
        for key in ("steps", "batch_size", "grad_accum", "eval_every", "checkpoint_every", "log_every", "keep_checkpoints"):
            if getattr(self, key) <= 0:
                raise UnmaskError(f"--{key.replace('_', '-')}={getattr(self, key)} must be a positive integer")
        if self.lr <= 0:
            raise UnmaskError(f"--lr={self.lr} must be positive")
        if self.warmup_steps < 0:
            raise UnmaskError(f"--warmup-steps={self.warmup_steps} must be >= 0")
        for at, before in self.steps_changes:
            if not 0 <= at <= min(before, self.steps):
                raise UnmaskError(f"steps_changes entry ({at}, {before}) must change the length at a step within both runs")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        data = dict(_known_fields(cls, data, "training"))
        if "steps_changes" in data:  # JSON has lists; the frozen dataclass compares tuples
            data["steps_changes"] = tuple(tuple(change) for change in data["steps_changes"])
        return cls(**data)


@dataclass(frozen=True)
class RunConfig:
    """Everything a run folder's ``config.json`` records: model, training, and data provenance."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data_dir: str = ""
    tokenizer_fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "train": self.train.to_dict(),
            "data_dir": self.data_dir,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        _known_fields(cls, data, "run")
        if "model" not in data:
            raise UnmaskError("run config has no 'model' entry; it was not written by `unmask train`")
        return cls(
            model=ModelConfig.from_dict(data["model"]),
            train=TrainConfig.from_dict(data.get("train", {})),
            data_dir=data.get("data_dir", ""),
            tokenizer_fingerprint=data.get("tokenizer_fingerprint", ""),
        )
