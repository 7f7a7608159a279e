"""The flat, self-contained code bundle written next to every saved strata model.

Transformers loads remote code (``trust_remote_code=True``) from ONE flat folder and
resolves only ``from .module import name`` there. strata's modules live in
subpackages and import each other absolutely (``from strata.kernels.kernels_x import
y``), so on save we copy the transitive closure of those imports flat into the model
folder and rewrite each import to ``from .kernels_x import y``. Every module that a
model needs at run time has a basename unique across the package (docs/internals.md).

The bundle also works from a bundle: a model loaded from remote code re-saves with
the same files (its imports are already relative).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import sys
from pathlib import Path

_ABSOLUTE = re.compile(r"^(\s*)from\s+strata((?:\.\w+)+)\s+import\s", re.MULTILINE)


def _module_path(module_name: str) -> Path:
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    if path is None:
        spec = importlib.util.find_spec(module_name)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"cannot locate the source of module {module_name!r} for the code bundle")
        path = spec.origin
    return Path(path)


def _dependencies(source: str, path: Path) -> list[Path]:
    """Files imported by ``source``: absolute strata imports and flat relative ones."""
    deps = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if not isinstance(node, ast.ImportFrom) or node.module is None:
            continue
        if node.level == 0 and node.module.startswith("strata."):
            deps.append(_module_path(node.module))
        elif node.level == 0 and node.module == "strata":
            raise ValueError(f"{path.name}: `from strata import ...` cannot be bundled; import from the defining module")
        elif node.level == 1 and "." not in node.module:
            deps.append(path.parent / f"{node.module}.py")
        elif node.level > 0:
            raise ValueError(f"{path.name}: relative import {'.' * node.level}{node.module} cannot be bundled flat")
    return deps


def flatten_source(source: str) -> str:
    """Rewrite ``from strata.a.b import x`` to ``from .b import x``."""
    return _ABSOLUTE.sub(lambda m: f"{m.group(1)}from .{m.group(2).rsplit('.', 1)[-1]} import ", source)


def collect_bundle(module_names: list[str]) -> dict[str, str]:
    """Return {basename.py: flattened source} for the modules and all they import from strata."""
    todo = [_module_path(name) for name in module_names]
    files: dict[str, str] = {}
    origins: dict[str, Path] = {}
    while todo:
        path = todo.pop()
        name = path.name
        if name in files:
            if origins[name].resolve() != path.resolve():
                raise ValueError(f"two modules share the basename {name!r}: {origins[name]} and {path}")
            continue
        source = path.read_text(encoding="utf-8")
        files[name], origins[name] = flatten_source(source), path
        todo.extend(_dependencies(source, path))
    return files


def write_code_bundle(folder: str | os.PathLike, module_names: list[str]) -> list[str]:
    """Copy the flat bundle of ``module_names`` into ``folder``; return the written file names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = collect_bundle(module_names)
    for name, source in sorted(files.items()):
        (folder / name).write_text(source, encoding="utf-8")
    return sorted(files)
