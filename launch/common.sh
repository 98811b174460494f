# Sourced by launch/deepspeed.sh, launch/slurm.sbatch and launch/torchrun.sh (not run directly).
# Expects REPO (the megaclip checkout). Every setting keeps a value already in the environment.

# The checkout's megaclip is importable even when not pip-installed (PYTHON* variables are
# forwarded to other nodes by the deepspeed launcher, srun and torchrun inherit them).
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
: "${PYTHON:=python}"

# NCCL: warnings and errors in the log (NCCL_DEBUG=INFO shows ring/tree set-up and the network
# chosen); add site settings here or in the environment, e.g. NCCL_SOCKET_IFNAME=ib0 or
# NCCL_IB_HCA=mlx5. The deepspeed launcher forwards every NCCL_* variable to the other nodes.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

# Arguments after the script name go to `megaclip train` (key=value overrides, options).
# DRY_RUN=1: print the plan (launcher command, per-node ranks and commands) and run nothing.
megaclip_plan() {
    local dry=()
    case "${DRY_RUN:-0}" in 0 | "" | false | no) ;; *) dry=(--dry-run --format "${PLAN_FORMAT:-text}") ;; esac
    # ${a[@]+"${a[@]}"}: an empty array under `set -u` in bash < 4.4 (still common on clusters)
    exec "$PYTHON" -m megaclip.cli.launch ${dry[@]+"${dry[@]}"} "$@"
}
