#!/usr/bin/env bash
# The same training on CPU ranks (no GPU): DS_ACCELERATOR=cpu selects DeepSpeed's CPU accelerator
# and the gloo backend. NUM_RANKS (default 2) processes on this machine; arguments go to the trainer:
#   meo-prepare demo --task lm --out data/demo_lm
#   launch/cpu.sh --config launch/configs/demo_lm.yaml --deepspeed_config ds_configs/cpu_fp32.json
# Your own corpus (vocabulary and sequence length read from it): launch/configs/small_lm.yaml, small_mt.yaml
#   launch/cpu.sh --config launch/configs/small_mt.yaml --deepspeed_config ds_configs/cpu_fp32.json --set data.path=data/my_mt
# SIGTERM/SIGINT (Ctrl-C) to this script: the ranks save a checkpoint and exit (common.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
export DS_ACCELERATOR=cpu
# One thread per rank unless told otherwise (ranks x threads should not exceed the cores).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
meo_launch local deepspeed --num_gpus "${NUM_RANKS:-2}" --master_port "${MASTER_PORT:-29500}" --module meo_ds.train "$@"
