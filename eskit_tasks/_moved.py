"""The module paths of the flat layout (before the layers), still importable for a while.

Code and Celery configs written against the old paths — an operator's
``celeryconfig.py`` doing ``from eskit_tasks.settings import get_settings``, a script
importing ``eskit_tasks.runs`` — keep working: importing an old path gives the module at
its new path (the same module object) and a DeprecationWarning naming it. Names that
left a module for another one are still imported by the module they left, so
``from eskit_tasks.registry import UnknownStreamTypeError`` works too.
docs/upgrading.md lists the moves.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

#: Old path -> new path.
MOVED = {
    "eskit_tasks.celery_app": "eskit_tasks.fleet.app",
    "eskit_tasks.settings": "eskit_tasks.fleet.settings",
    "eskit_tasks.constants": "eskit_tasks.fleet.constants",
    "eskit_tasks.locks": "eskit_tasks.fleet.locks",
    "eskit_tasks.metrics": "eskit_tasks.fleet.metrics",
    "eskit_tasks.progress": "eskit_tasks.fleet.progress",
    "eskit_tasks.runs": "eskit_tasks.fleet.runs",
    "eskit_tasks.compactor": "eskit_tasks.core.compactor",
    "eskit_tasks.loading": "eskit_tasks.core.loading",
    "eskit_tasks.registry": "eskit_tasks.core.registry",
    "eskit_tasks.verify": "eskit_tasks.core.verify",
    "eskit_tasks.codec": "eskit_tasks.domain.codec",
    "eskit_tasks.compare": "eskit_tasks.domain.compare",
    "eskit_tasks.decider": "eskit_tasks.domain.decider",
    "eskit_tasks.events": "eskit_tasks.domain.events",
    "eskit_tasks.policy": "eskit_tasks.domain.policy",
    "eskit_tasks.redact": "eskit_tasks.domain.redact",
    "eskit_tasks.result": "eskit_tasks.domain.result",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new
        self._spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} moved to {self.new}; import it from there (the old path will "
            "be removed in a later release)",
            DeprecationWarning,
            stacklevel=2,
        )
        module = importlib.import_module(self.new)
        self._spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module at the new path is already imported. The import
        system has just given it the old path's spec; it gets its own back."""
        module.__spec__ = self._spec


class MovedModules(importlib.abc.MetaPathFinder):
    """Finds the old paths of :data:`MOVED` (after every other finder has not)."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        return None if new is None else importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    """Add the finder to ``sys.meta_path`` once (``import eskit_tasks`` does)."""
    if not any(isinstance(f, MovedModules) for f in sys.meta_path):
        sys.meta_path.append(MovedModules())
