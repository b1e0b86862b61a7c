"""The code a remote-code export ships: meo_ds's own math files, byte for byte, importing only torch.

modeling_meo.py takes its math from moe_functional.py and models_functional.py by relative
import; the export must hold those files next to it (transformers' loader copies a module's
relative imports from its directory), and they must be the library's files, not drifting copies.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from meo_ds.export import remote
from meo_ds.models import functional as models_functional
from meo_ds.moe import functional as moe_functional

LIBRARY_MATH = {"moe_functional.py": moe_functional, "models_functional.py": models_functional}
STDLIB = set(sys.stdlib_module_names) | {"__future__"}


def _imports(source: str) -> tuple[set[str], set[str]]:
    """(top-level absolute modules, relative module names) imported anywhere in source."""
    absolute, relative = set(), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            absolute |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                relative.add(node.module)
            else:
                absolute.add(node.module.split(".")[0])
    return absolute, relative


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shipped")
    remote.copy_code(out)
    return out


def test_export_ships_the_library_math_files_byte_for_byte(shipped: Path) -> None:
    assert {p.name for p in shipped.iterdir()} == set(remote.SHIPPED)
    for name, module in LIBRARY_MATH.items():
        assert (shipped / name).read_bytes() == Path(module.__file__).read_bytes(), name


@pytest.mark.parametrize("name", sorted(LIBRARY_MATH))
def test_shipped_math_imports_only_torch_and_the_standard_library(shipped: Path, name: str) -> None:
    absolute, relative = _imports((shipped / name).read_text())
    assert "torch" in absolute
    assert absolute <= {"torch"} | STDLIB, f"{name} imports {sorted(absolute - {'torch'} - STDLIB)}"
    assert not relative, f"{name} imports {relative} relatively; it must stand alone"


def test_shipped_model_code_imports_only_shipped_files(shipped: Path) -> None:
    """Every relative import of the remote code is a shipped file; no absolute import is meo_ds."""
    for name in ("modeling_meo.py", "configuration_meo.py"):
        absolute, relative = _imports((shipped / name).read_text())
        assert absolute <= {"torch", "transformers"} | STDLIB, f"{name} imports {sorted(absolute)}"
        assert {f"{module}.py" for module in relative} <= set(remote.SHIPPED), f"{name}: {relative}"
    assert _imports((shipped / "modeling_meo.py").read_text())[1] == {
        "configuration_meo", "moe_functional", "models_functional"}


def test_in_process_remote_code_runs_the_library_files() -> None:
    """Imported from meo_ds, modeling_meo's relative imports are the library files, run standalone."""
    from meo_ds.export.hf_remote import modeling_meo

    assert modeling_meo.gate_summary.__code__.co_filename == moe_functional.__file__
    assert modeling_meo.apply_rope.__code__.co_filename == models_functional.__file__
