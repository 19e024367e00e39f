"""Each package's public face: a sorted ``__all__`` that matches what it exports, and a
docstring on every public callable and class."""

from __future__ import annotations

import importlib
import inspect
import types
from typing import Any

import pytest

PACKAGES = ["ledger", "triggers", "triggers.testing", "triggers.workflows", "actors", "actors.http"]


def public_names(package: types.ModuleType) -> list[str]:
    """Names the package defines or re-exports, without private names and submodules."""
    return sorted(
        name
        for name in dir(package)
        if not name.startswith("_") and not isinstance(getattr(package, name), types.ModuleType)
    )


@pytest.fixture(params=PACKAGES)
def package(request: pytest.FixtureRequest) -> types.ModuleType:
    return importlib.import_module(request.param)


def isort_key(name: str) -> tuple[int, str]:
    """The order of ruff's RUF022 ("isort-style"): CONSTANTS, then Classes, then the rest,
    each group in plain (case-sensitive) order."""
    if name.isupper():
        return (0, name)
    if name[:1].isupper():
        return (1, name)
    return (2, name)


def test_all_is_sorted(package: types.ModuleType) -> None:
    """__all__ is sorted isort-style (constants, classes, functions) with no duplicates."""
    names = list(package.__all__)
    assert names == sorted(names, key=isort_key)
    assert len(names) == len(set(names))


def test_all_names_exist(package: types.ModuleType) -> None:
    """Every name in __all__ is an attribute of the package."""
    missing = [name for name in package.__all__ if not hasattr(package, name)]
    assert missing == []


def test_all_matches_the_public_names(package: types.ModuleType) -> None:
    """__all__ lists exactly the public names the package defines or re-exports."""
    assert sorted(package.__all__) == public_names(package)


def test_star_import_gives_all(package: types.ModuleType) -> None:
    """`from package import *` binds exactly the names of __all__."""
    namespace: dict[str, Any] = {}
    exec(f"from {package.__name__} import *", namespace)
    namespace.pop("__builtins__", None)
    assert sorted(namespace) == sorted(package.__all__)


def test_package_has_a_docstring(package: types.ModuleType) -> None:
    """The package itself says what it is."""
    assert package.__doc__
    assert package.__doc__.strip()


def _documentable(package: types.ModuleType) -> list[tuple[str, Any]]:
    return [
        (name, getattr(package, name))
        for name in package.__all__
        if inspect.isclass(getattr(package, name)) or inspect.isroutine(getattr(package, name))
    ]


def test_public_callables_and_classes_have_docstrings(package: types.ModuleType) -> None:
    """Each public class and function has its own docstring (not an inherited one)."""
    undocumented = [
        name
        for name, value in _documentable(package)
        if not (value.__dict__.get("__doc__") if inspect.isclass(value) else value.__doc__)
    ]
    assert undocumented == []


def test_public_methods_have_docstrings(package: types.ModuleType) -> None:
    """Public methods and properties defined by public classes have docstrings."""
    undocumented = []
    for class_name, cls in _documentable(package):
        if not inspect.isclass(cls) or issubclass(cls, BaseException):
            continue
        for attr, value in vars(cls).items():
            if attr.startswith("_"):
                continue
            func = value.fget if isinstance(value, property) else value
            if isinstance(func, staticmethod | classmethod):
                func = func.__func__
            if not inspect.isfunction(func):
                continue
            if not (func.__doc__ or "").strip():
                undocumented.append(f"{class_name}.{attr}")
    assert undocumented == []


def test_the_packages_are_distinct() -> None:
    """The public modules are separate modules (the tests above cover each of them)."""
    modules = {importlib.import_module(name) for name in PACKAGES}
    assert len(modules) == len(PACKAGES)
