#!/usr/bin/env bash
# Several nodes over passwordless ssh: the deepspeed launcher reads a hostfile (see hostfile.example)
# and starts the ranks on every host. Run it on the first host; the repository, the Python
# environment and the data must be at the same paths everywhere. Arguments go to the trainer:
#   HOSTFILE=launch/hostfile MASTER_ADDR=node1 launch/multi_node.sh --config run.yaml --deepspeed_config ds_configs/zero2_bf16.json
# World size = sum of the slots; it must be a multiple of model.moe.ep_size (checked before training).
set -euo pipefail
HOSTFILE="${HOSTFILE:-launch/hostfile}"
MASTER_ADDR="${MASTER_ADDR:-$(head -n1 "${HOSTFILE}" | awk '{print $1}')}"
exec deepspeed --hostfile "${HOSTFILE}" --master_addr "${MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}" \
    --module meo_ds.train "$@"
