#!/usr/bin/env bash
# `megaclip train` with torchrun, on one node or on each of several nodes.
#
#   single node:  NPROC_PER_NODE=8 CONFIG=configs/run.yaml bash launch/torchrun.sh [key=value ...]
#   node r of N:  NNODES=N NODE_RANK=r MASTER_ADDR=node0 NPROC_PER_NODE=8 CONFIG=... \
#                 bash launch/torchrun.sh [key=value ...]          (run on every node)
#
# runs: torchrun --nnodes N --nproc_per_node P --node_rank r --master_addr A --master_port PORT \
#           -m megaclip.cli.main train --config C [--deepspeed D] [key=value ...] parallel.dp=...
#
# Environment (all optional but CONFIG):
#   CONFIG, DS_CONFIG, MEGACLIP_ENTRY, PYTHON, LAUNCHER_ARGS, DRY_RUN   as in launch/deepspeed.sh
#   NNODES          number of nodes                                        (1)
#   NPROC_PER_NODE  processes per node                                     (GPUs seen by nvidia-smi, else 1)
#   NODE_RANK       this node's index, 0..NNODES-1 (static rendezvous)     (0)
#   MASTER_ADDR     node 0's address / the c10d rendezvous host            (127.0.0.1)
#   MASTER_PORT     rendezvous port                                        (29500)
#   RDZV            static (--node_rank) or c10d (elastic rendezvous)      (static)
#   RDZV_ID         c10d job id, the same on every node                    (megaclip)
#   TORCHRUN        the launcher program                                   (torchrun)
set -euo pipefail
REPO="${MEGACLIP_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
source "$REPO/launch/common.sh"

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    [[ "$NPROC_PER_NODE" -ge 1 ]] || NPROC_PER_NODE=1
fi
if [[ -z "${TORCHRUN:-}" ]]; then
    if command -v torchrun >/dev/null 2>&1; then TORCHRUN=torchrun
    else TORCHRUN="$PYTHON -m torch.distributed.run"; fi
fi

megaclip_plan --launcher torchrun \
    --config "${CONFIG:-}" ${DS_CONFIG:+--ds-config "$DS_CONFIG"} \
    --nnodes "${NNODES:-1}" --nproc-per-node "$NPROC_PER_NODE" --node-rank "${NODE_RANK:-0}" \
    --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
    --rdzv "${RDZV:-static}" --rdzv-id "${RDZV_ID:-megaclip}" \
    --launcher-cmd "$TORCHRUN" --launcher-args="${LAUNCHER_ARGS:-}" \
    ${MEGACLIP_ENTRY:+--entry "$MEGACLIP_ENTRY"} --python "$PYTHON" \
    -- "$@"
