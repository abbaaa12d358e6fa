"""The README's Python example runs as written (so the manual cannot drift from the code)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    """The README's Python examples, except those that import the reader's own
    application (``myapp``): they illustrate where user code goes."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    return [b for b in blocks if "from myapp" not in b]


def test_readme_has_a_python_example():
    assert python_blocks()


@pytest.mark.parametrize("block", python_blocks())
def test_readme_example_runs(block: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme"}
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 -- our own README
    assert os.path.exists(tmp_path / "bank.db")


def test_readme_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make check" in ci
    assert "make check" in README.read_text()
