"""The one place that builds process groups: megatron-core parallel_state + DeepSpeed topology.

Rank order (both libraries agree; checked at start-up): TP fastest, then DP, then PP, i.e.
``rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank``. Code that needs a group receives it
from a :class:`Topology` object; nothing else reads megatron's globals.

The host group: besides the TP / DP / PP groups (the accelerator's backend: NCCL on GPUs), the
Topology creates, once per world, one gloo group over all ranks for bookkeeping
(``Topology.host_group``; :func:`megaclip.parallel.collectives.create_host_group`). Barriers
and pickled objects (data positions, checkpoint tags, peer lists, benchmark results) go over
it, so they touch no device memory and are not subject to NCCL's watchdog while a rank does
long host work. It is None where the default backend is gloo already (CPU runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from megaclip.config.parallel import ParallelConfig
from megaclip.errors import ConfigError
from megaclip.parallel.collectives import create_host_group


@dataclass(frozen=True)
class Coords:
    """This rank's coordinates on the (pp, dp, tp) grid."""

    pp: int
    dp: int
    tp: int


def rank_of(par: ParallelConfig, pp: int, dp: int, tp: int) -> int:
    """Global rank at grid coordinates (pure)."""
    return (pp * par.dp + dp) * par.tp + tp


def coords_of(par: ParallelConfig, rank: int) -> Coords:
    """Grid coordinates of a global rank (pure)."""
    tp = rank % par.tp
    dp = (rank // par.tp) % par.dp
    pp = rank // (par.tp * par.dp)
    return Coords(pp=pp, dp=dp, tp=tp)


def group_ranks(par: ParallelConfig, axis: str, coords: Coords) -> list[int]:
    """Global ranks of the ``axis`` ('tp' | 'dp' | 'pp') group containing ``coords`` (pure)."""
    if axis == "tp":
        return [rank_of(par, coords.pp, coords.dp, t) for t in range(par.tp)]
    if axis == "dp":
        return [rank_of(par, coords.pp, d, coords.tp) for d in range(par.dp)]
    if axis == "pp":
        return [rank_of(par, p, coords.dp, coords.tp) for p in range(par.pp)]
    raise ValueError(axis)


class Topology:
    """Process groups of a (tp, pp, dp) layout, created once and passed to whoever needs them."""

    def __init__(self, par: ParallelConfig, *, timeout_minutes: int = 10) -> None:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed must be initialised before building a Topology")
        par.check_world(dist.get_world_size())
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
        from megatron.core import parallel_state as ps

        self.par = par
        self.rank = dist.get_rank()
        self.coords = coords_of(par, self.rank)
        self.ds_topology = PipeModelDataParallelTopology(
            num_pp=par.pp, num_mp=par.tp, num_dp=par.dp
        )
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(
            tensor_model_parallel_size=par.tp,
            pipeline_model_parallel_size=par.pp,
            distributed_timeout_minutes=timeout_minutes,
            create_gloo_process_groups=False,
        )
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.dp_group = ps.get_data_parallel_group()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        # one gloo group over all ranks for bookkeeping (see the module docstring)
        self.host_group = create_host_group(timedelta(minutes=timeout_minutes))
        self._check_agreement()

    def _check_agreement(self) -> None:
        """megatron's groups, DeepSpeed's topology and our pure rank math must all agree."""
        ds = self.ds_topology.get_coord(self.rank)
        ours = self.coords
        if (ds.pipe, ds.data, ds.model) != (ours.pp, ours.dp, ours.tp):
            raise ConfigError(
                f"DeepSpeed topology puts rank {self.rank} at {ds}, megaclip at {ours}"
            )
        for axis, group in (("tp", self.tp_group), ("dp", self.dp_group), ("pp", self.pp_group)):
            got = dist.get_process_group_ranks(group)
            want = group_ranks(self.par, axis, ours)
            if got != want:
                raise ConfigError(
                    f"megatron-core's {axis} group of rank {self.rank} is {got}, expected {want}"
                )

    @property
    def tp_group_or_none(self) -> dist.ProcessGroup | None:
        """The TP group, or None when tp == 1 (layers then use plain linear math)."""
        return self.tp_group if self.par.tp > 1 else None

    @property
    def is_last_stage(self) -> bool:
        return self.coords.pp == self.par.pp - 1

    def data_seed(self, seed: int) -> int:
        """Seed for data order / random augmentation: equal within a TP x PP group, per DP rank."""
        return seed * 7919 + self.coords.dp

    def mpu(self) -> ModelParallelUnit:
        """The ``mpu`` adapter DeepSpeed's plain engine wants for TP > 1."""
        return ModelParallelUnit(self)


class ModelParallelUnit:
    """Adapter with the method names DeepSpeed expects from an ``mpu`` object."""

    def __init__(self, topo: Topology) -> None:
        self._t = topo

    def get_model_parallel_rank(self) -> int:
        return self._t.coords.tp

    def get_model_parallel_world_size(self) -> int:
        return self._t.par.tp

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self._t.tp_group

    def get_data_parallel_rank(self) -> int:
        return self._t.coords.dp

    def get_data_parallel_world_size(self) -> int:
        return self._t.par.dp

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self._t.dp_group

    # DeepSpeed >= 0.10 also looks for the tensor-parallel spelling.
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group
