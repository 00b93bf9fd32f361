"""MkDocs hook: pages generated from the code, so they cannot drift from it.

docs/config.md's `<!-- config-reference -->` becomes the table mmfast.config.reference_markdown
builds from the config dataclasses. mmfast/config.py is loaded from its file, so building the
docs needs neither the native extension nor torch.
"""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- config-reference -->"


def _config_module():
    name = "mmfast_config_for_docs"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "mmfast" / "config.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # (dataclasses look their module up while the file runs)
        spec.loader.exec_module(module)
    return sys.modules[name]


def on_page_markdown(markdown, page, config, files):
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, _config_module().reference_markdown())
    return markdown
