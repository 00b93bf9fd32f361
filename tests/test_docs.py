"""The documentation: every ```python block of README.md and docs/ runs (alone, in a fresh
namespace, in an empty working directory), unless the line before its fence is
`<!-- example: skip -->`; the pages carry no history (dates, relative time words: those belong
in git and in bench/results/); the configuration reference covers every key. (`make test`
also builds the site with `mkdocs build --strict`: broken links and references fail.)"""
import re
from pathlib import Path

import pytest

import mmfast.methods
from mmfast.methods import registry

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SKIP = "<!-- example: skip -->"
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def examples():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            if before.strip() == SKIP:
                continue
            line = text.count("\n", 0, match.start()) + 1
            yield pytest.param(match.group(1), id=f"{page.relative_to(ROOT)}:{line}")


@pytest.mark.parametrize("code", list(examples()))
def test_code_examples_run(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    methods, names = dict(registry.METHODS), registry.NAMES  # (an example may register a method)
    try:
        exec(compile(code, "<docs example>", "exec"), {"__name__": "__docs_example__"})
    finally:
        registry.METHODS.clear()
        registry.METHODS.update(methods)
        registry.NAMES = mmfast.methods.NAMES = names


def test_there_are_examples_to_run():
    pages = {p.id.split(":")[0] for p in examples()}
    assert {"README.md", "docs/architecture.md", "docs/balancer.md"} <= pages, pages


HISTORY = re.compile(r"\b20\d\d-\d\d-\d\d\b|\b(this session|last session|previous session|yesterday|today|"
                     r"until recently|as of now|for now)\b", re.I)


def test_pages_carry_no_history():
    found = []
    for page in PAGES:
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
            match = HISTORY.search(line)
            if match and "bench/results/" not in line:  # (results files are named by their date)
                found.append(f"{page.relative_to(ROOT)}:{number}: {match.group(0)!r} in {line.strip()[:100]}")
    assert not found, "\n".join(found)


def test_the_configuration_reference_names_every_key():
    from mmfast.config import Config, reference_markdown

    table = reference_markdown()
    flat = []

    def walk(section, prefix):
        for key, value in section.items():
            if isinstance(value, dict) and key in ("data", "model", "optim"):
                walk(value, f"{prefix}{key}.")
            else:
                flat.append(prefix + key)

    walk(Config().to_dict(), "")
    for key in flat:
        assert f"| `{key}` |" in table, key
    assert "<!-- config-reference -->" in (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
