#!/usr/bin/env bash
# One GPU device check, under 8 minutes: install, tests/gpu, the bf16 layer benchmark, and a
# 300-step bf16 LM run of the demo preset (tokens/s and MFU). Everything lands in $OUT.
#
#   bench/device_check.sh                 # from the repository root; OUT defaults to ./device_out
#   OUT=/somewhere bench/device_check.sh
#
# The target machine: one GPU (H200), PyTorch with CUDA, NO deepspeed, NO internet. So the wheels
# travel with the checkout in the ignored folder .whl/, prepared on a connected machine:
#
#   # DeepSpeed publishes only an sdist; build its pure-Python wheel without ops (nothing compiled):
#   pip download --no-deps deepspeed==0.19.8 -d /tmp/ds
#   DS_BUILD_OPS=0 DS_ACCELERATOR=cuda pip wheel --no-deps --no-build-isolation /tmp/ds/deepspeed-0.19.8.tar.gz -w .whl
#   # DeepSpeed's pure-Python dependencies that a plain PyTorch image lacks:
#   pip download --no-deps -d .whl hjson einops py-cpuinfo
#
# Step 1 installs every wheel in .whl/ (pip --no-index --no-deps) and this checkout (pip -e
# --no-deps), then imports every module the check needs; any missing one stops the script before
# other work, naming the `pip download` line to run on the connected machine. Compiled ones
# (msgpack, pydantic-core, psutil, pyyaml, safetensors, tokenizers, sentencepiece) must match the
# GPU machine's Python: `pip download --no-deps --only-binary=:all: --python-version 3.X
# --platform manylinux2014_x86_64 -d .whl NAME`.
#
# DeepSpeed's ops: DS_BUILD_OPS=0 keeps the wheel build from compiling anything, and nothing
# here JIT-builds one at run time (meo_ds's optimizer is torch's AdamW, not FusedAdam/CPUAdam;
# ZeRO-2, the MoE layers and NCCL need no DeepSpeed op), so neither ninja nor nvcc is needed.
# DS_ACCELERATOR=cuda is set so DeepSpeed does not probe for other accelerators, and
# DS_SKIP_CUDA_CHECK=1 so its CUDA-version check (wheel built without CUDA) never runs.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="$(mkdir -p "${OUT:-./device_out}" && cd "${OUT:-./device_out}" && pwd)"
LOG="$OUT/device_check.log"
export DS_ACCELERATOR=cuda DS_BUILD_OPS=0 DS_SKIP_CUDA_CHECK=1 PYTHONPATH="$REPO" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python}"
export OUT PY
START=$(date +%s)
FAILED=()

say() { echo "[device_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# step NAME SECONDS CMD...: run with a timeout, output to $OUT/NAME.log (and its tail to the
# main log); a failing step is recorded and the next one still runs.
step() {
    local name="$1" limit="$2"
    shift 2
    say "== $name (limit ${limit}s): $*"
    local t0=$(date +%s) rc=0
    # bash -c: the command may be one of this script's functions (exported below)
    timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@" > "$OUT/$name.log" 2>&1 || rc=$?
    tail -n 15 "$OUT/$name.log" | tee -a "$LOG"
    if [ "$rc" -ne 0 ]; then
        [ "$rc" -eq 124 ] && say "$name: TIMED OUT after ${limit}s" || say "$name: FAILED (exit $rc)"
        FAILED+=("$name")
    else
        say "$name: ok in $(( $(date +%s) - t0 ))s"
    fi
    return 0
}

: > "$LOG"
say "repository $REPO, results in $OUT"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), \
'x', torch.cuda.device_count())" 2>&1 | tee -a "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$LOG" 2>&1 || true

