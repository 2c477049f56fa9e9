"""The ``unmask`` command line. One module per subcommand group; each subcommand is a typed function.

    unmask demo                     train tiny MDM + AR on the embedded corpus, evaluate, sample
    unmask data prepare FILES...    tokenise your corpus into packed shards
    unmask train --run-dir RUN ...  train an MDM (default) or the AR baseline
    unmask finetune --init-from RUN --pairs P.jsonl --run-dir OUT   SFT on prompt/response pairs (MDM or AR)
    unmask distill RUN --method sdtt|dcd --out OUT   distil a run for few-step sampling (SDTT: MDM; DCD: Duo)
    unmask eval --checkpoint RUN    perplexity (MDM: ELBO bound +- SE; AR: exact)
    unmask sample --checkpoint RUN  generate text
    unmask serve --checkpoint RUN   OpenAI-compatible HTTP server and a page that animates the decoding
    unmask import HF_FOLDER --out RUN   a LLaMA/Qwen2/Mistral/LLaDA/Dream checkpoint as a run folder
    unmask export RUN --out DIR     a run as a LLaMA-layout folder (AR: loads in transformers)
    unmask presets                  list model presets with parameter counts
    unmask experiment scaling|reverse-curse|reversal|conditional|shift   SMDM's experiments, resumable, results folders

Errors of the user's making (``UnmaskError``, and usage errors such as an unknown option or a
value of the wrong type) print one ``error: ...`` line and exit with 2, a decoding parameter named by
its flag (``OptionError``); Ctrl-C prints ``aborted`` and exits with 130.
"""

from __future__ import annotations

import importlib
import sys

import typer

from unmask.cli.app import app
from unmask.cli.spelling import flag_of, invoked_flags
from unmask.errors import OptionError, UnmaskError

# registering the subcommands
from unmask.cli import data as _data  # noqa: F401,E402
from unmask.cli import demo as _demo  # noqa: F401,E402
from unmask.cli import distill as _distill  # noqa: F401,E402
from unmask.cli import evaluate as _evaluate  # noqa: F401,E402
from unmask.cli import interop as _interop  # noqa: F401,E402
from unmask.cli import experiment as _experiment  # noqa: F401,E402
from unmask.cli import finetune as _finetune  # noqa: F401,E402
from unmask.cli import sample as _sample  # noqa: F401,E402
from unmask.cli import serve as _serve  # noqa: F401,E402
from unmask.cli import train as _train  # noqa: F401,E402


# The click that typer runs on: its own copy (typer >= 0.26) or the click package (older typer);
# catching the other one's exceptions would let every usage error out as a traceback.
_click = importlib.import_module(typer.BadParameter.__module__)
ABORTED = 130  # the exit status of a command stopped by Ctrl-C


def usage_line(exc: Exception) -> str:
    """A click usage error as one line: its message and where the command's options are listed."""
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return " ".join(exc.format_message().split()) + hint


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    try:
        result = app(args=argv, prog_name="unmask", standalone_mode=False)
    except UnmaskError as exc:
        if isinstance(exc, OptionError):
            own = invoked_flags(sys.argv[1:] if argv is None else argv)
            exc = exc.spelled(lambda name: flag_of(name, own))
        typer.echo(f"error: {exc}", err=True)
        return 2
    except _click.ClickException as exc:
        if isinstance(exc, getattr(_click, "NoArgsIsHelpError", ())):  # a command group without its subcommand: its help
            exc.show()
        else:
            typer.echo(f"error: {usage_line(exc)}", err=True)
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        result = ABORTED
    if result == ABORTED:  # typer >= 0.26 turns Ctrl-C into this status without a word
        typer.echo("aborted", err=True)
    return result if isinstance(result, int) else 0


__all__ = ["app", "main"]

if __name__ == "__main__":
    sys.exit(main())
