"""lm-eval-harness adapter: ``UnmaskLM`` scores and generates with an MDM or AR checkpoint.

* ``loglikelihood``: log p(continuation | context). AR: exact. MDM: ``method="chain-rule"``
  (default; exact for the left-to-right factorisation, |continuation| network calls, deterministic)
  or ``method="mc"`` (Monte Carlo lower bound, ``draws`` k-DCE draws over the continuation). The
  context stays clean; with ``cfg_scale`` w > 0 the logits are guided by the same network with the
  context replaced by MASK (unsupervised CFG, SMDM).
* ``loglikelihood_rolling``: lm-eval's disjoint rolling windows, each scored as above.
* ``generate_until``: MDM canvas [EOS ; context ; MASK x max_gen_toks] filled by any sampler with
  the sampler options of every sampling entry point, through the one decoding path
  (:func:`unmask.sampling.decoding.decoding_for`; default the ancestral sampler, one step per token,
  greedy: temperature 0 unless the options or the request say otherwise; a block model with its
  block cache), AR token by token; cut at the until strings.

Contexts longer than the model's context window are truncated on the left.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm

from unmask.checkpoint import checkpoint_tokenizer, load_model
from unmask.compiled import compile_for_decoding
from unmask.data import Tokenizer
from unmask.device import pick_device
from unmask.errors import OptionError, UnmaskError, check_number, not_one_of
from unmask.likelihood import chain_rule, conditional_elbo
from unmask.device import device_of
from unmask.losses import token_nll
from unmask.config import TrainConfig
from unmask.sampling.canvas import make_canvas, trim_at_eos
from unmask.sampling.decoding import Decoding, decoding_for, sampling_generator
from unmask.sampling.options import OPTIONS, check_value

try:
    from lm_eval.api.model import LM
except ImportError:  # the adapter needs the [eval] extra; the rest of unmask does not
    LM = object

LOCAL_TASKS = ("shakespeare_next_line", "shakespeare_word_order", "shakespeare_complete")


def _require_lm_eval() -> None:
    if LM is object:
        raise UnmaskError("`unmask eval harness` needs lm-eval: pip install 'unmask[eval]'")


class UnmaskLM(LM):
    def __init__(
        self,
        checkpoint: str | Path,
        method: str = "chain-rule",
        draws: int = 32,
        batch_size: int = 16,
        seed: int = 0,
        device: str = "auto",
        model=None,
        tokenizer: Tokenizer | None = None,
        train_config=None,
        compile: bool = False,
        **sampling,
    ) -> None:
        """``sampling``: the sampler options (see :func:`unmask.generation.generate`) for
        generate_until; ``cfg_scale`` also guides the scores. ``compile`` (model_args ``compile=True``):
        every network call, scoring and generation, runs compiled at bucketed shapes (:mod:`unmask.compiled`)."""
        _require_lm_eval()
        super().__init__()
        if method not in ("chain-rule", "mc"):
            raise not_one_of("method", method, "chain-rule, mc")
        cfg_scale = sampling.get("cfg_scale") or 0.0
        check_value(OPTIONS["cfg_scale"], cfg_scale)
        check_number("draws", draws, ">= 2")
        check_number("batch_size", batch_size, "> 0")
        if model is None:
            self.model, config = load_model(checkpoint, pick_device(device))
            self.model_config, train_config = config.model, config.train
            self.tok = checkpoint_tokenizer(checkpoint)
        else:  # an in-memory model (tests): needs a tokenizer too
            self.model, self.model_config, self.tok = model, model.config, tokenizer
        self.model = compile_for_decoding(self.model, compile)
        self.train_config = train_config or TrainConfig()
        self.method, self.draws, self.cfg_scale, self.batch_size = method, draws, cfg_scale, batch_size
        self.sampling = sampling
        self._decoding(1, {"temperature": 0.0, **sampling})  # bad sampler options are refused now, not after the scoring
        self.generator = torch.Generator().manual_seed(seed)  # Monte Carlo scoring: the estimators draw on the CPU
        self.sample_generator = sampling_generator(self.model, seed)  # generate_until: samplers draw on the model's device
        self._device = device_of(self.model)

    def _decoding(self, n: int, options: dict) -> Decoding:
        """generate_until's decoding of ``n`` new tokens (the one path: the AR sampler, or the MDM's spec).
        An AR model takes one step per token whatever a request's length: ``steps`` is the MDM's."""
        if self.model_config.causal:
            options = {name: value for name, value in options.items() if name != "steps"}
        return decoding_for(self.model_config, n, options, self.train_config.schedule)

    # -- scoring -----------------------------------------------------------------------------

    def _fit(self, context: list[int], continuation: list[int]) -> list[int]:
        """Left-truncate the context so that [context ; continuation] fits the window (the AR model's
        input is the sequence less its last token, so it holds one token more)."""
        room = self.model_config.context_len + int(self.model_config.causal) - len(continuation)
        if room < int(self.model_config.causal):
            raise UnmaskError(f"a continuation of {len(continuation)} tokens does not fit the model's context of {self.model_config.context_len}")
        return context[len(context) - room :] if len(context) > room else context

    @torch.no_grad()
    def _score_batch(self, seqs: list[list[int]], n_cont: list[int]) -> list[tuple[float, bool]]:
        """Sequences of equal length; the last n_cont[b] tokens of row b are scored."""
        x = torch.tensor(seqs, device=self._device)
        pos = torch.arange(x.shape[1], device=self._device)
        score_mask = pos[None, :] >= (x.shape[1] - torch.tensor(n_cont, device=self._device))[:, None]
        if self.model_config.causal:
            logits = self.model(x[:, :-1]).float()
            nll = token_nll(logits, x[:, 1:])
            m = score_mask[:, 1:]
            logprob = -(nll * m).sum(dim=1)
            greedy = ((logits.argmax(-1) == x[:, 1:]) | ~m).all(dim=1)
            return list(zip(logprob.tolist(), greedy.tolist()))
        if self.method == "chain-rule":
            res = chain_rule(self.model, x, score_mask, cfg_scale=self.cfg_scale)
            return list(zip(res.logprob.tolist(), res.greedy.tolist()))
        mean, _ = conditional_elbo(self.model, x, score_mask, self.draws, self.generator, self.cfg_scale)
        return [(v, False) for v in mean.tolist()]

    def _score(self, pairs: list[tuple[list[int], list[int]]], desc: str) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) pairs -> (log p(continuation | context), is_greedy)."""
        items = []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise UnmaskError("lm-eval asked to score an empty continuation")
            items.append((i, self._fit(ctx, cont) + cont, len(cont)))
        items.sort(key=lambda it: len(it[1]))
        out: list[tuple[float, bool] | None] = [None] * len(items)
        bar = tqdm(total=len(items), desc=desc, unit="req")
        start = 0
        while start < len(items):  # batches of equal length: no padding, so bidirectional attention is exact
            end = start
            while end < len(items) and end - start < self.batch_size and len(items[end][1]) == len(items[start][1]):
                end += 1
            chunk = items[start:end]
            for (i, _, _), result in zip(chunk, self._score_batch([c[1] for c in chunk], [c[2] for c in chunk])):
                out[i] = result
            bar.update(len(chunk))
            start = end
        bar.close()
        return out  # type: ignore[return-value]

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # whitespace at the end of the context belongs to the continuation (lm-eval convention)
        stripped = context.rstrip()
        continuation = context[len(stripped):] + continuation
        return self.tok.encode(stripped), self.tok.encode(continuation)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        # EOS marks the start of a document, as it does in training
        pairs = [([self.tok.eos_id] + ctx, cont) for ctx, cont in (self._split(*req.args) for req in requests)]
        return self._score(pairs, "loglikelihood")

    def loglikelihood_rolling(self, requests) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        pairs, owner = [], []
        # windows hold at most max_len + 1 tokens (the first one led by EOS); see _fit
        max_len = self.model_config.context_len - (0 if self.model_config.causal else 1)
        for r, req in enumerate(requests):
            ids = self.tok.encode(req.args[0])
            for window in get_rolling_token_windows(ids, self.tok.eos_id, max_len, 1):
                pairs.append(make_disjoint_window(window))
                owner.append(r)
        scores = self._score(pairs, "loglikelihood_rolling")
        totals = [0.0] * len(requests)
        for r, (logprob, _) in zip(owner, scores):
            totals[r] += logprob
        return totals

    # -- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        results = []
        for req in tqdm(requests, desc="generate_until", unit="req"):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            n = int(kwargs.get("max_gen_toks", 32))
            options = {"temperature": 0.0, **self.sampling}
            if "temperature" in kwargs:  # the task's own setting wins
                options["temperature"] = float(kwargs["temperature"])
            ctx = [self.tok.eos_id] + self.tok.encode(context)
            room = self.model_config.context_len - n
            if room < 0:
                raise UnmaskError(f"max_gen_toks={n} does not fit the model's context of {self.model_config.context_len}")
            ctx = ctx[max(0, len(ctx) - room):]
            # [EOS ; context ; MASK x n] (AR: without the MASKs); the first token (the EOS, unless the context was
            # truncated) is the separator: not part of the prompt, which CFG replaces by MASK
            x, cond, start = make_canvas([ctx[1:]], 0 if self.model_config.causal else n, self.model_config.mask_id, self.tok.pad_id,
                                         ctx[0] if ctx else None, device=self._device)
            new = self._decoding(n, options).run(self.model, x, self.sample_generator, cond, start=start).tokens[0, start:]
            text = self.tok.decode(trim_at_eos(new.tolist(), self.tok.eos_id))
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            results.append(text)
        return results


