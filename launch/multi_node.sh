#!/usr/bin/env bash
# Several nodes, one hostfile (see hostfile.example). The repository, the Python environment and the
# data must be at the same paths everywhere. Arguments go to the trainer. Two ways to start:
#
#   over passwordless ssh, from the first host: the deepspeed runner starts every node with pdsh
#     HOSTFILE=launch/hostfile MASTER_ADDR=node1 launch/multi_node.sh --config run.yaml --deepspeed_config ds_configs/zero2_bf16.json
#   one node at a time, no ssh (your scheduler runs this on every host, NODE_RANK = the host's line
#   in the hostfile, counting from 0; every node needs the same MASTER_ADDR and MASTER_PORT)
#     NODE_RANK=1 HOSTFILE=launch/hostfile MASTER_ADDR=node1 launch/multi_node.sh --config run.yaml ...
#
# World size = sum of the slots; it must be a multiple of parallel.ep_size (checked before training).
# SIGTERM/SIGINT to this script: with NODE_RANK, this node's ranks save a checkpoint (the others learn
# it at the next step and save too); over pdsh, see common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
HOSTFILE="${HOSTFILE:-launch/hostfile}"
MASTER_ADDR="${MASTER_ADDR:-$(head -n1 "${HOSTFILE}" | awk '{print $1}')}"
launcher=(deepspeed --hostfile "${HOSTFILE}" --master_addr "${MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}")
if [ -n "${NODE_RANK:-}" ]; then
    meo_launch local "${launcher[@]}" --no_ssh --node_rank "${NODE_RANK}" --module meo_ds.train "$@"
else
    meo_launch runner "${launcher[@]}" --module meo_ds.train "$@"
fi
