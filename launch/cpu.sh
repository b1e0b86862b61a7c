#!/usr/bin/env bash
# The same training on CPU ranks (no GPU): DS_ACCELERATOR=cpu selects DeepSpeed's CPU accelerator
# and the gloo backend. NUM_RANKS (default 2) processes on this machine; arguments go to the trainer:
#   launch/cpu.sh --config configs/demo_lm.yaml --deepspeed_config ds_configs/cpu_fp32.json --set model.moe.ep_size=2
set -euo pipefail
export DS_ACCELERATOR=cpu
# One thread per rank unless told otherwise (ranks x threads should not exceed the cores).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec deepspeed --num_gpus "${NUM_RANKS:-2}" --master_port "${MASTER_PORT:-29500}" --module meo_ds.train "$@"