def local_task_dir(workdir: Path) -> Path:
    """Write the shipped task YAMLs with ABSOLUTE data paths into ``workdir`` and return it.

    lm-eval resolves ``data_files`` against the process's working directory, so the packaged
    YAMLs carry a placeholder that is replaced by the installed data file's path here.
    """
    src = resources.files("unmask.evaluation").joinpath("tasks")
    workdir.mkdir(parents=True, exist_ok=True)
    for name in LOCAL_TASKS:
        data = workdir / f"{name}.jsonl"
        data.write_bytes(src.joinpath(f"{name}.jsonl").read_bytes())
        yaml = src.joinpath(f"{name}.yaml").read_text(encoding="utf-8").replace("__DATA_FILE__", str(data.resolve()))
        (workdir / f"{name}.yaml").write_text(yaml, encoding="utf-8")
    return workdir


def run_harness(
    lm: "UnmaskLM", tasks: list[str], limit: int | None = None, num_fewshot: int | None = None, include_path: str | None = None, seed: int = 0
) -> dict:
    """``lm_eval.simple_evaluate`` in-process with the shipped local tasks registered. Returns
    {task: {metric: value}} plus the raw lm-eval results under "raw"."""
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tmp = Path(tempfile.mkdtemp(prefix="unmask-tasks-"))
    try:
        paths = [str(local_task_dir(tmp))] + ([include_path] if include_path else [])
        manager = TaskManager(include_path=paths)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise OptionError("tasks", "{tasks}: unknown task(s) {_unknown}; the shipped offline tasks are {_local}", _unknown=unknown,
                              _local=", ".join(LOCAL_TASKS))
        out = simple_evaluate(
            model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot, log_samples=False,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=0,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    metrics = {
        task: {k.split(",")[0]: v for k, v in values.items() if isinstance(v, (int, float)) and not k.startswith("alias")}
        for task, values in out["results"].items()
    }
    return {"tasks": metrics, "raw": json.loads(json.dumps(out["results"], default=str))}
