"""Every Python example of the manual (README.md and docs/*.md) runs as written, so the
manual cannot drift from the code.

* ```python blocks run as scripts in a scratch directory. The reader's own application
  (``myapp``) is a small stand-in package written there and put on ``sys.path``; a block
  headed ``# myapp/<module>.py`` becomes that module of the stand-in and is imported.
* ```pycon blocks run under doctest.
* Blocks that need a running fleet (``compact_all``, ``CompactionRun``, a task's
  ``.delay``) run in tests/fleet/test_docs_fleet.py, against real redis-servers, a
  PostgreSQL database and a real worker.

EXAMPLES below lists every page's blocks and who runs each, so a new block fails
``test_every_example_is_accounted_for`` until it is listed (and therefore run).
"""

from __future__ import annotations

import doctest
import importlib
import io
import os
import re
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from eskit_tasks import SqlEventStore, register_decider
from eskit_tasks.core.registry import (
    get_registration,
    get_source,
    registered_sources,
    registered_types,
    unregister_decider,
    unregister_source,
)

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

#: Who runs each example, page by page, in order: "script" (a ```python block run as a
#: script), "module" (a ```python block headed ``# myapp/<module>.py``, imported as that
#: module), "doctest" (a ```pycon block) — all here — and "fleet" (either kind, run by
#: tests/fleet/test_docs_fleet.py).
EXAMPLES: dict[str, list[str]] = {
    "README.md": ["script", "fleet"],
    "architecture.md": ["script"],
    "cli.md": [],
    "consumers.md": ["script", "script"],
    "eventsourcing.md": ["script", "module"],
    "fleet.md": ["module", "fleet"],
    "library.md": ["script", "module"],
    "operations.md": [],
    "performance.md": [],
    "reliability.md": [],
    "snapshots.md": ["script", "script"],
    "trash-bin.md": ["script", "script"],
    "upgrading.md": ["module"],
}

#: What makes an example need a running fleet.
_FLEET = re.compile(r"\bcompact_all\b|\bCompactionRun\b|\.delay\(|\.apply_async\(|\bfan_out\b")
_MODULE_HEADER = re.compile(r"#\s*(myapp/[\w/]+)\.py\b")

#: The reader's application, as the examples import it: ``myapp.accounts`` holds the
#: account decider and its state (version 2 added ``deposits``; ``upcast_account_v1``
#: upgrades a version-1 snapshot).
MYAPP = {
    "__init__.py": '"""A stand-in for the reader\'s application (the manual\'s examples)."""\n',
    "accounts.py": """\
from pydantic import BaseModel

from eskit_tasks import NewEvent, RecordedEvent


class AccountState(BaseModel):
    balance: int = 0
    deposits: int = 0  # new in state version 2


def upcast_account_v1(old: dict) -> dict:
    return {**old, "deposits": 0}


class Account:
    def initial_state(self) -> AccountState:
        return AccountState()

    def evolve(self, state: AccountState, event: RecordedEvent) -> AccountState:
        return AccountState(
            balance=state.balance + event.data["amount"], deposits=state.deposits + 1
        )

    def decide(self, command: int, state: AccountState) -> list[NewEvent]:
        return [NewEvent("Deposited", {"amount": command})]
""",
    "bank.py": """from eventsourcing.application import Application
from eventsourcing.system import ProcessApplication


class Bank(Application):
    is_snapshotting_enabled = True


class Audit(ProcessApplication):
    def policy(self, domain_event, processing_event):
        pass
""",
}


@dataclass(frozen=True)
class Fence:
    """One fenced block of a page: its info string, text and first line number."""

    page: Path
    lang: str
    source: str
    lineno: int


@dataclass(frozen=True)
class Example:
    """A ```python or ```pycon block, its place on its page and who runs it."""

    page: Path
    index: int  # 1-based, among the page's examples
    lang: str
    source: str
    lineno: int  # the block's first line (after the fence) on its page

    @property
    def id(self) -> str:
        return f"{self.page.name}-{self.index}"

    @property
    def runner(self) -> str:
        if _FLEET.search(self.source):
            return "fleet"
        if self.lang == "pycon":
            return "doctest"
        return "module" if self.module_path else "script"

    @property
    def module_path(self) -> str | None:
        """``myapp/compaction`` for a block whose first line is ``# myapp/compaction.py``."""
        first = self.source.lstrip().splitlines()[0] if self.source.strip() else ""
        found = _MODULE_HEADER.match(first)
        return found.group(1) if found else None


