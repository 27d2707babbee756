"""The package's floor plan (DESIGN.md): light entry points, no import cycles, small modules, old runs still load."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gridinr_nerfstudio"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
HEAVY = ("open_clip", "lpips", "matplotlib")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def module_level_imports(path: Path, known: set[str], for_types_too: bool = False) -> set[str]:
    """Package modules imported when `path` is imported (module level, outside `if TYPE_CHECKING:` unless
    `for_types_too`)."""
    found: set[str] = set()

    def visit(nodes) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) and not for_types_too:
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name in known)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gridinr_nerfstudio"):
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    found.add(submodule if submodule in known else node.module)

    visit(ast.parse(path.read_text()).body)
    return found


def test_entry_point_modules_import_nothing_heavy():
    """nerfstudio imports every method entry point at the start of any ns-* command: ours import no CLIP, LPIPS
    or matplotlib themselves (nerfstudio's own dataparser registry imports matplotlib; that is not ours)."""
    script = f"""
import builtins, sys, traceback
heavy = {HEAVY!r}
original = builtins.__import__
def guarded(name, globals=None, *args, **kwargs):
    importer = (globals or {{}}).get("__name__", "")
    if name.split(".")[0] in heavy and importer.startswith("gridinr_nerfstudio"):
        raise AssertionError(f"{{importer}} imports {{name}} at import time")
    return original(name, globals, *args, **kwargs)
builtins.__import__ = guarded
import gridinr_nerfstudio.gridinr_config
import gridinr_nerfstudio.data.dataparser
print(sorted(m for m in ("open_clip", "lpips") if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("for_types_too", [False, True], ids=["imports", "imports-for-types-too"])
def test_no_import_cycles(for_types_too):
    """No cycle, also none hidden behind `if TYPE_CHECKING:` (two modules that need each other's types share a
    home for them instead, e.g. rendering/field_functions.py)."""
    known = modules()
    graph = {name: module_level_imports(path, set(known), for_types_too) - {name} for name, path in known.items()}
    # A package's __init__ runs before its submodules: importing a.b imports a.
    for name in list(graph):
        parent = name.rpartition(".")[0]
        if parent in graph:
            graph[name].add(parent)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert "gridinr_nerfstudio.stages.base_model" in graph  # the walk saw the package


def test_test_fixtures_are_defined_once():
    """A fixture that several test modules use is defined once, in tests/conftest.py, not copied into each."""
    defined: dict[str, list[str]] = {}
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any("fixture" in ast.unparse(d) for d in node.decorator_list):
                defined.setdefault(node.name, []).append(path.name)
    assert {name: files for name, files in defined.items() if len(files) > 1} == {}


def test_no_module_over_600_lines():
    long = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {name: lines for name, lines in long.items() if lines > 600} == {}


def test_run_written_by_the_old_flat_layout_still_loads(tmp_path):
    """config.yml + checkpoint written by release 0.1 (flat package, GridINRFit* names) load into today's classes
    and evaluate to the volume PSNR measured when they were written."""
    from gridinr_nerfstudio.runs import load_run_pipeline
    from gridinr_nerfstudio.stages.fit.model import FitModel

    run = shutil.copytree(FIXTURES / "old_layout_fit", tmp_path / "old-run")
    expected = json.loads((run / "expected.json").read_text())

    def local_cache(config):
        config.pipeline.datamanager.dataparser.cache_dir = tmp_path / "references"
        return config

    config, pipeline, checkpoint, step = load_run_pipeline(run / "config.yml", update_config=local_cache)
    assert isinstance(pipeline.model, FitModel)
    assert checkpoint.parent == run / "nerfstudio_models" and step == expected["step"]
    assert pipeline.model.volume_psnr() == pytest.approx(expected["volume_psnr"], abs=1e-3)


LAYERS = {
    "data.volume_io": 0, "data.readers": 0, "data.default_volume": 0, "data.orbit_cameras": 0, "data.file_digest": 0,
    "data.timesteps": 0, "data.camera_distributions": 0, "safe_write": 0,
    "fields": 1, "transfer": 1, "device_defaults": 1, "distributed": 1, "helper_modules": 1,
    "thread_policy": 1,
    "rendering": 2,
    "data.dataparser": 3, "eval": 3, "runs": 3,
    "stages": 4, "trainer": 4, "export": 4,
    "gridinr_config": 5, "scripts": 5,
}
"""DESIGN.md's layers: a module imports only from its own level or lower ones."""


def layer(module: str) -> int | None:
    short = module.removeprefix("gridinr_nerfstudio").lstrip(".")
    matches = [prefix for prefix in LAYERS if short == prefix or short.startswith(prefix + ".")]
    return LAYERS[max(matches, key=len)] if matches else None


def test_layers_import_only_downwards():
    wrong = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):  # function-level imports count too
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gridinr_nerfstudio."):
                if layer(name) is not None and layer(node.module) is not None and layer(node.module) > layer(name):
                    wrong.append(f"{name} (level {layer(name)}) imports {node.module} (level {layer(node.module)})")
    assert wrong == []
    unplaced = [name for name, path in modules().items() if path.name != "__init__.py" and layer(name) is None]
    assert unplaced == []  # every module sits in a layer


def test_design_module_table_matches_the_tree():
    design = (PACKAGE.parent / "DESIGN.md").read_text()
    listed = set()
    for line in design.splitlines():
        cell = line.split("|")[1] if line.startswith("| `") else ""
        if cell.strip().endswith((".py`", ".cpp`", ".h`")):
            listed.add(cell.strip().strip("`"))
    files = {str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*") if path.suffix in (".py", ".cpp", ".h")
             and path.name != "__init__.py"}
    assert listed == files
