"""How every tensor-parallel parameter splits: the one table (pure, no torch).

Only the four linear layers of a transformer block are split; everything else (LayerNorms,
embeddings, the towers' projections, the logit scalars) is replicated on every TP rank. Read by
the layers that build the model (:func:`megaclip.parallel.layers.tp_linear`), by name in the
checkpoint reader / converter and export (:func:`tp_partition`), and by the parameter counts of
the memory model (:func:`megaclip.model.flops.block_params`).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Split:
    """A tensor cut along ``dim`` (None: replicated) into TP pieces, ``stride`` interleaved blocks.

    ``stride`` s: the dimension is s stacked blocks (QKV: [q; k; v]) and rank r holds the r-th
    1/tp of each block, concatenated.
    """

    dim: int | None = None
    stride: int = 1

    def per_rank(self, numel: int, tp: int) -> int:
        """Elements of a ``numel``-element tensor held by one of ``tp`` ranks."""
        if self.dim is None:
            return numel
        if numel % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide {numel} elements")
        return numel // tp


REPLICATED = Split()


@dataclass(frozen=True)
class LinearSplit:
    """A linear layer y = x W^T + b split over TP: column- (W rows, dim 0) or row-parallel (dim 1).

    Column-parallel layers split the bias like the rows of W; row-parallel ones add the full
    bias after the all-reduce, so it is replicated.
    """

    dim: int
    stride: int = 1

    @property
    def weight(self) -> Split:
        return Split(self.dim, self.stride)

    @property
    def bias(self) -> Split:
        return Split(0, self.stride) if self.dim == 0 else REPLICATED


#: The split linear layers of a transformer block, by their module path inside the block.
BLOCK_LINEARS: MappingProxyType[str, LinearSplit] = MappingProxyType(
    {
        "attn.qkv": LinearSplit(0, stride=3),  # column: rank r holds [q_r; k_r; v_r], heads/tp
        "attn.out_proj": LinearSplit(1),  # row: the heads' outputs, all-reduced
        "mlp.c_fc": LinearSplit(0),  # column: mlp_dim/tp hidden units
        "mlp.c_proj": LinearSplit(1),  # row
    }
)


def param_split(name: str) -> Split:
    """The split of the parameter called ``name`` (any prefix: ``module.``, a stage index, ...)."""
    layer, _, kind = name.rpartition(".")
    if kind in ("weight", "bias"):
        for path, split in BLOCK_LINEARS.items():
            if layer.endswith("." + path) or layer == path:
                return split.weight if kind == "weight" else split.bias
    return REPLICATED


def tp_partition(name: str) -> tuple[int | None, int]:
    """(partition dim or None if replicated, stride) of the parameter called ``name``."""
    split = param_split(name)
    return split.dim, split.stride
