"""Typed configuration dataclasses and named model presets.

Each component receives only its own config: the model a :class:`ModelConfig`, the training
loop a :class:`TrainConfig`, whose settings of block diffusion, fine-tuning and adaptation are
sections of their own (:class:`BlockDiffusionConfig`, :class:`SFTConfig`, :class:`AdaptationConfig`,
:class:`DistillConfig`).
Presets are looked up by name (``ModelConfig.from_name("tiny")``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

from unmask.errors import OptionError, UnmaskError, check_number, not_one_of
from unmask.schedule import SCHEDULES



def _known_fields(cls: type, data: dict[str, Any], what: str, also: Iterable[str] = ()) -> dict[str, Any]:
    """``data`` if every key is a field of the dataclass ``cls`` (or in ``also``); else an error naming the unknown keys.

    One policy for every saved config: a key this version does not know is refused rather than
    dropped, because silently ignoring a setting would change what a resumed run computes.
    """
    if not isinstance(data, dict):
        raise UnmaskError(f"{what} config must be a JSON object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)} | set(also)
    unknown = set(data) - known
    if unknown:
        raise UnmaskError(f"{what} config has unknown keys {sorted(unknown)}; known keys: {sorted(known)}")
    return data


@dataclass(frozen=True)
class ModelConfig:
    """A LLaMA-style Transformer (RMSNorm, SwiGLU, rotary positions).

    ``vocab_size`` is the number of real tokens the head predicts; an MDM's input vocabulary has
    one more row, the MASK token, whose id is ``vocab_size``. ``causal=True`` gives the AR baseline.

    The fields after ``init_std`` describe published checkpoints (LLaMA, Qwen2, Mistral, LLaDA,
    Dream); their defaults are the network above. ``mask_token_id >= 0`` puts MASK inside the
    vocabulary (LLaDA 126336, Dream 151666): the embedding then has ``vocab_size`` rows and the
    head's logit for MASK is pinned to ``unmask.model.NEVER_LOGIT``. ``shift_logits`` (Dream) makes the
    logits of position i those the network computes at position i - 1 (position 0 keeps its own).
    ``positions="absolute"`` replaces the rotary positions with a learned embedding per position (a
    table of ``context_len`` rows added to the token embeddings), for comparisons of positional codes.
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
    n_kv_head: int = 0  # 0: n_head; fewer: grouped-query attention (each key/value head serves n_head / n_kv_head queries)
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2, Dream)
    tie_embeddings: bool = False  # the head reuses the input embedding's first vocab_size rows
    rope_scaling: str = ""  # "": plain RoPE; "llama3": LLaMA-3.1 frequency scaling with the rope_* fields below
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    mask_token_id: int = -1  # -1: MASK is an extra input row with id vocab_size; >= 0: this id inside the vocabulary
    shift_logits: bool = False  # Dream: logits of position i come from the hidden state at position i - 1
    # > 0: attention only to keys less than this many positions away: before the query when causal
    # (Mistral: itself and sliding_window - 1 earlier keys), on either side when bidirectional
    sliding_window: int = 0
    # "rope": rotary positions in every attention layer (relative: scores depend on offsets only);
    # "absolute": a learned embedding per position added to the input, no rotation
    positions: str = "rope"
    # the corruption the network denoises: "mask" (absorbing: MASK replaces tokens) or "uniform"
    # (uniform-state: tokens are replaced by uniformly drawn ones; UDLM, Duo); a causal model has none
    noise: str = "mask"
    # a classifier (docs/algorithms.md, 'Classifier guidance (D-CBG)'): the names of its classes; non-empty puts a
    # pooled head of len(labels) logits per row in place of the per-position LM head
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))  # JSON gives a list; the frozen config compares tuples
        try:  # the fields come from presets and config files, never from a flag: named "model <field>"
            for key in ("vocab_size", "context_len", "n_layer", "n_head", "n_embd", "rope_theta", "norm_eps"):
                check_number(key, getattr(self, key), "> 0")
            check_number("init_std", self.init_std, ">= 0")
        except OptionError as exc:
            raise UnmaskError(exc.spelled(lambda name: f"model {name}")) from None
        if self.n_embd % self.n_head:
            raise UnmaskError(f"model n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise UnmaskError(f"model head dim {self.n_embd // self.n_head} must be even for rotary positions")
        if self.block_causal < 0:
            raise UnmaskError(f"model block_causal={self.block_causal} must be >= 0 (0: off)")
        if self.causal and self.time_conditioning:
            raise UnmaskError("model time_conditioning is for MDMs; a causal (AR) model has no time input")
        if self.n_kv_head < 0 or (self.n_kv_head and self.n_head % self.n_kv_head):
            raise UnmaskError(f"model n_kv_head={self.n_kv_head} must divide n_head={self.n_head} (0: as many as n_head)")
        if self.rope_scaling not in ("", "llama3"):
            raise UnmaskError(f"model rope_scaling={self.rope_scaling!r} is not one of: '' (none), 'llama3'")
        if self.rope_scaling and not (self.rope_factor > 0 and self.rope_high_freq_factor > self.rope_low_freq_factor > 0):
            raise UnmaskError("model llama3 rope scaling needs rope_factor > 0 and rope_high_freq_factor > rope_low_freq_factor > 0")
        if not -1 <= self.mask_token_id < self.vocab_size:
            raise UnmaskError(f"model mask_token_id={self.mask_token_id} must be -1 (an extra row) or an id below vocab_size={self.vocab_size}")
        if self.causal and self.shift_logits:
            raise UnmaskError("model shift_logits is for MDMs: a causal (AR) model's logits at i already predict token i + 1")
        if self.sliding_window < 0:
            raise UnmaskError(f"model sliding_window={self.sliding_window} must be >= 0 (0: attention over the whole context)")
        if self.sliding_window and self.block_causal:
            raise UnmaskError("model sliding_window and block_causal cannot be combined; set one of them to 0")
        if self.positions not in ("rope", "absolute"):
            raise UnmaskError(f"model positions={self.positions!r} is not one of: 'rope' (rotary), 'absolute' (learned embeddings)")
        if self.noise not in ("mask", "uniform"):
            raise UnmaskError(f"model noise={self.noise!r} is not one of: 'mask' (absorbing), 'uniform' (uniform-state)")
        if self.noise == "uniform" and (self.causal or not self.time_conditioning):
            raise UnmaskError("model noise='uniform' needs a bidirectional, time-conditioned network (causal=False, time_conditioning=True):"
                              " the noise level is not visible in a uniform-state canvas")
        if self.positions == "absolute" and self.rope_scaling:
            raise UnmaskError("model rope_scaling applies to rotary positions; with positions='absolute' leave it ''")
        if self.labels and (len(self.labels) < 2 or len(set(self.labels)) != len(self.labels) or not all(
                isinstance(name, str) and name for name in self.labels)):
            raise UnmaskError(f"model labels={list(self.labels)!r} must be two or more distinct non-empty names (a classifier's classes)")

    @property
    def mask_id(self) -> int:
        """The MASK token's id: ``vocab_size`` (an input-only row) unless ``mask_token_id`` names one inside."""
        return self.mask_token_id if self.mask_token_id >= 0 else self.vocab_size

    @property
    def embed_rows(self) -> int:
        """Rows of the input embedding: the vocabulary, plus the MASK row when MASK lies outside it."""
        return self.vocab_size if self.mask_token_id >= 0 else self.vocab_size + 1

    @property
    def num_labels(self) -> int:
        """Classes of a classifier's pooled head (0: a language model, logits per position)."""
        return len(self.labels)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

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
        d, f, kv = self.n_embd, self.ffn_dim, self.kv_heads * self.head_dim
        per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d + ((d + 2 * kv) if self.qkv_bias else 0)
        time = (256 * d + d + d * d + d) if self.time_conditioning else 0
        return self.n_layer * per_layer + d + time

    def total_params(self) -> int:
        head = 0 if self.tie_embeddings else self.vocab_size * self.n_embd
        if self.labels:  # a classifier's pooled head (with its bias) replaces the LM head
            head = self.num_labels * (self.n_embd + 1)
        positions = self.context_len * self.n_embd if self.positions == "absolute" else 0
        return self.non_embedding_params() + self.embed_rows * self.n_embd + positions + head

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


# TrainConfig's numbers: field -> the values it may take (see check_number)
TRAIN_NUMBERS: dict[str, str] = {
    "steps": "> 0", "batch_size": "> 0", "grad_accum": "> 0", "lr": "> 0", "min_lr_ratio": "[0, 1]",
    "warmup_steps": ">= 0", "weight_decay": ">= 0", "beta1": "[0, 1)", "beta2": "[0, 1)", "grad_clip": "> 0",
    "seed": ">= 0", "eval_every": "> 0", "eval_windows": "> 0", "eval_draws": "> 0", "checkpoint_every": "> 0",
    "keep_checkpoints": "> 0", "log_every": "> 0", "global_batch_tokens": ">= 0", "ema": "[0, 1)",
}  # the sections check their own numbers


@dataclass(frozen=True)
class AdaptationConfig:
    """Starting from other weights (``--init-from``: a run or a published checkpoint folder): AR -> MDM
    adaptation (unmask.adaptation), an MDM fine-tuned into a block model (bd3), or the pretrained run
    a fine-tuning run starts from; and, for an MDM, the attention mask annealed from causal to
    bidirectional over ``anneal_steps`` steps (DiffuLLaMA)."""

    init_from: str = ""
    anneal_steps: int = 0

    def __post_init__(self) -> None:
        check_number("anneal_steps", self.anneal_steps, ">= 0")


@dataclass(frozen=True)
class BlockDiffusionConfig:
    """Block diffusion (objective bd3; docs/algorithms.md, 'Block diffusion (BD3-LM)'): ``size`` tokens
    per block L', and the clipped range [beta, omega] of each block's time t (the mask rate, for the
    linear schedule)."""

    size: int = 0
    mask_rate_min: float = 0.0
    mask_rate_max: float = 1.0
    flex_attention: bool = False  # the 2L training forward through FlexAttention instead of SDPA + boolean mask

    def __post_init__(self) -> None:  # the size is checked with the objective (TrainConfig)
        if not 0 <= self.mask_rate_min < self.mask_rate_max <= 1:
            raise OptionError("mask_rate_min", "{mask_rate_min}={_min} and {mask_rate_max}={_max} must satisfy 0 <= min < max <= 1",
                              _min=self.mask_rate_min, _max=self.mask_rate_max)


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning (``unmask finetune``; docs/algorithms.md, 'Conditional bound and fine-tuning'):
    the data is a pairs folder (unmask.data.pairs) and only responses are learned; an MDM's prompt is
    replaced by MASK with probability ``cfg_dropout`` (0: unsupervised CFG at sampling time, as SMDM;
    0.1: standard CFG)."""

    cfg_dropout: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.cfg_dropout < 1:
            raise _cfg_dropout_error(self.cfg_dropout)


DIVERGENCES = ("kl", "tvd")  # how a distilled student's distribution is compared with its teacher's target
DISTILLATION = ("sdtt", "dcd")  # the objectives that distil a teacher run (the distill section)


@dataclass(frozen=True)
class DistillConfig:
    """Distillation for few-step sampling (``unmask distill``;
    docs/algorithms.md, 'Distillation for few-step sampling'): the ``teacher`` run, whose weights the
    student starts from, and ``rounds`` of ``steps_per_round`` optimizer steps. In the first round the
    teacher samples with ``teacher_steps`` steps and the student learns to take half as many; after each
    round the student becomes the teacher and the steps halve, so the distilled model samples with
    teacher_steps / 2^rounds steps. ``divergence``: how the student's distribution is compared with the
    teacher's target (kl: KL(target || student); tvd: total variation)."""

    teacher: str = ""
    rounds: int = 1
    steps_per_round: int = 1000
    teacher_steps: int = 1024
    divergence: str = "kl"

    def __post_init__(self) -> None:
        for key in ("rounds", "steps_per_round", "teacher_steps"):
            check_number(key, getattr(self, key), ">= 1")
        if self.teacher_steps % 2**self.rounds:
            raise OptionError("teacher_steps", "{teacher_steps}={_steps} must be a multiple of {_power} = 2^{_rounds}: each of the {_rounds} "
                              "{rounds} halves the sampling steps", _steps=self.teacher_steps, _power=2**self.rounds, _rounds=self.rounds)
        if self.divergence not in DIVERGENCES:
            raise not_one_of("divergence", self.divergence, DIVERGENCES)

    @property
    def student_steps(self) -> int:
        """The sampling steps of the distilled model, after every round: teacher_steps / 2^rounds."""
        return self.teacher_steps // 2**self.rounds


@dataclass(frozen=True)
class DuoConfig:
    """Duo's curriculum (objective duo; docs/algorithms.md, 'Uniform-state diffusion (UDLM, Duo)'): for the first
    ``curriculum_steps`` optimizer steps the network sees softmax(w_t / ``tau``) of Gaussian latents at a gamma
    drawn uniformly in [``gamma_min``, ``gamma_max``] (alpha~^2 = sigmoid(-gamma)), and the loss scores their
    argmax at the uniform-state alpha = T(gamma); then plain UDLM. The defaults are the Duo paper's language-model
    settings (tau = 10^-3, gamma in [-3.5, -1.75], the curriculum for the first half of the run: here of the
    default 1000 steps)."""

    curriculum_steps: int = 500
    tau: float = 1e-3
    gamma_min: float = -3.5
    gamma_max: float = -1.75

    def __post_init__(self) -> None:
        check_number("curriculum_steps", self.curriculum_steps, ">= 0")
        check_number("tau", self.tau, "> 0")
        for key in ("gamma_min", "gamma_max"):
            check_number(key, getattr(self, key), "(-30, 30)")
        if not self.gamma_min < self.gamma_max:
            raise OptionError("gamma_min", "{gamma_min}={_min} must be below {gamma_max}={_max}", _min=self.gamma_min, _max=self.gamma_max)


def _block_size_error(size: int) -> OptionError:
    return OptionError("block_size", "{objective} bd3 needs {block_size} >= 1 (tokens per block), got {_size}", _size=size)


def _cfg_dropout_error(value: float) -> OptionError:
    return OptionError("cfg_dropout", "{cfg_dropout}={_value} must be in [0, 1), and is for fine-tuning an MDM only "
                       "(an AR model has no MASK to drop its prompt to)", _value=value)


# The sections of a TrainConfig; None where a section is off (no init_from or annealing, not block
# diffusion, not fine-tuning).
SECTIONS: dict[str, type] = {"adapt": AdaptationConfig, "block": BlockDiffusionConfig, "sft": SFTConfig, "distill": DistillConfig,
                            "duo": DuoConfig}

# The sections' settings in the flat layout (config.json before sections, and the flags): name -> (section, field).
# Fine-tuning is switched on by ``sft`` itself (True, or its section).
FLAT_SETTINGS: dict[str, tuple[str, str]] = {
    "init_from": ("adapt", "init_from"), "anneal_steps": ("adapt", "anneal_steps"), "block_size": ("block", "size"),
    "mask_rate_min": ("block", "mask_rate_min"), "mask_rate_max": ("block", "mask_rate_max"),
    "flex_attention": ("block", "flex_attention"), "cfg_dropout": ("sft", "cfg_dropout"),
    "teacher": ("distill", "teacher"), "rounds": ("distill", "rounds"), "steps_per_round": ("distill", "steps_per_round"),
    "teacher_steps": ("distill", "teacher_steps"), "divergence": ("distill", "divergence"),
    "curriculum_steps": ("duo", "curriculum_steps"), "tau": ("duo", "tau"), "gamma_min": ("duo", "gamma_min"),
    "gamma_max": ("duo", "gamma_max"),
}


def _section_values(name: str, given: Any) -> dict[str, Any]:
    """The settings of section ``name`` given as its object, its dict (JSON) or None (none given)."""
    if given is None:
        return {}
    if dataclasses.is_dataclass(given):
        return dataclasses.asdict(given)
    return dict(_known_fields(SECTIONS[name], given, f"training {name}"))


def _nested(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with every section a section object (or None): from the section itself, its dict (JSON), or
    its settings by their flat names, which win over the section's own (``dataclasses.replace(cfg, block_size=8)``).
    A section given only by flat names is on when one differs from its default; fine-tuning only by ``sft``."""
    out = dict(settings)
    for name, section in SECTIONS.items():
        given = out.get(name)
        if isinstance(given, bool):  # sft=True / sft=False: the flat layout's switch
            given = {} if given else None
        values = _section_values(name, given)
        flat = {field: out.pop(key) for key, (where, field) in FLAT_SETTINGS.items() if where == name and key in out}
        values |= flat
        defaults = {f.name: f.default for f in dataclasses.fields(section)}
        on = given is not None or (name != "sft" and any(value != defaults[key] for key, value in flat.items()))
        on = on or (name == "duo" and out.get("objective") == "duo")  # a duo run records its curriculum, defaults included
        if not on and values.get("cfg_dropout"):
            raise _cfg_dropout_error(values["cfg_dropout"])
        out[name] = section(**values) if on else None
    return out


class _Settings(type):
    """Makes a TrainConfig from its settings before the frozen object exists (it is never changed after):
    the sections as objects, their dicts or their flat names (older code and config.json files), and every
    setting left unset (None) at its objective's default, so config.json records the values used."""

    def __call__(cls, **settings: Any) -> "TrainConfig":
        from unmask.objectives.registry import OBJECTIVES  # the objectives register themselves on import

        settings = _nested(settings)
        objective = OBJECTIVES.get(settings.get("objective", cls.__dataclass_fields__["objective"].default))
        for key, value in (objective.defaults if objective is not None else {}).items():
            if settings.get(key) is None:
                settings[key] = value
        return super().__call__(**settings)


@dataclass(frozen=True)
class TrainConfig(metaclass=_Settings):
    """The training loop's settings. Batches hold ``batch_size * grad_accum`` sequences per step.

    The sections ``adapt``, ``block``, ``sft`` and ``distill`` are None where they are off. ``TrainConfig(...)`` and
    :meth:`from_dict` also take their settings flat (``block_size=4``, ``sft=True``, ``cfg_dropout=0.1``),
    the layout of older config.json files; :meth:`flat_settings` gives that view back.
    """

    objective: str = "mdm"  # a name in unmask.objectives.OBJECTIVES: mdm, ar, bd3 (fine-tuning is the sft section)
    loss: Literal["t-dce", "k-dce"] | None = None  # MDM estimator (docs/algorithms.md, 'MDM loss: t-DCE and k-DCE'); None: the objective's default
    schedule: Literal["linear", "cosine"] = "linear"
    low_discrepancy: bool = True
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float | None = None  # None: the objective's default (its ``defaults``, unmask.objectives)
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
    # Scale (docs/training.md, 'Training on many GPUs'): data parallelism applied from outside the model
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # > 0: tokens per optimizer step, whatever the number of processes; grad_accum is then derived
    # as global_batch_tokens / (context_len * processes * batch_size)
    global_batch_tokens: int = 0
    compile: bool = False  # torch.compile of each block (checkpoints keep the plain state dict)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    ema: float = 0.0  # > 0: keep an fp32 exponential moving average of the weights with this decay
    adapt: AdaptationConfig | None = None
    block: BlockDiffusionConfig | None = None  # objective bd3 only, where it is needed
    sft: SFTConfig | None = None
    distill: DistillConfig | None = None  # objectives sdtt and dcd only, where it is needed
    duo: DuoConfig | None = None  # objective duo only (always there for it)

    def __post_init__(self) -> None:
        from unmask.objectives.registry import trained_from_text

        if self.objective not in trained_from_text():
            raise not_one_of("objective", self.objective, trained_from_text())
        if self.objective == "bd3" and (self.block is None or self.block.size < 1):
            raise _block_size_error(0 if self.block is None else self.block.size)
        if self.objective != "bd3" and self.block is not None:
            raise OptionError("block_size", "{block_size}, {mask_rate_min}, {mask_rate_max} and {flex_attention} apply to {objective} bd3 only")
        for key, known in (("loss", ("t-dce", "k-dce")), ("schedule", SCHEDULES), ("precision", ("auto", "bf16", "fp32"))):
            if getattr(self, key) not in known:
                raise not_one_of(key, getattr(self, key), known)
        for key, rule in TRAIN_NUMBERS.items():
            check_number(key, getattr(self, key), rule)
        if self.parallel not in ("ddp", "fsdp"):
            raise not_one_of("parallel", self.parallel, ("ddp", "fsdp"))
        if self.adapt is not None and self.adapt.anneal_steps and self.objective != "mdm":
            raise OptionError("anneal_steps", "{anneal_steps}={_steps} is for {objective} mdm only", _steps=self.adapt.anneal_steps)
        if self.sft is not None and self.objective not in ("mdm", "ar"):
            raise OptionError("objective", "fine-tuning on pairs is for an MDM or AR model, not {objective} {_name}", _name=self.objective)
        if self.sft is not None and self.sft.cfg_dropout and self.objective != "mdm":
            raise _cfg_dropout_error(self.sft.cfg_dropout)
        self._check_distill()
        if self.objective != "duo" and self.duo is not None:
            raise OptionError("curriculum_steps", "{curriculum_steps}, {tau}, {gamma_min} and {gamma_max} apply to {objective} duo only")
        for at, before in self.steps_changes:
            if not 0 <= at <= min(before, self.steps):
                raise UnmaskError(f"steps_changes entry ({at}, {before}) must change the length at a step within both runs")

    def _check_distill(self) -> None:
        """The distill section is there exactly for the objectives that distil, names its teacher, and its rounds fit in the run."""
        if self.objective in DISTILLATION and (self.distill is None or not self.distill.teacher):
            raise OptionError("teacher", "{objective} {_name} distils a teacher run: start it with unmask distill, or give the distill "
                              "section ({teacher}, {rounds}, {steps_per_round})", _name=self.objective)
        if self.objective not in DISTILLATION and self.distill is not None:
            raise OptionError("teacher", "{teacher}, {rounds}, {steps_per_round}, {teacher_steps} and {divergence} apply to {objective} "
                              "sdtt or dcd only")
        if self.distill is not None and self.steps < self.distill.rounds * self.distill.steps_per_round:
            raise OptionError("steps", "{steps}={_steps} is fewer than {rounds} x {steps_per_round} = {_total}", _steps=self.steps,
                              _total=self.distill.rounds * self.distill.steps_per_round)

    @property
    def init_from(self) -> str:
        """The weights the run starts from ("" for none): ``adapt.init_from``."""
        return self.adapt.init_from if self.adapt is not None else ""

    @property
    def anneal_steps(self) -> int:
        """Steps over which the attention is annealed to bidirectional (0: none): ``adapt.anneal_steps``."""
        return self.adapt.anneal_steps if self.adapt is not None else 0

    def flat_settings(self) -> dict[str, Any]:
        """Every setting by its flat name, in the order of the flags: the sections' settings spelled out
        (their defaults where a section is off) and ``sft`` a bool. The layout of older config.json files."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name not in SECTIONS:
                out[f.name] = value
                continue
            if f.name == "sft":
                out["sft"] = value is not None
            fields = {field.name: field.default for field in dataclasses.fields(SECTIONS[f.name])} | _section_values(f.name, value)
            out |= {key: fields[field] for key, (where, field) in FLAT_SETTINGS.items() if where == f.name}
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """A config from its dict: the nested layout (``to_dict``) or the flat one of older run folders."""
        data = dict(_known_fields(cls, data, "training", also=FLAT_SETTINGS))
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
    data_fingerprint: str = ""  # content fingerprint of the data folder's shards ("" for older runs: not checked)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "train": self.train.to_dict(),
            "data_dir": self.data_dir,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "data_fingerprint": self.data_fingerprint,
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
            data_fingerprint=data.get("data_fingerprint", ""),
        )
