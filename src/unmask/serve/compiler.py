"""Requests' constraints (structured output) compiled for the served tokenizer: each once, in a
worker process, within a time limit.

How long a constraint takes to compile grows with its pattern's automaton times the vocabulary,
and short requests can ask for huge automata: for a 512-token vocabulary the JSON Schema ``{}``
(any JSON value) takes about 110 s, the regex ``\\w{50}`` about 6 s. So compiles run in a worker
process (``python -m unmask.serve.compiler``, started on the first compile), where they neither
hold the server's GIL nor outlive their time: past the server's ``compile_seconds`` the worker is
ended (the next compile starts another) and the request is refused, naming its field. Compiles run
one at a time, for all the engines of a process (:data:`COMPILER`; the worker reads each tokenizer
once). The outcome of every compile, an automaton or the refusal, is kept (the :data:`CACHE_SIZE`
most recently used, by constraint and tokenizer fingerprint), so a repeated constraint is neither
compiled nor tried again.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

from unmask.constraints import Constraint, TokenAutomaton
from unmask.errors import OptionError

CACHE_SIZE = 32


class ConstraintCompiler:
    """Compiles :class:`~unmask.constraints.Constraint` s for tokenizers, each in at most the
    ``seconds`` a call gives (the worker's start is not counted). ``stats``: constraints compiled
    (refusals included), calls that found their constraint's outcome kept, compiles stopped for time."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self.cache: OrderedDict[tuple, TokenAutomaton | OptionError] = OrderedDict()
        self.stats = {"compiled": 0, "reused": 0, "timed_out": 0}
        self._lock = threading.Lock()  # the cache and the counters
        self._compiling = threading.Lock()  # the worker: one compile at a time
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="unmask-constraints")
        self._worker: subprocess.Popen | None = None
        self._known: set[str] = set()  # fingerprints of the tokenizers the worker has read

    def __call__(self, constraint: Constraint, tokenizer, seconds: float) -> TokenAutomaton:
        """The automaton of ``constraint`` over ``tokenizer``'s ids; raises an OptionError naming its
        kind when it does not compile, when no text of the tokenizer's tokens matches it, or when
        compiling it takes more than ``seconds``."""
        key = (constraint, tokenizer.fingerprint)
        outcome = self._kept(key)
        if outcome is None:
            with self._compiling:
                outcome = self._kept(key)  # a request with the same constraint compiled it meanwhile
                if outcome is None:
                    outcome = self._compile(constraint, tokenizer, seconds)
                    with self._lock:
                        self.stats["compiled"] += 1
                        self.cache[key] = outcome
                        while len(self.cache) > self.size:
                            self.cache.popitem(last=False)
        if isinstance(outcome, OptionError):
            raise outcome
        return outcome

    def _kept(self, key: tuple) -> TokenAutomaton | OptionError | None:
        with self._lock:
            found = self.cache.get(key)
            if found is not None:
                self.cache.move_to_end(key)
                self.stats["reused"] += 1
            return found

    def _compile(self, constraint: Constraint, tokenizer, seconds: float) -> TokenAutomaton | OptionError:
        """One compile in the worker: its automaton or the OptionError that refuses it."""
        kind = constraint.kind
        try:
            worker = self._worker or self._start()
            fingerprint = tokenizer.fingerprint
            _send(worker.stdin, (fingerprint, None if fingerprint in self._known else tokenizer, constraint))
            self._known.add(fingerprint)
            return self._reader.submit(pickle.load, worker.stdout).result(timeout=seconds)
        except FutureTimeout:
            self.close()
            with self._lock:
                self.stats["timed_out"] += 1
            return OptionError(kind, "{%s} takes more than {_s:g} s to compile for this model's tokenizer (the server's "
                                     "compile_seconds limit): its automaton is too large; constrain the text more narrowly" % kind,
                               _s=seconds)
        except (EOFError, OSError, pickle.UnpicklingError):  # the worker died (a crash in outlines-core, out of memory, ...)
            worker = self._worker
            self.close()
            return OptionError(kind, "{%s} cannot be compiled: the compiler stopped (exit code {_code})" % kind,
                               _code=None if worker is None else worker.returncode)

    def _start(self) -> subprocess.Popen:
        """A new worker, once it has started."""
        root = str(Path(__file__).resolve().parents[2])  # the folder holding the unmask package
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}  # one core: the server's threads decode beside it
        worker = subprocess.Popen([sys.executable, "-m", "unmask.serve.compiler"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._worker, self._known = worker, set()
        if pickle.load(worker.stdout) != "ready":
            raise EOFError("the compiler did not start")
        return worker

    def close(self) -> None:
        """End the worker (a later compile starts a new one)."""
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.kill()
            worker.wait()
            worker.stdin.close()
            worker.stdout.close()


COMPILER = ConstraintCompiler()
"""The compiler of this process's engines."""


def _send(stream, value) -> None:
    pickle.dump(value, stream)
    stream.flush()


def serve_compiles(inp, out) -> None:
    """The worker: says ``"ready"``, then answers every (tokenizer fingerprint, tokenizer or None
    when sent before, constraint) it reads with the constraint's automaton or the OptionError that
    refuses it (naming the constraint's kind)."""
    from unmask.constraints import compile_constraint

    tokenizers = {}
    _send(out, "ready")
    while True:
        try:
            fingerprint, tokenizer, constraint = pickle.load(inp)
        except EOFError:  # the server went away
            return
        tokenizer = tokenizers.setdefault(fingerprint, tokenizer)
        try:
            outcome = compile_constraint(constraint, tokenizer)
        except OptionError as exc:
            outcome = exc
        except Exception as exc:  # noqa: BLE001  (a library error is the pattern's, never the server's)
            outcome = OptionError(constraint.kind, "{%s} cannot be compiled: {_why}" % constraint.kind, _why=f"{type(exc).__name__}: {exc}")
        _send(out, outcome)


if __name__ == "__main__":
    # the answers go to the pipe the server reads; anything printed meanwhile goes to stderr
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve_compiles(sys.stdin.buffer, answers)
