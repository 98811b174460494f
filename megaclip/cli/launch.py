"""``python -m megaclip.cli.launch``: plan (--dry-run) or run a multi-process launch of train.

The command line of :mod:`megaclip.launch.plan` (pure planning functions); launch/*.sh map their
environment variables onto its options. No torch import: a plan prints in a fraction of a second
on a login node.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import sys

from megaclip.errors import ConfigError, MegaclipError
from megaclip.launch.plan import (
    DEFAULT_PORT,
    LAUNCHERS,
    LOCAL_NAMES,
    LaunchPlan,
    TrainCommand,
    deepspeed_plan,
    expand_nodelist,
    format_plan,
    parse_tasks_per_node,
    plan_to_dict,
    read_hostfile,
    read_parallel,
    resolve_entry,
    slurm_plan,
    torchrun_plan,
)


def build_parser() -> argparse.ArgumentParser:
    """Options of ``python -m megaclip.cli.launch`` (launch/*.sh map env vars onto them)."""
    p = argparse.ArgumentParser(
        prog="python -m megaclip.cli.launch",
        description="Plan (--dry-run) or run a multi-process launch of `megaclip train`.",
    )
    p.add_argument("--launcher", required=True, choices=LAUNCHERS)
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--config", help="run config (YAML/JSON) passed to `megaclip train --config`")
    p.add_argument("--ds-config", help="DeepSpeed JSON passed as `--deepspeed`")
    p.add_argument("--entry", help="module or .py script replacing '-m megaclip.cli.main train'")
    p.add_argument("--python", default="python", help="interpreter of each rank (srun, plans)")
    p.add_argument("--master-addr", help="rendezvous host (default: first node)")
    p.add_argument("--master-port", type=int, default=DEFAULT_PORT)
    p.add_argument("--launcher-cmd", help="launcher program, split like a shell (e.g. 'srun')")
    p.add_argument("--launcher-args", default="", help="extra launcher options, shell-split")
    g = p.add_argument_group("deepspeed")
    g.add_argument("--hostfile", help="DeepSpeed hostfile: 'NAME slots=N' per line")
    g.add_argument("--num-nodes", type=int, help="use the first N hosts of the hostfile")
    g.add_argument("--gpus-per-node", type=int, help="processes per node (default: slots)")
    g = p.add_argument_group("slurm")
    g.add_argument("--nodelist", help="SLURM nodelist, e.g. node[01-04]")
    g.add_argument("--tasks-per-node", help="'8', or SLURM's '8(x2),4' form")
    g.add_argument("--cpus-per-task", type=int)
    g = p.add_argument_group("slurm and torchrun")
    g.add_argument("--nnodes", type=int, help="number of nodes")
    g = p.add_argument_group("torchrun")
    g.add_argument("--nproc-per-node", type=int, default=1)
    g.add_argument("--node-rank", type=int, default=0)
    g.add_argument("--rdzv", default="static", help="static (--node_rank) or c10d")
    g.add_argument("--rdzv-id", default="megaclip")
    p.add_argument("overrides", nargs="*", help="arguments for `megaclip train` (key=value ...)")
    return p


def plan_from_args(
    args: argparse.Namespace, local_names: frozenset[str] = LOCAL_NAMES
) -> LaunchPlan:
    """Build the plan the parsed command line asks for (reads the config and hostfile)."""
    if not args.config:
        raise ConfigError("no run config: set CONFIG=path/to/run.yaml (passed as --config)")
    tp, pp = read_parallel(args.config, args.overrides)
    train = TrainCommand(
        args.config, args.ds_config or None, tuple(args.overrides), resolve_entry(args.entry)
    )
    common = {"master_port": args.master_port, "python": args.python}
    extra = shlex.split(args.launcher_args)
    cmd = shlex.split(args.launcher_cmd) if args.launcher_cmd else None
    if args.launcher == "deepspeed":
        hostfile = args.hostfile or "hostfile"
        return deepspeed_plan(
            read_hostfile(hostfile),
            train,
            tp,
            pp,
            num_nodes=args.num_nodes,
            gpus_per_node=args.gpus_per_node,
            master_addr=args.master_addr,
            hostfile=hostfile,
            launcher=cmd or ("deepspeed",),
            launcher_args=extra,
            local_names=local_names,
            **common,
        )
    if args.launcher == "slurm":
        if not args.nodelist:
            raise ConfigError("no nodelist: run inside an allocation (SLURM_JOB_NODELIST)")
        nodes = expand_nodelist(args.nodelist)
        nnodes = args.nnodes or len(nodes)
        if nnodes != len(nodes):
            raise ConfigError(
                f"SLURM_NNODES={nnodes} but nodelist '{args.nodelist}' names {len(nodes)} node(s)"
            )
        if not args.tasks_per_node:
            raise ConfigError("tasks per node unknown: set SLURM_NTASKS_PER_NODE (one per GPU)")
        return slurm_plan(
            nodes,
            parse_tasks_per_node(args.tasks_per_node, nnodes),
            train,
            tp,
            pp,
            master_addr=args.master_addr,
            cpus_per_task=args.cpus_per_task,
            srun=cmd or ("srun",),
            launcher_args=extra,
            **common,
        )
    return torchrun_plan(
        args.nnodes or 1,
        args.nproc_per_node,
        train,
        tp,
        pp,
        node_rank=args.node_rank,
        master_addr=args.master_addr or "127.0.0.1",
        rdzv=args.rdzv,
        rdzv_id=args.rdzv_id,
        torchrun=cmd or ("torchrun",),
        launcher_args=extra,
        **common,
    )


def main(argv: list[str] | None = None) -> int:
    """Print the plan (``--dry-run``) or replace this process with the launcher command."""
    args = build_parser().parse_args(argv)
    local = LOCAL_NAMES | {socket.gethostname(), socket.getfqdn()}
    try:
        plan = plan_from_args(args, frozenset(local))
    except MegaclipError as err:
        print(f"megaclip launch: error: {err}", file=sys.stderr)
        return 2
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith("NCCL_"))
    if args.dry_run:
        if args.format == "json":
            print(json.dumps({**plan_to_dict(plan), "env": dict(env)}, indent=1))
        else:
            print(format_plan(plan, env))
        return 0
    if plan.launcher == "slurm":  # srun passes the environment on to every task
        os.environ.update(MASTER_ADDR=plan.master_addr, MASTER_PORT=str(plan.master_port))
    for note in plan.notes:
        print(f"megaclip launch: {note}", file=sys.stderr)
    print(f"+ {shlex.join(plan.argv)}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    try:
        os.execvp(plan.argv[0], list(plan.argv))
    except FileNotFoundError:
        print(
            f"megaclip launch: error: '{plan.argv[0]}' not found on PATH; install it or point "
            "DEEPSPEED / SRUN / TORCHRUN at it",
            file=sys.stderr,
        )
        return 127
    return 0  # not reached: execvp replaces the process


if __name__ == "__main__":
    sys.exit(main())
