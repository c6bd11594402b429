"""The package's layering (docs/design.md): every import points down the stack, experiments
share code only through their common modules, and no public name hides a submodule."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import types
from pathlib import Path

import pytest

import nearest_etf

PACKAGE = Path(nearest_etf.__file__).parent
# Rank of each layer: a module may import only from layers of its own rank or below.
LAYERS = {"core": 0, "declarative": 0, "nn": 1, "metrics": 2, "experiments": 3}
# Shared building blocks of the experiments, importable by every experiment.
SHARED = {"_common", "data", "models", "layer_stack"}


def _modules() -> list[str]:
    names = ["nearest_etf"]
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="nearest_etf."):
        names.append(info.name)
    return names


def _path(module: str) -> Path:
    parts = module.split(".")[1:]
    folder = PACKAGE.joinpath(*parts)
    return folder / "__init__.py" if folder.is_dir() else folder.with_suffix(".py")


def _imports(module: str) -> set[str]:
    tree = ast.parse(_path(module).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("nearest_etf.")}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "core"


@pytest.mark.parametrize("module", _modules())
def test_imports_point_down_the_layers(module: str) -> None:
    if module == "nearest_etf.__main__":  # the command-line entry point
        return
    # the top-level package re-exports the library layers, never the experiments
    rank = LAYERS["metrics"] if module == "nearest_etf" else LAYERS[_layer(module)]
    upward = sorted(name for name in _imports(module) if LAYERS[_layer(name)] > rank)
    assert not upward, f"{module} imports from a higher layer: {upward}"


@pytest.mark.parametrize(
    "module", [m for m in _modules() if m.startswith("nearest_etf.experiments.")]
)
def test_experiments_share_code_only_through_common_modules(module: str) -> None:
    own = module.split(".")[2]
    if own in SHARED or own == "cli":  # the shared blocks, and the entry point that lists all
        return
    others = sorted(
        name
        for name in _imports(module)
        if name.startswith("nearest_etf.experiments.") and name.split(".")[2] not in SHARED | {own}
    )
    assert not others, f"{module} imports another experiment: {others}"


@pytest.mark.parametrize(
    "package",
    [m for m in _modules() if _path(m).name == "__init__.py"],
)
def test_no_public_name_shadows_a_submodule(package: str) -> None:
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name == "__main__":  # runs the command line when imported
            continue
        importlib.import_module(f"{package}.{info.name}")
        assert isinstance(getattr(pkg, info.name), types.ModuleType), (
            f"{package}.{info.name} is rebound to a non-module, so "
            f"`import {package}.{info.name} as m` would not return the module"
        )


def test_moved_names_still_import_with_a_warning() -> None:
    from nearest_etf.experiments.layer_stack import LayerStack

    with pytest.warns(DeprecationWarning, match="moved to nearest_etf.experiments"):
        assert nearest_etf.LayerStack is LayerStack
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = nearest_etf.nope
