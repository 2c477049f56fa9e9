"""Output folders written whole or not at all.

``unmask import`` and ``unmask export`` build their output in a hidden folder beside ``--out`` and
rename it into place at the end, so a failed or interrupted conversion leaves ``--out`` as it was.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from unmask.checkpoint import fsync_tree
from unmask.errors import OptionError


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A fresh folder beside ``out`` to write into. On success it becomes ``out`` (renamed, when
    ``out`` is absent or empty) or its entries are moved into ``out``; on failure it is removed."""
    if out.exists() and not out.is_dir():
        raise OptionError("out", "{out} {_out} is a file; choose a folder", _out=out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_tree(tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, out: Path) -> None:
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.rename(tmp, out)
        return
    for entry in sorted(tmp.iterdir()):  # into a folder that holds other files: each entry renamed
        os.replace(entry, out / entry.name)
    tmp.rmdir()