def fences(page: Path) -> list[Fence]:
    found: list[Fence] = []
    lines = page.read_text().splitlines(keepends=True)
    i = 0
    while i < len(lines):
        opening = re.match(r"(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not opening:
            i += 1
            continue
        marker, lang = opening.group(1), opening.group(2)
        end = i + 1
        while end < len(lines) and lines[end].strip() != marker:
            end += 1
        found.append(Fence(page, lang, "".join(lines[i + 1 : end]), i + 2))
        i = end + 1
    return found


def examples(page: Path) -> list[Example]:
    blocks = [f for f in fences(page) if f.lang in ("python", "pycon")]
    return [Example(page, n, f.lang, f.source, f.lineno) for n, f in enumerate(blocks, 1)]


def all_examples() -> list[Example]:
    return [e for page in PAGES for e in examples(page)]


def python_blocks(page: Path = README) -> list[str]:
    """A page's ```python examples that run here."""
    return [e.source for e in examples(page) if e.lang == "python" and e.runner != "fleet"]


def run_pycon(example: Example, globs: dict[str, object] | None = None) -> None:
    """Run a ```pycon block under doctest; fail with doctest's report."""
    parser = doctest.DocTestParser()
    test = parser.get_doctest(
        example.source, globs or {}, example.id, str(example.page), example.lineno - 1
    )
    assert test.examples, f"{example.id} has no >>> prompt"
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    report = io.StringIO()
    outcome = runner.run(test, out=report.write, clear_globs=False)
    assert outcome.failed == 0, report.getvalue()


def run_example(example: Example, where: Path) -> None:
    """Run a local example (not "fleet") with the stand-in ``myapp`` importable from ``where``."""
    if example.runner == "doctest":
        run_pycon(example, {"__name__": example.id})
    elif example.runner == "module":
        assert example.module_path is not None
        path = where / f"{example.module_path}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(example.source)
        importlib.invalidate_caches()
        importlib.import_module(example.module_path.replace("/", "."))
    else:
        # The script runs as a module of its own, importable while it runs: the
        # eventsourcing library imports the module of each aggregate class it defines.
        module = types.ModuleType(example.id.replace(".", "_"))
        source = "\n" * (example.lineno - 1) + example.source  # tracebacks name page lines
        code = compile(source, str(example.page), "exec", dont_inherit=True)
        sys.modules[module.__name__] = module
        try:
            exec(code, module.__dict__)  # noqa: S102 -- our own manual
        finally:
            del sys.modules[module.__name__]


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A working directory holding the stand-in ``myapp``; registrations and imported
    ``myapp`` modules are undone afterwards."""
    package = tmp_path / "myapp"
    package.mkdir()
    for name, text in MYAPP.items():
        (package / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    registered = {t: get_registration(t) for t in registered_types()}
    try:
        yield tmp_path
    finally:
        for name in [m for m in sys.modules if m == "myapp" or m.startswith("myapp.")]:
            del sys.modules[name]
        for stream_type in registered_types():
            unregister_decider(stream_type)
        for stream_type, r in registered.items():
            register_decider(
                stream_type,
                r.decider,
                r.state_type,
                state_version=r.state_version,
                upcasters=r.upcasters,
            )


def _local(page_filter) -> list[Example]:
    return [e for e in all_examples() if page_filter(e.page) and e.runner != "fleet"]


def test_readme_has_a_python_example():
    assert python_blocks()


@pytest.mark.parametrize("example", _local(lambda p: p == README), ids=lambda e: e.id)
def test_readme_example_runs(example: Example, scratch: Path):
    run_example(example, scratch)
    if example.lang == "python":
        assert os.path.exists(scratch / "bank.db")


def test_readme_library_example_runs_again_in_the_same_directory(scratch: Path):
    """Issue 14, case 12: a reader who runs "Using the library" twice gets no
    ConcurrencyError; the second run appends to bank.db and compacts again."""
    [example] = [e for e in _local(lambda p: p == README) if "Compactor(" in e.source]
    run_example(example, scratch)
    run_example(example, scratch)
    store = SqlEventStore.from_url(f"sqlite:///{scratch / 'bank.db'}")
    try:
        assert store.head_version("account", "a-1") == 200
        assert [e.version for e in store.read("account", "a-1")] == list(range(191, 201))
    finally:
        store.engine.dispose()


@pytest.mark.parametrize("example", _local(lambda p: p != README), ids=lambda e: e.id)
def test_docs_example_runs(example: Example, scratch: Path):
    before = {t: get_registration(t) for t in registered_types()}
    sources = {t: get_source(t) for t in registered_sources()}
    run_example(example, scratch)
    if example.runner == "module":
        after = {t: get_registration(t) for t in registered_types()}
        added = {t: get_source(t) for t in registered_sources()}
        for stream_type in set(added) - set(sources):
            unregister_source(stream_type)
        assert any(before.get(t) is not r for t, r in after.items()) or any(
            sources.get(t) is not r for t, r in added.items()
        ), f"{example.id} registers no decider and no application"


def test_docs_have_examples():
    assert any(python_blocks(page) for page in DOCS)


def test_every_example_is_accounted_for():
    found = {page.name: [e.runner for e in examples(page)] for page in PAGES}
    assert found == EXAMPLES, (
        "the manual's Python examples changed: list each page's blocks, with who runs "
        "them, in EXAMPLES (fleet blocks run in tests/fleet/test_docs_fleet.py)"
    )
    assert (ROOT / "tests" / "fleet" / "test_docs_fleet.py").exists()


def test_no_python_hides_in_another_fence():
    """Python that is not fenced as python/pycon would run nowhere."""
    for page in PAGES:
        for fence in fences(page):
            if fence.lang in ("python", "pycon"):
                continue
            where = f"{page.name} line {fence.lineno}"
            assert fence.lang not in ("py", "python3", "py3", "ipython", "doctest", "pyrepl"), (
                f"{where}: fence Python as ```python or ```pycon"
            )
            assert not re.search(r"^>>> ", fence.source, flags=re.MULTILINE), (
                f"{where}: an interactive example must be fenced as ```pycon"
            )
            assert fence.lang or not re.search(
                r"^(from \w[\w.]* import|import \w)", fence.source, flags=re.MULTILINE
            ), f"{where}: Python code must be fenced as ```python"


def test_a_wrong_pycon_output_fails():
    wrong = Example(README, 1, "pycon", ">>> 1 + 1\n3\n", 1)
    with pytest.raises(AssertionError, match="Expected"):
        run_pycon(wrong)
    run_pycon(Example(README, 1, "pycon", ">>> [1, 2] + [3]\n[1, 2, 3]\n", 1))


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (lines starting with # inside a fence are not)."""
    found, fence = set(), None
    for line in page.read_text().splitlines():
        marker = re.match(r"`{3,}|~{3,}", line)
        if fence is None and marker:
            fence = marker.group(0)
        elif fence is not None and line.strip() == fence:
            fence = None
        elif fence is None and (heading := re.match(r"#{1,6} (.+)$", line)):
            found.add(_slug(heading.group(1)))
    return found


def test_links_between_pages_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.name} links to a missing {target}"
            if anchor and linked.suffix == ".md":
                assert anchor in _anchors(linked), f"{page.name}: no heading for {target}"


def test_readme_links_every_docs_page():
    text = README.read_text()
    for page in DOCS:
        assert f"(docs/{page.name})" in text, f"the README does not link docs/{page.name}"


def test_each_docs_page_starts_with_a_title_and_a_summary():
    for page in DOCS:
        lines = page.read_text().splitlines()
        assert lines[0].startswith("# "), page.name
        summary = next(line for line in lines[1:] if line.strip())
        assert not summary.startswith(("#", "`" * 3, "|", "-", "*")), page.name


def test_readme_stays_short():
    assert len(README.read_bytes()) <= 12_000


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make check" in ci
    text = README.read_text()
    assert "make check" in text
    assert "make test-fast" in text
