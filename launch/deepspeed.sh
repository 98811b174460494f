#!/usr/bin/env bash
# Multi-node (or single-node) `megaclip train` with the deepspeed launcher and a hostfile.
#
#   HOSTFILE=hostfile NUM_NODES=2 GPUS_PER_NODE=8 CONFIG=configs/run.yaml \
#   DS_CONFIG=ds_configs/zero1_bf16.json bash launch/deepspeed.sh [key=value ...]
#
# runs, on this machine:
#   deepspeed --hostfile H [--num_nodes N] [--num_gpus G] --master_addr A --master_port P \
#       --no_local_rank --module megaclip.cli.main train --config C [--deepspeed D] \
#       [key=value ...] parallel.dp=<N*G/(tp*pp)>
# which starts `python -u -m megaclip.cli.main train ...` once per GPU on every host (through
# pdsh/ssh when there are several hosts). See docs/launch.md.
#
# Environment (all optional but CONFIG):
#   CONFIG          run config for `megaclip train --config`                    (required)
#   DS_CONFIG       DeepSpeed JSON passed as `--deepspeed`                      (none)
#   HOSTFILE        'NAME slots=N' per line                                     (./hostfile)
#   NUM_NODES       use the first N hosts of the hostfile                       (all)
#   GPUS_PER_NODE   processes per host, <= its slots                            (its slots)
#   MASTER_ADDR     rendezvous host                                             (first host)
#   MASTER_PORT     rendezvous port                                             (29500)
#   DEEPSPEED       the launcher program                                        (deepspeed)
#   LAUNCHER_ARGS   extra deepspeed options, e.g. "--bind_cores_to_rank"        (none)
#   MEGACLIP_ENTRY  module or .py script replacing '-m megaclip.cli.main train' (none)
#   PYTHON          interpreter used to build the plan                          (python)
#   NCCL_*          see launch/common.sh (NCCL_DEBUG=WARN by default)
#   DRY_RUN=1       print the plan instead of launching (PLAN_FORMAT=json for JSON)
# parallel.dp is derived from the launch (hosts x GPUs / (tp * pp)) and appended.
set -euo pipefail
REPO="${MEGACLIP_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
source "$REPO/launch/common.sh"

if [[ -z "${DEEPSPEED:-}" ]]; then
    if command -v deepspeed >/dev/null 2>&1; then DEEPSPEED=deepspeed
    else DEEPSPEED="$PYTHON -m deepspeed.launcher.runner"; fi
fi

megaclip_plan --launcher deepspeed \
    --config "${CONFIG:-}" ${DS_CONFIG:+--ds-config "$DS_CONFIG"} \
    --hostfile "${HOSTFILE:-hostfile}" \
    ${NUM_NODES:+--num-nodes "$NUM_NODES"} ${GPUS_PER_NODE:+--gpus-per-node "$GPUS_PER_NODE"} \
    ${MASTER_ADDR:+--master-addr "$MASTER_ADDR"} --master-port "${MASTER_PORT:-29500}" \
    --launcher-cmd "$DEEPSPEED" --launcher-args="${LAUNCHER_ARGS:-}" \
    ${MEGACLIP_ENTRY:+--entry "$MEGACLIP_ENTRY"} --python "$PYTHON" \
    -- "$@"
