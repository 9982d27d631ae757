"""Package attributes imported on first use (PEP 562), so that ``mor --help`` and argument errors never load
torch: each package's ``__init__`` names its public attributes and the modules that define them."""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


class _LazyPackage(types.ModuleType):
    _exports: dict[str, str]  # public name -> module defining it

    def __getattr__(self, name: str) -> Any:
        if name not in self._exports:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(self._exports[name]), name)
        super().__setattr__(name, value)  # later look-ups skip this method
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        # Importing a submodule binds it to the package attribute of its name, which would hide a function of
        # that name (mor.data.prepare, mor.infer.generate); the function is what the package exports.
        if not (isinstance(value, types.ModuleType) and name in self._exports
                and value.__name__ == f"{self.__name__}.{name}"):
            super().__setattr__(name, value)


def lazy_exports(package: str, modules: dict[str, tuple[str, ...]]) -> None:
    """Make ``package`` import ``modules[m]``'s names from module ``m`` when they are first used."""
    module = sys.modules[package]
    module.__class__ = _LazyPackage
    module._exports = {name: source for source, names in modules.items() for name in names}
