"""MkDocs hook: Sphinx-style roles in docstrings (``:func:`combine```, ``:class:`Sampler```) shown as
plain code in the API pages, without the role name in front (the docstrings are read as Markdown,
where a role means nothing). Registered in ``mkdocs.yml`` under ``hooks:``."""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|obj|exc):(?=<code)")


def on_page_content(html, page, config, files):
    return ROLE.sub("", html)
