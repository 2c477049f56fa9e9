"""The ``unmask`` command line. One module per subcommand group; each subcommand is a typed function.

    unmask demo                     train tiny MDM + AR on the embedded corpus, evaluate, sample
    unmask data prepare FILES...    tokenise your corpus into packed shards
    unmask train --run-dir RUN ...  train an MDM (default) or the AR baseline
    unmask finetune --init-from RUN --pairs P.jsonl --run-dir OUT   SFT on prompt/response pairs (MDM or AR)
    unmask eval --checkpoint RUN    perplexity (MDM: ELBO bound +- SE; AR: exact)
    unmask sample --checkpoint RUN  generate text
    unmask serve --checkpoint RUN   OpenAI-compatible HTTP server and a page that animates the decoding
    unmask import HF_FOLDER --out RUN   a LLaMA/Qwen2/Mistral/LLaDA/Dream checkpoint as a run folder
    unmask export RUN --out DIR     a run as a LLaMA-layout folder (AR: loads in transformers)
    unmask presets                  list model presets with parameter counts
    unmask experiment scaling|reverse-curse|shift   SMDM's experiments, resumable, results folders

Errors of the user's making (``UnmaskError``) print one ``error: ...`` line and exit with 2.
"""

from __future__ import annotations

import sys

import click
import typer

from unmask.cli.app import app
from unmask.errors import UnmaskError

# registering the subcommands
from unmask.cli import data as _data  # noqa: F401,E402
from unmask.cli import demo as _demo  # noqa: F401,E402
from unmask.cli import evaluate as _evaluate  # noqa: F401,E402
from unmask.cli import interop as _interop  # noqa: F401,E402
from unmask.cli import experiment as _experiment  # noqa: F401,E402
from unmask.cli import finetune as _finetune  # noqa: F401,E402
from unmask.cli import sample as _sample  # noqa: F401,E402
from unmask.cli import serve as _serve  # noqa: F401,E402
from unmask.cli import train as _train  # noqa: F401,E402


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    try:
        result = app(args=argv, prog_name="unmask", standalone_mode=False)
    except UnmaskError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    except click.ClickException as exc:  # usage errors: click's message names the option
        exc.show()
        return exc.exit_code
    except (click.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        return 130
    return result if isinstance(result, int) else 0


__all__ = ["app", "main"]

if __name__ == "__main__":
    sys.exit(main())
