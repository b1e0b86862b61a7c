"""The remote-code classes an export with `--target meo` ships (configuration_meo.py, modeling_meo.py).

modeling_meo.py imports its math relatively, `from .moe_functional import ...` and `from
.models_functional import ...`: in an export those are byte-for-byte copies of
meo_ds/moe/functional.py and meo_ds/models/functional.py written next to it
(meo_ds/export/remote.py, SHIPPED). Loaded in-process, as the exporter and meo_ds's registered
Auto classes do, the same names resolve to those library modules themselves, registered below, so
this directory holds no copy of them.
"""
import sys

from meo_ds.models import functional as _models_functional
from meo_ds.moe import functional as _moe_functional

sys.modules[f"{__name__}.moe_functional"] = _moe_functional
sys.modules[f"{__name__}.models_functional"] = _models_functional
