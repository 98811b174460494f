"""Worker: kill a save at each stage of the protocol, then resume, with a stand-in engine.

argv: OUT_DIR STAGES (comma-separated, "none" = no fault). For each stage a forked child (its
own one-process gloo group) saves steps 1 and 2 normally (keep_last=2) and step 3 with
$MEGACLIP_FAULT_AFTER_SAVE_STAGE=stage; a second child then calls load_latest. The stand-in
engine writes one DeepSpeed-like file, so this exercises megaclip's protocol (tmp dir, meta,
fsync, rename, latest, rotation), not DeepSpeed. Results: OUT_DIR/fault.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import deepspeed  # noqa: F401  (imported once before forking)
import torch
import torch.distributed as dist

from megaclip.checkpoint.atomic import FAULT_ENV
from megaclip.checkpoint.resume import load_latest, save_checkpoint
from megaclip.checkpoint.universal import load_universal  # noqa: F401  (pre-fork import)
from megaclip.config.model import load_preset
from megaclip.config.parallel import ParallelConfig
from megaclip.parallel.topology import Coords


class FakeCheckpointEngine:
    """DeepSpeed's checkpoint engine: the loader resume.py routes through memory maps."""

    def load(self, path, map_location=None):
        return torch.load(path, map_location=map_location)


class FakeDeepSpeed:
    """The two DeepSpeed engine methods the protocol calls, on a tiny module."""

    def __init__(self) -> None:
        self.checkpoint_engine = FakeCheckpointEngine()
        self.module = torch.nn.Linear(2, 2)
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=0.1)

    def save_checkpoint(self, root, tag, client_state, save_latest):
        torch.save(
            {"module": self.module.state_dict(), **client_state},
            Path(root) / tag / "mp_rank_00_model_states.pt",
        )

    def load_checkpoint(self, root, tag, **_):
        path = Path(root) / tag / "mp_rank_00_model_states.pt"
        self.module.load_state_dict(self.checkpoint_engine.load(str(path))["module"])
        return str(path), {}


class FakeClipEngine:
    def __init__(self) -> None:
        self.engine = FakeDeepSpeed()
        self.cfg = load_preset("tiny")
        self.par = ParallelConfig()
        self.topo = type("T", (), {"coords": Coords(0, 0, 0)})()
        self.step_count = 0


def child(fn, store: Path) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
            fn()
        except BaseException as err:  # report, never fall back into the parent's loop
            print(f"child failed: {err!r}", file=sys.stderr)
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def main(out_dir: str, stages: str) -> None:
    out = Path(out_dir)
    FakeClipEngine()  # warm lazy imports (torch.optim pulls in torch._dynamo) once, pre-fork
    results = {}
    for stage in stages.split(","):
        root = out / stage

        def saves(root=root, stage=stage):
            engine = FakeClipEngine()
            for step in (1, 2, 3):
                if step == 3 and stage != "none":
                    os.environ[FAULT_ENV] = stage
                engine.engine.module.weight.data.fill_(step)
                save_checkpoint(engine, root, step, {"next": step}, keep_last=2)

        def resume(root=root, stage=stage):
            engine = FakeClipEngine()
            client = load_latest(engine, root)
            weight = float(engine.engine.module.weight.detach()[0, 0])
            (out / f"{stage}.load.json").write_text(json.dumps([client, weight, engine.step_count]))

        save_code = child(saves, out / f"{stage}.store1")
        load_code = child(resume, out / f"{stage}.store2")
        loaded = json.loads((out / f"{stage}.load.json").read_text()) if load_code == 0 else None
        results[stage] = {"save_exit": save_code, "load_exit": load_code, "loaded": loaded}
    (out / "fault.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
