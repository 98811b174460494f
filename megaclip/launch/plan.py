"""Launch plans for `megaclip train` under the deepspeed launcher, SLURM (srun) and torchrun.

Pure functions parse a DeepSpeed hostfile, expand a SLURM nodelist, lay global ranks out on nodes,
derive ``parallel.dp = processes / (tp * pp)`` and build the launcher command plus, for each node,
the command its ranks run. ``python -m megaclip.cli.launch`` (its command line) prints such a
plan (dry run) or executes the launcher command; launch/*.sh map their environment variables
onto its options.
No torch import: a plan is printed in a fraction of a second on a login node.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

# config/ imports no torch at module import: the one tp/pp/world rule is usable here.
from megaclip.config.parallel import derive_dp
from megaclip.errors import ConfigError

DEFAULT_MODULE = "megaclip.cli.main"
DEFAULT_PORT = 29500
LAUNCHERS = ("deepspeed", "slurm", "torchrun")
LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


# --------------------------------------------------------------------------- hostfiles, nodelists


@dataclass(frozen=True)
class Host:
    """One hostfile entry: a node name and the number of processes (GPUs) it offers."""

    name: str
    slots: int


def parse_hostfile(text: str, source: str = "hostfile") -> list[Host]:
    """Hosts of a DeepSpeed/MPI hostfile: ``NAME slots=N`` per line, ``#`` comments, blank lines.

    Other ``key=value`` tokens (MPI's ``max_slots=``) are accepted and ignored, as DeepSpeed does.
    """
    hosts: list[Host] = []
    first_line: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, *tokens = line.split()
        where = f"{source} line {lineno} ({raw.strip()!r})"
        if "=" in name:
            raise ConfigError(f"{where}: a line must start with a host name: write 'NAME slots=N'")
        slots: int | None = None
        for token in tokens:
            key, eq, value = token.partition("=")
            if not eq:
                raise ConfigError(
                    f"{where}: unexpected '{token}'; write one host per line as 'NAME slots=N'"
                )
            if key != "slots":
                continue
            if slots is not None:
                raise ConfigError(f"{where}: slots= is given twice; keep one 'slots=N'")
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(
                    f"{where}: slots must be a positive integer (GPUs on the node), got '{value}'"
                )
            slots = int(value)
        if slots is None:
            raise ConfigError(
                f"{where}: missing slots=N; write e.g. '{name} slots=8' for a node with 8 GPUs"
            )
        if name in first_line:
            raise ConfigError(
                f"{where}: host '{name}' is listed twice (first on line {first_line[name]}); "
                "list each host once"
            )
        first_line[name] = lineno
        hosts.append(Host(name, slots))
    if not hosts:
        raise ConfigError(f"{source} lists no hosts: write one 'NAME slots=N' line per node")
    return hosts


def read_hostfile(path: str | Path) -> list[Host]:
    """Hosts of the hostfile at ``path`` (see ``parse_hostfile``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"hostfile not found: {path}; set HOSTFILE to a file with one 'NAME slots=N' line "
            "per node"
        )
    return parse_hostfile(path.read_text(encoding="utf-8"), source=f"hostfile {path}")


def _split_top_level(spec: str) -> list[str]:
    """Split a nodelist on the commas outside brackets; reject nested or unbalanced brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ConfigError(f"nodelist '{spec}': nested '[' at position {i}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"nodelist '{spec}': ']' without '[' at position {i}")
        elif ch == "," and depth == 0:
            items.append(spec[start:i])
            start = i + 1
    if depth:
        raise ConfigError(f"nodelist '{spec}': '[' is never closed")
    items.append(spec[start:])
    return items


def _expand_brackets(body: str, spec: str) -> list[str]:
    """Values of one bracket group: ``01-03,07`` -> 01 02 03 07 (zero padding kept)."""
    values: list[str] = []
    for part in body.split(","):
        lo, dash, hi = part.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise ConfigError(
                f"nodelist '{spec}': bad range '{part}' in [{body}]; use numbers like [01-04,07]"
            )
        if not dash:
            values.append(lo)
            continue
        if int(hi) < int(lo):
            raise ConfigError(f"nodelist '{spec}': range '{part}' runs backwards")
        width = len(lo)
        values.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return values


def expand_nodelist(spec: str) -> list[str]:
    """Host names of a SLURM nodelist: ``node[01-03,07]`` -> node01 node02 node03 node07; ``a,b``.

    Several bracket groups in one name expand as a product (``r[1-2]n[1-2]`` -> r1n1 r1n2 r2n1
    r2n2), in the order ``scontrol show hostnames`` prints them.
    """
    spec = spec.strip()
    if not spec:
        raise ConfigError("empty nodelist: set SLURM_JOB_NODELIST, e.g. 'node[01-04]'")
    names: list[str] = []
    for item in _split_top_level(spec):
        if not item:
            raise ConfigError(f"nodelist '{spec}': empty host name between commas")
        expanded = [""]
        for part in re.split(r"(\[[^\[\]]*\])", item):
            if part.startswith("["):
                options = _expand_brackets(part[1:-1], spec)
                expanded = [head + opt for head in expanded for opt in options]
            elif part:
                expanded = [head + part for head in expanded]
        names.extend(expanded)
    return names


def parse_tasks_per_node(spec: str, nnodes: int) -> list[int]:
    """Tasks on each of ``nnodes`` nodes from ``4`` (every node) or SLURM's ``4(x2),2`` form."""
    spec = spec.strip()
    if spec.isdigit():
        counts = [int(spec)] * nnodes
    else:
        counts = []
        for part in spec.split(","):
            m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
            if not m:
                raise ConfigError(
                    f"tasks per node '{spec}': expected a number or SLURM's '4(x2),2' form"
                )
            counts.extend([int(m.group(1))] * int(m.group(2) or 1))
        if len(counts) != nnodes:
            raise ConfigError(
                f"tasks per node '{spec}' describes {len(counts)} nodes but the job has {nnodes}"
            )
    if any(c < 1 for c in counts):
        raise ConfigError(f"tasks per node '{spec}': every node needs at least one task")
    return counts


# --------------------------------------------------------------------------- ranks and parallelism


def rank_blocks(counts: Sequence[int]) -> list[range]:
    """Global ranks of each node when node i runs ``counts[i]`` processes: contiguous blocks."""
    blocks, start = [], 0
    for count in counts:
        blocks.append(range(start, start + count))
        start += count
    return blocks


def split_tp_groups(blocks: Sequence[range], tp: int) -> list[tuple[int, int]]:
    """(first, last) global rank of every TP group (tp consecutive ranks) spanning two nodes."""
    node_of = {r: i for i, block in enumerate(blocks) for r in block}
    world = len(node_of)
    return [
        (g, g + tp - 1)
        for g in range(0, world - world % tp, tp)
        if node_of[g] != node_of[g + tp - 1]
    ]


def is_override(arg: str) -> bool:
    """True for a ``key.sub=value`` config override (not an option such as ``--resume``)."""
    return not arg.startswith("-") and "=" in arg


def read_parallel(config: str | Path, overrides: Sequence[str] = ()) -> tuple[int, int]:
    """(tp, pp) of a run config file after its ``key=value`` overrides (each defaults to 1)."""
    from megaclip.config.schema import apply_overrides, load_mapping

    data = apply_overrides(load_mapping(config), [o for o in overrides if is_override(o)])
    par = data.get("parallel") or {}
    if not isinstance(par, dict):
        raise ConfigError(f"{config}: 'parallel' must be a mapping such as {{tp: 2, pp: 1}}")
    sizes = []
    for key in ("tp", "pp"):
        value = par.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{config}: parallel.{key} must be a positive integer, got {value!r}")
        sizes.append(value)
    return sizes[0], sizes[1]


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Entry:
    """What each rank runs after ``python -u``: a module (``-m``) or a script, plus leading args."""

    target: str = DEFAULT_MODULE
    module: bool = True
    args: tuple[str, ...] = ("train",)

    def python_args(self) -> list[str]:
        """Arguments after ``python -u``: ``-m MODULE ARGS...`` or ``SCRIPT ARGS...``."""
        return [*(["-m"] if self.module else []), self.target, *self.args]


def resolve_entry(spec: str | None) -> Entry:
    """``-m megaclip.cli.main train`` by default; else MEGACLIP_ENTRY: a ``.py`` path or a module.

    ``spec`` may carry leading arguments (``"mypkg.main train"``); a target ending in ``.py`` or
    containing ``/`` is a script, anything else a module.
    """
    if not spec or not spec.strip():
        return Entry()
    target, *args = shlex.split(spec)
    return Entry(target, not (target.endswith(".py") or "/" in target), tuple(args))


@dataclass(frozen=True)
class TrainCommand:
    """The program every rank runs: entry, ``--config`` [``--deepspeed``] and config overrides."""

    config: str
    ds_config: str | None = None
    overrides: tuple[str, ...] = ()
    entry: Entry = field(default_factory=Entry)

    def train_args(self, world: int, tp: int, pp: int) -> list[str]:
        """``--config C [--deepspeed D] OVERRIDES parallel.dp=<world/(tp*pp)>`` for the entry."""
        dp = derive_dp(world, tp, pp)
        out = ["--config", self.config]
        if self.ds_config:
            out += ["--deepspeed", self.ds_config]
        for arg in self.overrides:
            if arg.startswith("parallel.dp="):
                value = arg.split("=", 1)[1].strip()
                if value != "auto" and value != str(dp):
                    raise ConfigError(
                        f"override '{arg}' contradicts the launch: {world} processes / (tp {tp} x "
                        f"pp {pp}) = dp {dp}; drop it (the launcher sets parallel.dp) or change "
                        "the number of nodes or GPUs per node"
                    )
                continue
            out.append(arg)
        return [*out, f"parallel.dp={dp}"]

    def rank_argv(self, python: str, world: int, tp: int, pp: int) -> list[str]:
        """The full per-rank command: ``python -u ENTRY TRAIN_ARGS``."""
        return [python, "-u", *self.entry.python_args(), *self.train_args(world, tp, pp)]


@dataclass(frozen=True)
class NodePlan:
    """One node of a launch: its global and local ranks, the env its ranks see, their command."""

    node_rank: int
    host: str
    ranks: tuple[int, ...]
    local_ranks: tuple[int, ...]
    env: tuple[tuple[str, str], ...]
    argv: tuple[str, ...]
    launch_argv: tuple[str, ...] = ()


@dataclass(frozen=True)
class LaunchPlan:
    """A launch: the command run here, and what every node then runs (ranks, env, command)."""

    launcher: str
    argv: tuple[str, ...]
    nodes: tuple[NodePlan, ...]
    master_addr: str
    master_port: int
    tp: int
    pp: int
    dp: int
    rank_vars: tuple[str, str] = ("RANK", "LOCAL_RANK")
    notes: tuple[str, ...] = ()

    @property
    def world_size(self) -> int:
        """Total number of processes (tp * pp * dp)."""
        return sum(len(n.ranks) for n in self.nodes)


def _master_for(host: str) -> str:
    """Rendezvous address for a host name: loopback names become 127.0.0.1 (no IPv6 ::1)."""
    return "127.0.0.1" if host in LOCAL_NAMES else host


def _rendezvous(master: str, port: int, *more: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    """A node's environment: MASTER_ADDR / MASTER_PORT, then ``more`` (name, value) pairs."""
    return (("MASTER_ADDR", master), ("MASTER_PORT", str(port)), *more)


def _plan(
    launcher: str,
    argv: Sequence[str],
    nodes: tuple[NodePlan, ...],
    master: str,
    port: int,
    tp: int,
    pp: int,
    dp: int,
    blocks: Sequence[range],
    notes: Sequence[str] = (),
) -> LaunchPlan:
    """The LaunchPlan of these nodes; ``notes`` plus a warning if TP groups span nodes."""
    notes = (*notes, *_tp_notes(blocks, tp))
    return LaunchPlan(launcher, tuple(argv), nodes, master, port, tp, pp, dp, notes=notes)


def _tp_notes(blocks: Sequence[range], tp: int) -> list[str]:
    """A warning when tensor-parallel groups span nodes (TP traffic then leaves NVLink)."""
    split = split_tp_groups(blocks, tp)
    if not split:
        return []
    first, last = split[0]
    return [
        f"warning: {len(split)} tensor-parallel group(s) span two nodes (e.g. ranks {first}-"
        f"{last}); TP all-reduces then cross the network: use tp <= GPUs per node, dividing it"
    ]


def deepspeed_plan(
    hosts: Sequence[Host],
    train: TrainCommand,
    tp: int,
    pp: int,
    *,
    num_nodes: int | None = None,
    gpus_per_node: int | None = None,
    master_addr: str | None = None,
    master_port: int = DEFAULT_PORT,
    hostfile: str = "hostfile",
    launcher: Sequence[str] = ("deepspeed",),
    launcher_args: Sequence[str] = (),
    python: str = "python",
    local_names: frozenset[str] = LOCAL_NAMES,
) -> LaunchPlan:
    """Plan of ``deepspeed --hostfile H``: the first ``num_nodes`` hosts, ``gpus_per_node`` each.

    Ranks follow the deepspeed launcher: contiguous blocks in hostfile order, LOCAL_RANK =
    RANK % (processes on the node). A single local host gets ``--no_ssh_check`` (runs here
    without ssh); a single remote host gets ``--force_multi`` (else DeepSpeed would start it on
    this machine); several hosts are started through pdsh.
    """
    selected = list(hosts)
    if num_nodes is not None:
        if not 1 <= num_nodes <= len(hosts):
            raise ConfigError(
                f"NUM_NODES={num_nodes} but {hostfile} lists {len(hosts)} host(s); "
                f"use 1..{len(hosts)} or add hosts"
            )
        selected = selected[:num_nodes]
    if gpus_per_node is not None:
        if gpus_per_node < 1:
            raise ConfigError(f"GPUS_PER_NODE must be >= 1, got {gpus_per_node}")
        for host in selected:
            if host.slots < gpus_per_node:
                raise ConfigError(
                    f"GPUS_PER_NODE={gpus_per_node} exceeds the {host.slots} slots of host "
                    f"'{host.name}' in {hostfile}; lower GPUS_PER_NODE or fix its slots="
                )
        counts = [gpus_per_node] * len(selected)
    else:
        counts = [h.slots for h in selected]
    blocks = rank_blocks(counts)
    world = sum(counts)
    dp = derive_dp(world, tp, pp)
    master = master_addr or _master_for(selected[0].name)

    argv = [*launcher, "--hostfile", hostfile]
    if num_nodes is not None:
        argv += ["--num_nodes", str(num_nodes)]
    if gpus_per_node is not None:
        argv += ["--num_gpus", str(gpus_per_node)]
    argv += ["--master_addr", master, "--master_port", str(master_port)]
    notes = []
    if len(selected) == 1 and selected[0].name in local_names:
        argv.append("--no_ssh_check")
        notes.append("one local host: the deepspeed launcher starts the ranks here, no ssh/pdsh")
    elif len(selected) == 1:
        argv.append("--force_multi")
        notes.append(f"one remote host: --force_multi starts it through pdsh/ssh on {master}")
    else:
        notes.append(
            "several hosts: the deepspeed launcher starts each through pdsh over passwordless "
            "ssh, in the same directory; it forwards NCCL_* and PYTHON* variables, put others "
            "in ./.deepspeed_env"
        )
    argv += [*launcher_args, "--no_local_rank"]
    if train.entry.module:
        argv.append("--module")
    args = train.train_args(world, tp, pp)
    argv += [train.entry.target, *train.entry.args, *args]

    rank_argv = tuple(train.rank_argv(python, world, tp, pp))
    nodes = tuple(
        NodePlan(
            node_rank=i,
            host=host.name,
            ranks=tuple(block),
            local_ranks=tuple(r % len(block) for r in block),
            env=_rendezvous(
                master,
                master_port,
                ("WORLD_SIZE", str(world)),
                ("CUDA_VISIBLE_DEVICES", ",".join(str(g) for g in range(len(block)))),
            ),
            argv=rank_argv,
        )
        for i, (host, block) in enumerate(zip(selected, blocks))
    )
    return _plan("deepspeed", argv, nodes, master, master_port, tp, pp, dp, blocks, notes)


def slurm_plan(
    nodelist: Sequence[str],
    tasks_per_node: Sequence[int],
    train: TrainCommand,
    tp: int,
    pp: int,
    *,
    master_addr: str | None = None,
    master_port: int = DEFAULT_PORT,
    cpus_per_task: int | None = None,
    srun: Sequence[str] = ("srun",),
    launcher_args: Sequence[str] = (),
    python: str = "python",
) -> LaunchPlan:
    """Plan of ``srun ... python -u -m megaclip.cli.main train ...``: one task per GPU.

    srun's default block distribution gives node i the next ``tasks_per_node[i]`` ranks;
    megaclip maps SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID to RANK / WORLD_SIZE / LOCAL_RANK.
    """
    if len(nodelist) != len(tasks_per_node):
        raise ConfigError(
            f"the nodelist has {len(nodelist)} node(s) but tasks per node are given for "
            f"{len(tasks_per_node)}"
        )
    if not nodelist:
        raise ConfigError("no nodes to launch on")
    blocks = rank_blocks(tasks_per_node)
    world = sum(tasks_per_node)
    dp = derive_dp(world, tp, pp)
    master = master_addr or nodelist[0]
    argv = [*srun, f"--nodes={len(nodelist)}", f"--ntasks={world}"]
    if len(set(tasks_per_node)) == 1:
        argv.append(f"--ntasks-per-node={tasks_per_node[0]}")
    if cpus_per_task:
        argv.append(f"--cpus-per-task={cpus_per_task}")
    argv += ["--kill-on-bad-exit=1", *launcher_args]
    rank_argv = train.rank_argv(python, world, tp, pp)
    argv += rank_argv
    nodes = tuple(
        NodePlan(
            node_rank=i,
            host=host,
            ranks=tuple(block),
            local_ranks=tuple(range(len(block))),
            env=_rendezvous(master, master_port, ("SLURM_NTASKS", str(world))),
            argv=tuple(rank_argv),
        )
        for i, (host, block) in enumerate(zip(nodelist, blocks))
    )
    plan = _plan("slurm", argv, nodes, master, master_port, tp, pp, dp, blocks)
    return replace(plan, rank_vars=("SLURM_PROCID", "SLURM_LOCALID"))


def torchrun_plan(
    nnodes: int,
    nproc_per_node: int,
    train: TrainCommand,
    tp: int,
    pp: int,
    *,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int = DEFAULT_PORT,
    rdzv: str = "static",
    rdzv_id: str = "megaclip",
    torchrun: Sequence[str] = ("torchrun",),
    launcher_args: Sequence[str] = (),
    python: str = "python",
) -> LaunchPlan:
    """Plan of ``torchrun --nnodes N --nproc_per_node P ...``, run once on every node.

    ``static``: node r gets ranks r*P .. r*P+P-1 (``--node_rank r``, ``--master_addr``);
    ``c10d``: a rendezvous at MASTER_ADDR:MASTER_PORT orders the nodes as they join.
    """
    if nnodes < 1 or nproc_per_node < 1:
        raise ConfigError(f"NNODES and NPROC_PER_NODE must be >= 1, got {nnodes}, {nproc_per_node}")
    if not 0 <= node_rank < nnodes:
        raise ConfigError(f"NODE_RANK={node_rank} must be in 0..{nnodes - 1} (NNODES={nnodes})")
    if rdzv not in ("static", "c10d"):
        raise ConfigError(f"RDZV must be 'static' or 'c10d', got '{rdzv}'")
    world = nnodes * nproc_per_node
    dp = derive_dp(world, tp, pp)
    args = train.train_args(world, tp, pp)

    def node_argv(rank: int) -> list[str]:
        out = [*torchrun, f"--nnodes={nnodes}", f"--nproc_per_node={nproc_per_node}"]
        if rdzv == "static":
            out += [f"--node_rank={rank}", f"--master_addr={master_addr}"]
            out += [f"--master_port={master_port}"]
        else:
            out += ["--rdzv_backend=c10d", f"--rdzv_endpoint={master_addr}:{master_port}"]
            out += [f"--rdzv_id={rdzv_id}"]
        return [*out, *launcher_args, *train.entry.python_args(), *args]

    blocks = rank_blocks([nproc_per_node] * nnodes)
    rank_argv = tuple(train.rank_argv(python, world, tp, pp))
    nodes = tuple(
        NodePlan(
            node_rank=i,
            host=master_addr if i == 0 and rdzv == "static" else "",
            ranks=tuple(block),
            local_ranks=tuple(range(nproc_per_node)),
            env=_rendezvous(master_addr, master_port, ("WORLD_SIZE", str(world))),
            argv=rank_argv,
            launch_argv=tuple(node_argv(i)),
        )
        for i, block in enumerate(blocks)
    )
    notes = []
    if nnodes > 1 and master_addr in LOCAL_NAMES:
        notes.append(
            f"warning: MASTER_ADDR={master_addr} is this machine's loopback address, which the "
            "other nodes cannot reach: set MASTER_ADDR to node 0's address on every node"
        )
    if nnodes > 1:
        notes.append(
            "run the node's 'launch:' command on each node (NODE_RANK=0..N-1 with launch/"
            "torchrun.sh)"
            + (
                "; c10d orders nodes as they join, so node ranks may differ"
                if rdzv == "c10d"
                else ""
            )
        )
    launch = node_argv(node_rank)
    return _plan("torchrun", launch, nodes, master_addr, master_port, tp, pp, dp, blocks, notes)


# --------------------------------------------------------------------------- output


def format_ranks(ranks: Sequence[int]) -> str:
    """``0-7`` for a contiguous run, else a comma list (``3,2``)."""
    if not ranks:
        return "-"
    if list(ranks) == list(range(ranks[0], ranks[0] + len(ranks))):
        return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    return ",".join(str(r) for r in ranks)


def format_plan(plan: LaunchPlan, env: Sequence[tuple[str, str]] = ()) -> str:
    """Human-readable dry run: header, notes, the command run here, then one block per node."""
    n = len(plan.nodes)
    lines = [
        f"# megaclip launch plan ({plan.launcher}): {n} node{'s' if n != 1 else ''}, "
        f"{plan.world_size} processes = tp {plan.tp} x pp {plan.pp} x dp {plan.dp}, "
        f"master {plan.master_addr}:{plan.master_port}"
    ]
    lines += [f"# note: {note}" for note in plan.notes]
    if env:
        lines.append("# env: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env))
    lines.append(shlex.join(plan.argv))
    rank_var, local_var = plan.rank_vars
    for node in plan.nodes:
        host = node.host or "(any host)"
        lines.append(
            f"node {node.node_rank} {host}: ranks {format_ranks(node.ranks)}, "
            f"local ranks {format_ranks(node.local_ranks)}"
        )
        if node.launch_argv:
            lines.append(f"  launch: {shlex.join(node.launch_argv)}")
        env_words = [f"{k}={v}" for k, v in node.env]
        env_words += [f"{rank_var}={format_ranks(node.ranks)}"]
        env_words += [f"{local_var}={format_ranks(node.local_ranks)}"]
        lines.append("  env: " + " ".join(env_words))
        lines.append(f"  run: {shlex.join(node.argv)}")
    return "\n".join(lines)


def plan_to_dict(plan: LaunchPlan) -> dict:
    """JSON-ready mapping of a plan (``world_size`` included)."""
    return {**asdict(plan), "world_size": plan.world_size}
