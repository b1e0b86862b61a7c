"""Shared by the end-to-end export tests: run fresh_check.py on exports in a process without meo_ds."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

FRESH_CHECK = Path(__file__).resolve().parent / "fresh_check.py"


def run_fresh_check(specs: list[dict], work_dir: Path) -> str:
    """Check every spec (see fresh_check.py) offline, with meo_ds not importable; returns stdout."""
    spec_path = work_dir / "spec.json"
    spec_path.write_text(json.dumps(specs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(work_dir / "hf_modules"))
    proc = subprocess.run([sys.executable, str(FRESH_CHECK), str(spec_path)],
                          cwd=work_dir, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("OK ") == len(specs), proc.stdout
    print(proc.stdout)  # one line per export, with its largest logit difference (pytest -s shows it)
    return proc.stdout
