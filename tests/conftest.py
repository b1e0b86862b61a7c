import os

# Every test runs DeepSpeed on the CPU accelerator unless the caller chose another.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
