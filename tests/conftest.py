import os

from meo_ds.distributed import use_environment_extension_cache

# Every test runs DeepSpeed on the CPU accelerator unless the caller chose another.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed's ops build into this environment's own cache (meo_ds/distributed.py), also in the test
# processes that start DeepSpeed without meo_ds.distributed; they inherit this variable.
use_environment_extension_cache()
