"""What checkpoint/ reads and writes of a training engine, as a typed protocol.

``checkpoint/`` sits below ``train/`` and never imports the engine; this protocol names the
dependency instead (``megaclip.train.engine.ClipEngine`` satisfies it; tests/test_resolve.py
checks that ``ClipEngine.__init__`` sets every member).
"""

from __future__ import annotations

from typing import Any, Protocol

from megaclip.config.model import ClipConfig
from megaclip.config.parallel import ParallelConfig
from megaclip.parallel.topology import Topology


class EngineState(Protocol):
    """A training engine as save, resume and universal checkpoints see it."""

    cfg: ClipConfig  # the model config (checked against a checkpoint's)
    par: ParallelConfig  # the layout (a checkpoint of another layout is resharded)
    topo: Topology  # this rank's (pp, dp, tp) coordinates
    engine: Any  # the DeepSpeed engine: its module, optimizer, scheduler, save/load
    step_count: int  # optimizer steps taken (restored on resume)
