"""MkDocs hook: pages generated from the code, so they cannot drift from it.

docs/config.md's `<!-- config-reference -->` becomes the table mmfast.config.reference_markdown
builds from the config dataclasses (building the site imports mmfast: `make docs` builds it first).
"""
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- config-reference -->"


def _config_module():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("mmfast.config")


def on_page_markdown(markdown, page, config, files):
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, _config_module().reference_markdown())
    return markdown
