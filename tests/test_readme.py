"""The README's Python example runs as written (so the manual cannot drift from the code)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
DOCS = sorted((README.parent / "docs").glob("*.md"))


def python_blocks(page: Path = README) -> list[str]:
    """A page's Python examples, except those that import the reader's own
    application (``myapp``): they illustrate where user code goes."""
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)
    return [b for b in blocks if "from myapp" not in b]


def test_readme_has_a_python_example():
    assert python_blocks()


@pytest.mark.parametrize("block", python_blocks())
def test_readme_example_runs(block: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme"}
    exec(compile(block, str(README), "exec", dont_inherit=True), namespace)  # noqa: S102 -- our own README
    assert os.path.exists(tmp_path / "bank.db")


@pytest.mark.parametrize(
    ("page", "block"),
    [(page, block) for page in DOCS for block in python_blocks(page)],
    ids=lambda value: value.name if isinstance(value, Path) else "",
)
def test_docs_example_runs(page: Path, block: str, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "docs"}
    exec(compile(block, str(page), "exec", dont_inherit=True), namespace)  # noqa: S102 -- our own docs


def test_docs_have_examples():
    assert any(python_blocks(page) for page in DOCS)


def test_readme_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make check" in ci
    assert "make check" in README.read_text()
