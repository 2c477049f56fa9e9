"""The documentation site builds strictly, and the docstrings cite sections of it that exist.

`mkdocs build --strict` fails on any warning: a broken link or anchor between pages, a page left
out of the navigation, a results file the benchmarks page names but the repository lacks, an API
object mkdocstrings cannot find. Nothing in the build needs the network (no web fonts, no social
cards, no remote inventories), so it runs offline like the rest of the suite.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALGORITHMS = ROOT / "docs" / "algorithms.md"


def test_site_builds_strictly(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason=f"building the docs needs {module}: pip install -e '.[docs]' (also in [dev])")
    env = os.environ | {"NO_MKDOCS_2_WARNING": "1"}  # Material's notice about MkDocs 2 is not a build problem
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    assert (tmp_path / "site" / "benchmarks" / "results" / "block_diffusion.png").is_file()  # the results plots came along
    benchmarks = (tmp_path / "site" / "benchmarks" / "index.html").read_text(encoding="utf-8")
    assert "mdm lr=0.002" in benchmarks  # a table included from benchmarks/results/ at build time


def test_docstrings_cite_algorithms_sections_that_exist():
    headings = set(re.findall(r"^## (.+)$", ALGORITHMS.read_text(encoding="utf-8"), flags=re.MULTILINE))
    cited, stale = {}, []
    for path in sorted((ROOT / "src").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"docs/algorithms\.md,((?:\s*(?:and\s+)?'[^']+',?)+)", text):
            for name in re.findall(r"'([^']+)'", match.group(1)):
                cited.setdefault(name, []).append(path.relative_to(ROOT).as_posix())
        if re.search(r"reference section \d", text, flags=re.IGNORECASE):
            stale.append(path.relative_to(ROOT).as_posix())
    missing = {name: files for name, files in cited.items() if name not in headings}
    assert not missing, f"docstrings cite sections docs/algorithms.md does not have: {missing}; its sections: {sorted(headings)}"
    assert not stale, f"cite docs/algorithms.md sections by name, not 'reference section N': {stale}"
    assert cited, "no docstring cites docs/algorithms.md"
