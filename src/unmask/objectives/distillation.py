"""Distillation for few-step sampling: the teacher, round after round, and what every distillation objective
shares. docs/algorithms.md, 'Distillation for few-step sampling'.

A distillation run (objectives ``sdtt`` and ``dcd``; the ``distill`` section of its training config,
:class:`unmask.config.DistillConfig`) trains a student that starts from the teacher run's weights, in
``rounds`` of ``steps_per_round`` optimizer steps. In round r (0-based) the teacher samples with
N_r = teacher_steps / 2^r steps and the student learns to take N_r / 2, one step of its own for two of
the teacher's; round 0's teacher is the teacher run, round r's is the student as it was at the end of
round r - 1 (progressive distillation: Salimans & Ho 2022; SDTT: Deschenaux & Gulcehre 2024; DCD:
Sahoo et al. 2025). After the last round the student samples with teacher_steps / 2^rounds steps.

The teacher is a frozen copy of the network on every process (eval mode, no gradients), so data
parallelism needs nothing of it: every rank loads it. Resuming is exact across rounds: when round
r >= 1 begins, the main process writes the student's weights of that step to
``RUN/teachers/round_<r>.safetensors``, and a run resumed inside round r reads them back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import torch

from unmask.config import DistillConfig, ModelConfig, RunConfig, TrainConfig
from unmask.data.tokenizer import Tokenizer
from unmask.errors import OptionError, UnmaskError
from unmask.objectives.base import Objective

TEACHERS = "teachers"  # the run's subfolder of round teachers


def teacher_run(path: str | Path) -> RunConfig:
    """The RunConfig of a run folder (or one of its checkpoints), read from its checkpoint's metadata only."""
    from safetensors import safe_open

    from unmask.checkpoint import resolve_checkpoint

    path = Path(path)
    if not ((path / "checkpoints").is_dir() or (path / "trainer.json").is_file()):
        raise OptionError("teacher", "{teacher} {_path!r} is not a run folder (one with checkpoints/); distil a run trained or imported "
                          "with unmask", _path=str(path))
    with safe_open(str(resolve_checkpoint(path) / "model.safetensors"), framework="pt") as f:
        return RunConfig.from_dict(json.loads((f.metadata() or {})["config"]))


def divergence(target: torch.Tensor, student: torch.Tensor, kind: str) -> torch.Tensor:
    """D(target || student) over the last dim of log-probabilities (..., V) -> (...): ``kl`` sum_v T (log T - log S),
    or ``tvd`` (1/2) sum_v |T - S| (``DistillConfig.divergence``)."""
    if kind == "kl":
        return (target.exp() * (target - student)).sum(dim=-1)
    return 0.5 * (target.exp() - student.exp()).abs().sum(dim=-1)


class RoundTeacher:
    """The frozen teacher of the round a step belongs to (``net``), loaded when the round changes."""

    def __init__(self, cfg: DistillConfig, model: ModelConfig) -> None:
        self.cfg, self.model = cfg, model
        self.net: torch.nn.Module | None = None
        self.round: int | None = None
        self.run_dir: Path | None = None
        self.is_main = True

    def round_at(self, step: int) -> int:
        """The round of optimizer step ``step`` (0-based); steps past the last round's end extend it."""
        return min(step // self.cfg.steps_per_round, self.cfg.rounds - 1)

    def teacher_steps(self, round: int) -> int:
        """N_r: the teacher's sampling steps in ``round`` (the student learns to take half as many)."""
        return self.cfg.teacher_steps // 2**round

    def file(self, round: int) -> Path:
        return self.run_dir / TEACHERS / f"round_{round}.safetensors"

    def at_step(self, step: int, student: torch.nn.Module) -> None:
        """Make ``net`` the teacher of ``step``'s round: the teacher run (round 0), the ``student`` itself
        when this step begins its round, else the weights written when the round began."""
        from unmask.model import Transformer

        round = self.round_at(step)
        if round == self.round:
            return
        if round == 0:
            from unmask.adaptation import initial_weights

            weights = initial_weights(self.cfg.teacher, self.model)  # the weights the student started from
        elif step == round * self.cfg.steps_per_round:
            weights = {key: value.detach().clone() for key, value in student.state_dict().items()}
            if self.is_main:
                self._write(round, weights)
        else:
            weights = self._read(round)
        if self.net is None:
            self.net = Transformer(self.model).requires_grad_(False)
        self.net.load_state_dict(weights)
        self.net.to(next(student.parameters()).device).eval()
        self.round = round

    def _write(self, round: int, weights: dict[str, torch.Tensor]) -> None:
        """The teacher of ``round``, atomically (a temporary file renamed), for a run resumed inside it."""
        from safetensors.torch import save_file

        path = self.file(round)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        save_file({key: value.cpu().contiguous() for key, value in weights.items()}, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _read(self, round: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = self.file(round)
        if not path.is_file():
            raise UnmaskError(f"{path} is missing: the teacher of round {round + 1}, written when the round began, is needed to resume "
                              f"inside it; resume from a checkpoint at or before step {round * self.cfg.steps_per_round}")
        return load_file(str(path))

    def describe(self, step: int) -> dict[str, int]:
        """The round of ``step`` (1-based) and its sampling steps, teacher's and student's, for the metrics."""
        round = self.round_at(step)
        return {"round": round + 1, "teacher_steps": self.teacher_steps(round), "student_steps": self.teacher_steps(round) // 2}


class Distillation(Objective):
    """What SDTT and DCD share: the teacher of each round, the checks of the teacher run, the hooks of the loop.

    ``sources``: the objectives of the runs it distils (the network's own, and itself, to go on distilling
    a distilled run); ``kind``: what those runs are called in errors.
    """

    sources: ClassVar[tuple[str, ...]] = ()
    kind: ClassVar[str] = ""

    def __init__(self, train: TrainConfig, model: ModelConfig) -> None:
        super().__init__(train, model)
        self.teacher = RoundTeacher(train.distill, model)

    @classmethod
    def teacher_config(cls, path: str | Path) -> RunConfig:
        """The teacher run's config, refused unless it is a run this objective distils."""
        config = teacher_run(path)
        if config.train.objective not in cls.sources:
            raise OptionError("teacher", "{_name} distils {_kind} runs (objective {_sources}); {teacher} {_path} is a run of objective {_other}",
                              _name=cls.name, _kind=cls.kind, _sources=" or ".join(cls.sources), _path=str(path),
                              _other=config.train.objective)
        return config

    def check(self, tokenizer: Tokenizer, data_dir: Path, device: torch.device) -> None:
        super().check(tokenizer, data_dir, device)
        teacher = self.teacher_config(self.train.distill.teacher)
        if self.train.parallel == "fsdp":
            raise OptionError("parallel", "{parallel} fsdp: distillation keeps a whole teacher on every process; use ddp")
        if teacher.tokenizer_fingerprint and teacher.tokenizer_fingerprint != tokenizer.fingerprint:
            raise OptionError("data", "{data} {_dir} was made with another tokenizer than the teacher {_teacher}'s; give data prepared "
                              "with its tokenizer", _dir=data_dir, _teacher=self.train.distill.teacher)

    def begin(self, run_dir: Path, is_main: bool) -> None:
        self.teacher.run_dir, self.teacher.is_main = run_dir, is_main

    def before_step(self, step: int, model: torch.nn.Module) -> None:
        self.teacher.at_step(step, model)

    def metrics(self, step: int) -> dict[str, Any]:
        return self.teacher.describe(step)
