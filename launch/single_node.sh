#!/usr/bin/env bash
# One node, all its GPUs. Every argument after the script name goes to the trainer, e.g.
#   launch/single_node.sh --config run.yaml --deepspeed_config ds_configs/zero2_bf16.json --set parallel.ep_size=8
# NUM_GPUS (default: every visible GPU) and MASTER_PORT (default 29500) can be set in the environment.
# SIGTERM/SIGINT (Ctrl-C) to this script: the ranks save a checkpoint and exit (common.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NUM_GPUS="${NUM_GPUS:-$(python -c 'import torch; print(torch.cuda.device_count())')}"
meo_launch local deepspeed --num_gpus "${NUM_GPUS}" --master_port "${MASTER_PORT:-29500}" --module meo_ds.train "$@"
