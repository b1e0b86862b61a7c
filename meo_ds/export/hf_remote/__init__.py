"""The remote-code classes an export with `--target meo` ships (configuration_meo.py, modeling_meo.py).

modeling_meo.py imports its math relatively, `from .moe_functional import ...` and `from
.models_functional import ...`. In an export those are byte-for-byte copies of the library files
in LIBRARY_FILES, written next to it (meo_ds/export/remote.py). Imported from meo_ds (the
exporter, the Auto classes meo_ds registers), the same names are those library files themselves,
loaded here as standalone modules under the shipped names: the code runs as it runs in an export,
and importing the export package does not import meo_ds.moe, meo_ds.models or DeepSpeed.
"""
import importlib.util
import sys
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[2]
LIBRARY_FILES = {  # name in the export: the library file it is a copy of
    "moe_functional.py": _PACKAGE / "moe" / "functional.py",
    "models_functional.py": _PACKAGE / "models" / "functional.py",
}


def _load_shipped(file_name: str, path: Path) -> None:
    name = f"{__name__}.{file_name.removesuffix('.py')}"
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


for _file_name, _path in LIBRARY_FILES.items():
    _load_shipped(_file_name, _path)
