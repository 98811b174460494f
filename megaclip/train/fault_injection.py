"""Test-only fault injection into training steps, through environment variables.

``MEGACLIP_FAULT_KILL_RANK`` / ``MEGACLIP_FAULT_KILL_STEP`` (``MEGACLIP_FAULT_MODE``: ``exit``
or ``hang``; ``MEGACLIP_FAULT_POINT``: ``forward`` or ``backward``) make that global rank
``os._exit`` with :data:`KILLED_EXIT_CODE` (or stop responding) during that step.
:class:`megaclip.train.faults.TrainingGuard` arms it. (Crashes inside a checkpoint save:
``MEGACLIP_FAULT_AFTER_SAVE_STAGE``, megaclip.checkpoint.atomic.)
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from megaclip.errors import ConfigError

KILL_RANK_ENV = "MEGACLIP_FAULT_KILL_RANK"
KILL_STEP_ENV = "MEGACLIP_FAULT_KILL_STEP"
MODE_ENV = "MEGACLIP_FAULT_MODE"
POINT_ENV = "MEGACLIP_FAULT_POINT"
KILLED_EXIT_CODE = 87  # the injected fault's own exit status


@dataclass(frozen=True)
class FaultPlan:
    """Test-only fault: global rank ``rank`` exits or hangs in the forward/backward of ``step``."""

    rank: int
    step: int
    mode: Literal["exit", "hang"] = "exit"
    point: Literal["forward", "backward"] = "forward"


def fault_plan_from_env(env: Mapping[str, str]) -> FaultPlan | None:
    """The FaultPlan the ``MEGACLIP_FAULT_*`` variables describe, or None when unset."""
    rank, step = env.get(KILL_RANK_ENV, ""), env.get(KILL_STEP_ENV, "")
    if not rank and not step:
        return None
    mode = env.get(MODE_ENV, "") or "exit"
    point = env.get(POINT_ENV, "") or "forward"
    try:
        plan = FaultPlan(int(rank), int(step), mode, point)  # type: ignore[arg-type]
    except ValueError:
        raise ConfigError(
            f"{KILL_RANK_ENV}={rank!r} and {KILL_STEP_ENV}={step!r} must both be integers"
        ) from None
    if mode not in ("exit", "hang") or point not in ("forward", "backward"):
        raise ConfigError(
            f"bad fault injection {plan}: {MODE_ENV} is 'exit' or 'hang', "
            f"{POINT_ENV} is 'forward' or 'backward'"
        )
    if plan.step < 1 or plan.rank < 0:
        raise ConfigError(f"bad fault injection {plan}: step must be >= 1 and rank >= 0")
    return plan


def inject(plan: FaultPlan, rank: int) -> None:
    """Carry out ``plan`` on this rank now: exit at once, or hang forever."""
    print(
        f"megaclip fault injection: rank {rank} {plan.mode}s in the {plan.point} of step "
        f"{plan.step}",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    if plan.mode == "exit":
        os._exit(KILLED_EXIT_CODE)
    while True:  # "hang": alive, connections open, never answering
        time.sleep(3600)


def arm(plan: FaultPlan, module: Any, current_step: Callable[[], int], rank: int) -> Any:
    """Install ``plan`` on ``module`` as a forward pre-hook or a gradient hook; its handle.

    The hook fires when ``current_step()`` (1-based) is ``plan.step``.
    """

    def fire(*_: Any) -> None:
        if current_step() == plan.step:
            inject(plan, rank)

    if plan.point == "forward":
        return module.register_forward_pre_hook(fire)
    trainable = [p for p in module.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("fault injection in the backward pass: no trainable parameter")
    return trainable[0].register_hook(fire)
