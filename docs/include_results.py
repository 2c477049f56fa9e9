"""MkDocs hook: the measured results of the repository, included in the pages at build time.

The benchmark and experiment scripts write their tables to ``benchmarks/results/`` and
``experiments/results/``. A page includes one of those Markdown files with a marker line

    <!-- results: benchmarks/results/adaptation.md -->

which this hook replaces by the file as it is: headings moved below the page's own (a file's
``# Title`` becomes a level-4 heading), relative links pointed at where the hook puts the plots,
and an indented marker (inside an admonition) indents the file alike. A marker naming a missing
file fails the build. Every results Markdown file that no marker of ``benchmarks.md`` or
``experiments.md`` includes is appended to the end of that page, so a new result appears without
anyone editing the docs, and a page never shows tables older than the files. The PNG plots of
both folders are copied into the site under their repository paths, so pages at the root of
``docs/`` show them with ``![...](benchmarks/results/adaptation.png)``.

Registered in ``mkdocs.yml`` under ``hooks:``; it is excluded from the site by ``exclude_docs``.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"benchmarks.md": "benchmarks/results", "experiments.md": "experiments/results"}
MARKER = re.compile(r"^([ \t]*)<!-- results: (\S+) -->[ \t]*$", re.MULTILINE)
HEADING = re.compile(r"^(#{1,3}) ", re.MULTILINE)
FENCE = re.compile(r"^(```|~~~)", re.MULTILINE)
LINK = re.compile(r"(\]\()([^)\s]+)(\))")


def _results(folder: str, suffix: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob(f"*{suffix}") if p.is_file())


def _demote(text: str) -> str:
    """Headings outside code fences moved three levels down (# -> ####)."""
    parts = FENCE.split(text)
    out, inside = [], False
    for part in parts:
        if FENCE.fullmatch(part):
            inside = not inside
            out.append(part)
        else:
            out.append(part if inside else HEADING.sub(lambda m: "###" + m.group(1) + " ", part))
    return "".join(out)


def _relink(text: str, folder: str) -> str:
    """Relative links of a results file (``![plot](scaling.png)``) made relative to the docs root,
    where the hook mounts the results folders under their repository paths."""

    def fix(m: re.Match) -> str:
        target = m.group(2)
        if re.match(r"[a-z]+:|/|#", target):
            return m.group(0)
        return m.group(1) + (Path(folder) / target).as_posix() + m.group(3)

    return LINK.sub(fix, text)


def _include(rel: str, page: str) -> str:
    path = (ROOT / rel).resolve()
    if not path.is_file() or ROOT not in path.parents:
        raise PluginError(f"docs/{page}: '<!-- results: {rel} -->' names no file of the repository; fix the path or remove the marker")
    text = _relink(path.read_text(encoding="utf-8").strip(), Path(rel).parent.as_posix())
    return f"<!-- from {rel} -->\n\n" + _demote(text) + "\n"


def on_files(files, config):
    """Add the results plots to the site under their repository paths."""
    for folder in FOLDERS.values():
        for png in _results(folder, ".png"):
            rel = png.relative_to(ROOT).as_posix()
            files.append(File.generated(config, rel, abs_src_path=str(png)))
    return files


def on_page_markdown(markdown, page, config, files):
    """Replace the results markers of a page by the files they name; append unreferenced results."""
    name = page.file.src_uri
    named = set()

    def replace(match: re.Match) -> str:  # an indented marker (inside an admonition) indents the file alike
        indent, rel = match.groups()
        named.add(rel)
        return "\n".join(indent + line if line else line for line in _include(rel, name).splitlines())

    markdown = MARKER.sub(replace, markdown)
    folder = FOLDERS.get(name)
    if folder:
        rest = [p.relative_to(ROOT).as_posix() for p in _results(folder, ".md")]
        rest = [rel for rel in rest if rel not in named]
        if rest:
            markdown += "\n\n## Other results\n\nResult files that no section above describes yet, as the scripts wrote them.\n"
            for rel in rest:
                markdown += f"\n### `{rel}`\n\n" + _include(rel, name)
    return markdown
