"""The package's folders are the stages of the stream, and a module imports only from its own stage or an
earlier one (../shared/design.md, "Layout"). The order is written here once; the check reads every import
statement of the package, function-level ones included, without importing anything."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "modelopt_streaming"

# Earliest first. A module of stage k may import stages 0..k. The foundation (errors, faults, version) is
# importable from everywhere; the CLI and the package's public surface sit on top.
STAGES: tuple[tuple[str, ...], ...] = (
    ("errors", "faults", "version"),
    ("formats",),
    ("source",),
    ("consumers",),
    ("plan",),
    ("codec",),
    ("engine",),
    ("sink",),
    ("validate",),
    ("jobs",),
    ("cli", "__main__", "__init__"),
)
STAGE_OF = {name: rank for rank, names in enumerate(STAGES) for name in names}


def _module_name(path: Path, root: Path) -> list[str]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imported(tree: ast.AST, module: list[str], is_package: bool, package: str) -> list[tuple[int, list[str]]]:
    """(line, dotted path inside the package) of every import of the package in ``tree``."""
    here = module if is_package else module[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == package:
                target = node.module.split(".")[1:]
            else:
                continue
            if target:
                found.append((node.lineno, target))
            else:  # ``from package import a, b``: each name is a module or a name of the top package
                found += [(node.lineno, [alias.name]) for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == package:
                    found.append((node.lineno, parts[1:] or ["__init__"]))
    return found


def layering_violations(root: Path) -> list[str]:
    """Every import in the package at ``root`` that points to a later stage, or into a folder that has no
    stage, as ``file:line: importer (stage) imports target (stage)``."""
    package = root.name
    out = []
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        stage = STAGE_OF.get(module[0] if module else "__init__")
        if stage is None:
            out.append(f"{path.relative_to(root)}: {module[0]} is in no stage of the layout")
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for line, target in _imported(tree, module, path.name == "__init__.py", package):
            target_stage = STAGE_OF.get(target[0])
            if target_stage is None:
                if target[0] == "__version__":
                    target_stage = STAGE_OF["__init__"]
                else:
                    out.append(f"{path.relative_to(root)}:{line}: imports {'.'.join(target)}, in no stage")
                    continue
            if target_stage > stage:
                out.append(
                    f"{path.relative_to(root)}:{line}: {'.'.join(module) or package} (stage {stage}) imports "
                    f"{'.'.join(target)} (stage {target_stage}), a later stage"
                )
    return out


def test_modules_import_only_earlier_stages():
    assert layering_violations(PACKAGE) == []


def test_every_top_level_entry_has_a_stage():
    entries = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or p.is_dir()}
    entries -= {"__pycache__"}
    assert sorted(e for e in entries if e not in STAGE_OF) == []


@pytest.mark.parametrize(
    "importer, statement",
    [
        ("source/reader.py", "from ..jobs.quantize import quantize\n"),
        ("source/reader.py", "def f():\n    from modelopt_streaming.sink import writer\n"),
        ("codec/nvfp4.py", "import modelopt_streaming.validate.checks\n"),
        ("plan/build.py", "from modelopt_streaming import cli\n"),
        ("formats/nvfp4.py", "from modelopt_streaming import __version__\n"),
    ],
)
def test_a_back_import_is_caught(tmp_path, importer, statement):
    """The check itself, on a copy of the package with one deliberate back-import added."""
    root = tmp_path / PACKAGE.name
    for path in PACKAGE.rglob("*.py"):
        dest = root / path.relative_to(PACKAGE)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    before = layering_violations(root)
    with open(root / importer, "a", encoding="utf-8") as f:
        f.write("\n" + statement)
    after = layering_violations(root)
    assert len(after) == len(before) + 1
    assert importer in next(v for v in after if v not in before)


def test_every_module_imports():
    """A moved name is caught here, not by the first test that happens to reach the module."""
    import importlib
    import pkgutil

    import modelopt_streaming

    for info in pkgutil.walk_packages(modelopt_streaming.__path__, "modelopt_streaming."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
