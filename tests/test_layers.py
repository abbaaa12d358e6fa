"""The package's layers import only downward, and only the fleet imports the fleet's stack.

    errors -> domain -> ports -> core -> stores -> fleet -> cli      (testing: anything)

(``demo``, the example application, sits beside the fleet: it uses the stores and the
registry, and the CLI's ``demo`` command uses it. ``eventsourcing``, the adapter for
pyeventsourcing applications, sits beside it too: it uses the stores' tables and
migrations, and the fleet and the CLI may use it.)

Read from the source (every ``import`` statement, also those inside functions), so a
lazy import cannot hide an upward dependency. docs/architecture.md draws the same map.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import eskit_tasks

PACKAGE = Path(eskit_tasks.__file__).parent

#: Each layer and the layers (of this package) it may import. The top-level modules
#: (``__init__``, ``tasks``, ``demo``, ``__main__``) are entry points and may import any.
LAYERS: dict[str, set[str]] = {
    "errors": set(),
    "domain": {"errors"},
    "ports": {"errors", "domain"},
    "core": {"errors", "domain", "ports"},
    "stores": {"errors", "domain", "ports"},
    "fleet": {"errors", "domain", "ports", "core", "stores"},
    "demo": {"errors", "domain", "ports", "core", "stores"},
    "eventsourcing": {"errors", "domain", "ports", "core", "stores"},
    "cli": {"errors", "domain", "ports", "core", "stores", "fleet", "demo", "eventsourcing"},
    "testing": {"errors", "domain", "ports", "core", "stores", "fleet", "eventsourcing"},
}
#: Modules that only gather names or start a process; nothing inside may import them.
ENTRY_POINTS = {"__init__", "__main__", "tasks", "_moved"}

#: Third-party packages a layer must not import: the pure layers stay free of I/O
#: libraries, and celery/redis/kombu belong to the fleet alone.
FLEET_STACK = {"celery", "kombu", "redis"}
FORBIDDEN: dict[str, set[str]] = {
    "errors": FLEET_STACK | {"sqlalchemy", "psycopg", "pydantic"},
    "domain": FLEET_STACK | {"sqlalchemy", "psycopg"},
    "ports": FLEET_STACK | {"sqlalchemy", "psycopg"},
    "core": FLEET_STACK | {"sqlalchemy", "psycopg"},
    "stores": FLEET_STACK,
    "eventsourcing": FLEET_STACK,
    "cli": FLEET_STACK,
}


def _layer_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0]


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports."""
    module = ".".join(("eskit_tasks", *path.relative_to(PACKAGE).with_suffix("").parts))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join([*base, *([node.module] if node.module else [])]))
            elif node.module == "eskit_tasks":  # from eskit_tasks import demo
                found.update(f"eskit_tasks.{alias.name}" for alias in node.names)
            elif node.module:
                found.add(node.module)
    return found


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_only_downward(path: Path):
    layer = _layer_of(path)
    if layer in ENTRY_POINTS:
        return
    allowed = LAYERS[layer] | {layer}
    wrong = []
    for name in sorted(_imports(path)):
        top, _, rest = name.partition(".")
        if top == "eskit_tasks":
            target = rest.partition(".")[0]
            if not target or target in ENTRY_POINTS:
                wrong.append(f"{name} (an entry point; import from its layer instead)")
            elif target not in allowed:
                wrong.append(f"{name} (layer {target!r} is not below {layer!r})")
        elif top in FORBIDDEN.get(layer, set()):
            wrong.append(f"{name} (the {layer!r} layer must not depend on {top})")
    assert not wrong, f"{path.relative_to(PACKAGE)} imports: " + "; ".join(wrong)


def test_every_layer_is_known():
    """A new subpackage has to be placed in the map (here and in docs/architecture.md)."""
    layers = {_layer_of(p) for p in _modules()} - ENTRY_POINTS
    assert layers == set(LAYERS)
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    for layer in layers:
        assert f"{layer}/" in text or f"{layer}.py" in text, layer


def test_the_library_runs_without_importing_the_fleet():
    """``import eskit_tasks`` and a compaction on the memory stores load no Celery,
    kombu, Redis or prometheus-client: a library user pays only for what they use."""
    script = textwrap.dedent(
        """
        import sys
        import eskit_tasks as ek
        from eskit_tasks.stores.memory import InMemoryEventStore, InMemorySnapshotStore

        class Counter:
            def initial_state(self):
                return 0
            def evolve(self, state, event):
                return state + event.data["n"]
            def decide(self, command, state):
                return []

        store = InMemoryEventStore()
        snaps = InMemorySnapshotStore(store.engine)
        store.append("c", "1", [ek.NewEvent("Added", {"n": n}) for n in range(10)],
                     expected_version=0)
        result = ek.Compactor(store=store, snapshot_store=snaps, decider=Counter(),
                              state_type=int).compact("c", "1")
        assert result.outcome is ek.Outcome.COMPACTED, result
        assert ek.load_state(store, snaps, Counter(), int, "c", "1") == (45, 10)
        loaded = sorted(m for m in ("celery", "kombu", "redis", "prometheus_client")
                        if m in sys.modules)
        print(",".join(loaded) or "none")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "none"


@pytest.mark.slow  # five fresh interpreters: not in make test-fast
def test_two_threads_can_import_the_fleet_at_once():
    """A process whose threads first use the fleet at the same moment (the soak's
    fan-out and run-tracking threads) must not see Celery half imported. Each try is a
    fresh interpreter; without the guard most tries fail."""
    script = textwrap.dedent(
        """
        import threading
        errors = []
        def use(module):
            try:
                __import__(module)
            except Exception as exc:
                errors.append(repr(exc))
        threads = [threading.Thread(target=use, args=(m,))
                   for m in ("eskit_tasks.fleet.app", "eskit_tasks.fleet.runs")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(errors or "ok")
        """
    )
    for _ in range(5):
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.stdout.strip() == "ok", done.stdout + done.stderr