# 1. install (offline) and check every import before any other work
do_install() {
    set -euo pipefail
    shopt -s nullglob
    local wheels=(.whl/*.whl)
    if [ ${#wheels[@]} -gt 0 ]; then
        "$PY" -m pip install --no-index --no-deps --disable-pip-version-check "${wheels[@]}"
    fi
    "$PY" -m pip install --no-index --no-deps --no-build-isolation --disable-pip-version-check -e .
    "$PY" - <<'PY'
import importlib
# import name -> distribution to download
needed = {"torch": "torch", "numpy": "numpy", "yaml": "pyyaml", "packaging": "packaging", "psutil": "psutil",
          "tqdm": "tqdm", "hjson": "hjson", "einops": "einops", "msgpack": "msgpack", "pydantic": "pydantic",
          "pydantic_core": "pydantic-core", "annotated_types": "annotated-types", "cpuinfo": "py-cpuinfo",
          "deepspeed": "deepspeed (build: see this script's header)", "transformers": "transformers",
          "safetensors": "safetensors", "tokenizers": "tokenizers", "sentencepiece": "sentencepiece",
          "huggingface_hub": "huggingface-hub", "pytest": "pytest", "meo_ds": "this checkout (pip install -e .)"}
missing = []
for module, dist in needed.items():
    try:
        importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - any import failure is a missing or broken package
        missing.append((dist, f"{type(err).__name__}: {err}"))
for dist, why in missing:
    print(f"MISSING {dist}: {why}\n  on a connected machine: pip download --no-deps -d .whl {dist.split()[0]}")
import deepspeed
from deepspeed.accelerator import get_accelerator
print("deepspeed", deepspeed.__version__, "accelerator", get_accelerator().device_name())
raise SystemExit(1 if missing else 0)
PY
}
export -f do_install
step install 120 do_install
if [[ " ${FAILED[*]} " == *" install "* ]]; then
    say "stopping: the environment is incomplete (see $OUT/install.log for the wheels to bring)"
    exit 1
fi

# 2. the GPU test suite
step tests_gpu 200 "$PY" -m pytest -q -rs tests/gpu -p no:cacheprovider --junitxml="$OUT/tests_gpu.xml"

# 3. the layer benchmark in bf16 on the main rows (dense baseline always included)
step bench_moe_bf16 100 "$PY" bench/bench_moe.py --dtype bf16 --reps 7 \
    --rows 'top-2 of 8|xmoe t=0.9|meo k=2 of 8|deepspeed|grouped_mm' --json "$OUT/bench_moe_bf16.json"

# 4. 300 bf16 steps of the demo preset on this GPU (meo-train, one process): tokens/s and MFU
lm_run() {
    set -euo pipefail
    local data="$OUT/demo_data/shards" run="$OUT/lm_run"
    [ -f "$data/manifest.json" ] || "$PY" -m meo_ds.data.cli demo --task lm --out "$OUT/demo_data"
    rm -rf "$run"
    "$PY" - "$data" "$run" <<'PY'
import sys, yaml
from meo_ds.demo import DEMO_PRESET
from meo_ds.data import LMDataset
data, run = sys.argv[1], sys.argv[2]
tree = {"task": "lm", "name": "device-check-demo",
        "model": {"preset": DEMO_PRESET, "vocab_size": LMDataset(data, "train").tokenizer().vocab_size,
                  "moe": {"kind": "topk"}},
        "parallel": {"ep_size": 1},
        "data": {"path": data, "seq_len": 128},
        "train": {"steps": 300, "micro_batch_size": 8, "lr": 2e-3, "warmup_steps": 20, "seed": 1234},
        "checkpoint": {"interval": 0, "save_at_end": False},
        "logging": {"out_dir": run, "interval": 50},
        "eval": {"interval": 0, "at_end": True, "max_batches": 10}}
open(f"{run}.yaml", "w").write(yaml.safe_dump(tree, sort_keys=False))
PY
    "$PY" -m meo_ds.train --config "$run.yaml" --deepspeed_config ds_configs/zero2_bf16.json
    grep -E "tok/s|done:|eval" "$run/train.log" | tail -n 4
}
export -f lm_run
step lm_300_bf16 150 lm_run

say "summary:"
grep -hE "passed|failed|skipped" "$OUT/tests_gpu.log" 2>/dev/null | tail -n 1 | tee -a "$LOG" || true
[ -f "$OUT/bench_moe_bf16.json" ] && "$PY" - "$OUT/bench_moe_bf16.json" <<'PY' | tee -a "$LOG" || true
import json, sys
for r in json.load(open(sys.argv[1]))["rows"]:
    print(f"  {r['name']:<38} {r['ms']:8.3f} ms  x dense {r['ratio_to_dense']:.2f}  {r['tokens_per_s']:>12,.0f} tok/s")
PY
grep -E "step +300 .*tok/s|done:" "$OUT/lm_run/train.log" 2>/dev/null | tee -a "$LOG" || true
say "total $(( $(date +%s) - START ))s; failed steps: ${FAILED[*]:-none}"
[ ${#FAILED[@]} -eq 0 ]
