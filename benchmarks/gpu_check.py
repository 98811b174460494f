"""The prepared GPU check: one command, one GPU, under 8 minutes; JSON results (see gpu_check.sh).

    python benchmarks/gpu_check.py [--dry-run] [--out DIR] [--only STAGE,...]

Stages, in order (each a subprocess with its own time limit; the whole run has a deadline after
which the remaining stages are recorded as skipped):

1. ``engine``: single-rank engine steps on the accelerator's backend (NCCL on a GPU), PP = 1,
   ZeRO-0..3, bf16: step time, samples/s, peak memory, and the host reads per step
   (megaclip.bench.syncs, the same count as tests/test_sync_count.py). First every helper of
   megaclip.parallel.collectives on that backend (the gloo host group included), its refusal of
   a CPU tensor on NCCL, and NCCL's own error for one (what gloo would have hidden).
2. ``exact``: the exact global-batch loss paths (accumulation, ZeRO-0/1/3, the 'stream' loss
   mode) against the single-process fp32 reference of tests/reference.py, TF32 off; bf16 within
   3 % per step.
3. ``train_convert_eval``: `megaclip train` under torchrun (the demo digits, webdataset, pinned
   loader, zero-shot during training, checkpoints), `megaclip convert` of its checkpoint and
   `megaclip eval zeroshot` of the converted file on the accelerator.
4. ``vs_open_clip_b32`` / ``vs_open_clip_l14``: benchmarks/vs_open_clip.py, bf16: step times of
   megaclip and open_clip, their ratio, MFU against the GEMM probe and the datasheet peak.
5. ``bigG``: benchmarks/real_scale.py --bench for ViT-G-14 (open_clip's ViT-bigG-14) on one
   GPU: samples/s, MFU, peak memory against the planner.

``--dry-run``: the same sequence on the CPU accelerator (gloo) with tiny models and few steps,
so that CI keeps it from rotting (a few minutes on 2 cores).

Writes ``OUT/gpu_check.json`` ({"dry_run", "env", "stages": {name: {"ok", "seconds", "result"
| "error"}}, "summary"}) and ``OUT/gpu_check.log`` (every stage's output). Exits 1 when a stage
failed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: Sizes per mode. GPU: what fits one H200 in the time; dry: tiny, CPU.
_SIZES = {  # key: (GPU, dry run)
    "deadline_s": (440, 300),
    "probe": (8192, 256),
    "threads": (8, 1),
    "engine": (
        {"model": "ViT-B-32", "micro": 128, "accum": 2, "warmup": 2, "steps": 5},
        {"model": "tiny", "micro": 4, "accum": 2, "warmup": 2, "steps": 2},
    ),
    "exact": (
        {"model": "tiny-pp", "micro": 4, "accum": 2, "steps": 3},
        {"model": "tiny-pp", "micro": 2, "accum": 2, "steps": 2},
    ),
    "train": (
        {"steps": 40, "micro": 64, "every": 20, "workers": 4},
        {"steps": 4, "micro": 16, "every": 2, "workers": 0},
    ),
    "vs_open_clip": (
        [("ViT-B-32", 256, 8, 3), ("ViT-L-14", 64, 6, 2)],
        [("tiny", 8, 2, 1), ("tiny-pp", 8, 2, 1)],
    ),
    "bigG": (
        {"model": "ViT-G-14", "micro": 32, "steps": 4, "warmup": 2},
        {"model": "tiny", "micro": 4, "steps": 2, "warmup": 1},
    ),
}
SIZES = {mode: {k: v[i] for k, v in _SIZES.items()} for i, mode in enumerate(("gpu", "dry"))}
STAGE_NAMES = (
    "engine",
    "exact",
    "train_convert_eval",
    "vs_open_clip_b32",
    "vs_open_clip_l14",
    "bigG",
)


# ---------------------------------------------------------------- in-process stages (workers)


def _collectives_check(topo) -> dict:
    """Every collectives helper on this backend; the refusals a CPU tensor meets on NCCL."""
    import torch
    import torch.distributed as dist

    from megaclip.parallel import collectives as c
    from megaclip.parallel.device import device

    dev = device()
    backend = c.backend_of(None)
    out = {"backend": backend, "host_group_backend": c.backend_of(c.host_group())}
    got = c.host_all_reduce(torch.tensor([1, 2, 3]), "sum", topo.dp_group)
    assert got.device.type == "cpu" and got.tolist() == [1, 2, 3], got
    t = torch.arange(4.0, device=dev)
    c.all_reduce(t, "max", topo.dp_group)
    c.broadcast(t, c.last_rank(topo.pp_group), topo.pp_group)
    assert t.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert [x.tolist() for x in c.all_gather_list(t, topo.dp_group)] == [t.tolist()]
    assert c.all_gather_object({"rank": 0}) == [{"rank": 0}]
    assert c.broadcast_object("tag") == "tag"
    c.barrier()
    out["helpers"] = "ok"
    if backend != "gloo":
        try:
            c.all_reduce(torch.zeros(2), "sum", topo.dp_group)
            out["megaclip_refuses_cpu_tensor"] = False
        except ValueError:
            out["megaclip_refuses_cpu_tensor"] = True
        try:  # what a bare collective does with a CPU tensor there (gloo would accept it)
            dist.all_reduce(torch.zeros(2), group=topo.dp_group)
            out["backend_error_for_cpu_tensor"] = None
        except Exception as err:
            out["backend_error_for_cpu_tensor"] = f"{type(err).__name__}: {str(err)[:200]}"
        assert out["megaclip_refuses_cpu_tensor"], out
    return out


def stage_engine(sz: dict) -> dict:
    import gc

    import torch

    from megaclip.bench.harness import synthetic_config
    from megaclip.bench.syncs import counting_host_reads, total
    from megaclip.config.model import resolve_model
    from megaclip.config.parallel import ParallelConfig
    from megaclip.data.synthetic import synthetic_batch
    from megaclip.parallel.device import accelerator, device
    from megaclip.parallel.runtime import init_distributed
    from megaclip.parallel.topology import Topology
    from megaclip.train.engine import ClipEngine, OptimConfig

    init_distributed()
    acc, dev = accelerator(), device()
    gpu = dev.type != "cpu"
    result: dict = {"device": str(dev), "zero": {}}
    cfg = resolve_model(sz["model"])
    gen = torch.Generator().manual_seed(0)
    for zero in (0, 1, 2, 3):
        par = ParallelConfig(
            zero_stage=zero,
            micro_batch_size=sz["micro"],
            grad_accum_steps=sz["accum"],
            precision="bf16",
        )
        topo = Topology(par)
        if zero == 0:
            result["collectives"] = _collectives_check(topo)
        engine = ClipEngine(cfg, par, topo, {}, OptimConfig(lr=1e-4, grad_clip=1.0), seed=0)
        if gpu:
            acc.reset_peak_memory_stats()
        syn = synthetic_config(cfg, sz["micro"], 0)
        steps, reads, ours = [], [], []
        for i in range(sz["warmup"] + sz["steps"]):
            batches = [synthetic_batch(syn, gen) for _ in range(sz["accum"])]
            if gpu:  # what the loader hands over: pinned host memory
                batches = [tuple(t.pin_memory() for t in mb) for mb in batches]
            with counting_host_reads() as counts:
                r = engine.train_step(batches)
            if i >= sz["warmup"]:
                steps.append(r)
                reads.append(total(counts))
                ours.append(counts.get("megaclip", 0))
        med = statistics.median(s.step_time for s in steps)
        result["zero"][str(zero)] = {
            "losses": [s.loss for s in steps],
            "finite": all(s.loss == s.loss and abs(s.loss) != float("inf") for s in steps),
            "skipped": sum(s.skipped for s in steps),
            "median_step_s": med,
            "samples_per_s": par.global_batch_size / med,
            "host_reads_per_step": reads,
            "megaclip_host_reads_per_step": ours,
            "peak_memory_gib": acc.max_memory_allocated() / 2**30 if gpu else None,
        }
        assert result["zero"][str(zero)]["finite"], result["zero"][str(zero)]
        del engine
        gc.collect()
        if gpu:
            acc.empty_cache()
    return result


def stage_exact(sz: dict) -> dict:
    from megaclip.config.model import load_preset
    from megaclip.config.parallel import ParallelConfig
    from megaclip.model.naming import to_open_clip_key
    from megaclip.parallel.runtime import init_distributed
    from megaclip.parallel.topology import Topology
    from megaclip.parallel.tp_state import full_state
    from megaclip.train.engine import ClipEngine, OptimConfig
    from tests.reference import OPTIM, global_batch, rank_micro_batches, reference_run

    init_distributed()
    cfg = load_preset(sz["model"])
    n = sz["micro"] * sz["accum"]
    ref = reference_run(sz["model"], n, sz["steps"], 3)  # CPU, fp32
    ref_losses, ref_state = ref.losses, ref.state
    cases = [
        ("zero0-accum", 0, "fp32", "allgather", 1e-4),
        ("zero1-stream", 1, "fp32", "stream", 1e-4),
        ("zero3-accum", 3, "fp32", "allgather", 1e-4),
        ("zero1-bf16", 1, "bf16", "allgather", 0.03),
    ]
    out = {}
    for name, zero, precision, mode, rtol in cases:
        par = ParallelConfig(
            zero_stage=zero,
            micro_batch_size=sz["micro"],
            grad_accum_steps=sz["accum"],
            precision=precision,
        )
        topo = Topology(par)
        engine = ClipEngine(cfg, par, topo, {}, OptimConfig(**OPTIM), seed=3, loss_mode=mode)
        losses = []
        for step in range(sz["steps"]):
            images, tokens = global_batch(cfg, n, seed=1000 + step)
            losses.append(engine.train_step(rank_micro_batches(images, tokens, par, 0)).loss)
        rel = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
        params = list(engine.engine.module.parameters())
        if zero == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params):
                state = full_state(engine.engine.module, None)
        else:
            state = full_state(engine.engine.module, None)
        diff = _param_diff(state, ref_state, to_open_clip_key)
        out[name] = {"losses": losses, "max_rel_loss_diff": rel, "max_param_diff": diff}
        assert rel <= rtol, (name, losses, ref_losses)
    out["reference_losses"] = ref_losses
    return out


def _param_diff(state, ref_state, key_fn) -> float:
    """Largest |engine - reference| over the weights (the key bias excluded: see
    tests/test_engine_layouts.py, Adam turns its rounding noise into steps of up to lr)."""
    worst = 0.0
    for k, v in state.items():
        key = key_fn(k)
        if key.endswith("in_proj_bias"):
            continue
        want = ref_state[key]
        worst = max(worst, (v.float().cpu().reshape(want.shape) - want).abs().max().item())
    return worst


WORKERS = {"engine": stage_engine, "exact": stage_exact}


def run_worker(name: str, sizes_json: str, result_path: str) -> None:
    """Entry of ``--stage NAME``: run one in-process stage, write its JSON, leave cleanly."""
    from megaclip.bench.harness import quiet_deepspeed
    from megaclip.parallel.runtime import clean_exit

    quiet_deepspeed()
    result = WORKERS[name](json.loads(sizes_json))
    Path(result_path).write_text(json.dumps(result, indent=1), encoding="utf-8")
    clean_exit(0)


# ---------------------------------------------------------------- the driver


#: The dry run's deadline was sized on a 2-core AVX2 EPYC whose one-thread fp32 256^3 GEMM probe
#: measured ~90 GFLOP/s (2026-12-07, beside the test suite); its stages then took ~125 s of 300.
DRY_PROBE_GFLOPS = 90.0


def dry_deadline(base_s: float, *, emulated_bf16: bool) -> tuple[float, float]:
    """(deadline, probe GFLOP/s) of the dry run on this CPU: ``base_s`` scaled by how much slower
    than :data:`DRY_PROBE_GFLOPS` its one-thread fp32 GEMM probe is (never shorter), doubled
    where bf16 is emulated (the engine and exact stages check bf16 numerics)."""
    import torch

    from megaclip.train.metrics import probe_matmul

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gflops = probe_matmul("fp32", 256, 20).flops / 1e9
    finally:
        torch.set_num_threads(threads)
    deadline = base_s * max(1.0, DRY_PROBE_GFLOPS / gflops) * (2 if emulated_bf16 else 1)
    return deadline, gflops


class Driver:
    def __init__(self, args) -> None:
        self.dry = args.dry_run
        self.sz = SIZES["dry" if self.dry else "gpu"]
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.log = open(self.out / "gpu_check.log", "w", encoding="utf-8")  # noqa: SIM115
        self.t0 = time.monotonic()
        self.deadline = args.deadline_s or self.sz["deadline_s"]
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        self.env["OMP_NUM_THREADS"] = str(self.sz["threads"])
        if self.dry:
            self.env["DS_ACCELERATOR"] = "cpu"
        self.device = "cpu" if self.dry else "cuda"
        # bf16 throughput stages (vs_open_clip, bigG) rehearse in fp32 on a CPU that emulates
        # bf16; bf16 numerics stay checked by the engine stage and the exact stage's bf16 case.
        from megaclip.train.metrics import cpu_has_native_bf16

        self.bench_precision = "fp32" if self.dry and not cpu_has_native_bf16() else "bf16"
        self.probe_gflops = None
        if self.dry and not args.deadline_s:
            self.deadline, self.probe_gflops = dry_deadline(
                self.sz["deadline_s"], emulated_bf16=self.bench_precision == "fp32"
            )

    def left(self) -> float:
        return self.deadline - (time.monotonic() - self.t0)

    def sh(self, cmd: list[str], timeout: float, env: dict | None = None) -> str:
        """Run a command (output to the log); its stdout+stderr; raise on failure."""
        self.log.write(f"\n$ {' '.join(cmd)}\n")
        self.log.flush()
        t0 = time.monotonic()
        proc = subprocess.run(
            cmd,
            cwd=REPO,
            env=env or self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=max(5.0, min(timeout, self.left())),
        )
        self.log.write(proc.stdout)
        self.log.write(f"[exit {proc.returncode} after {time.monotonic() - t0:.1f} s]\n")
        self.log.flush()
        if proc.returncode != 0:
            raise RuntimeError(
                f"exit {proc.returncode}: {' '.join(cmd[:6])} ...\n{proc.stdout[-2000:]}"
            )
        return proc.stdout

    def worker(self, name: str, sizes: dict, timeout: float, extra_env: dict | None = None):
        path = self.work / f"{name}.json"
        path.unlink(missing_ok=True)
        env = dict(self.env, **(extra_env or {}))
        cmd = [sys.executable, str(Path(__file__)), "--stage", name]
        self.sh([*cmd, "--sizes", json.dumps(sizes), "--result", str(path)], timeout, env)
        return json.loads(path.read_text(encoding="utf-8"))

    # stages -------------------------------------------------------------------------------
    def engine(self):
        return self.worker("engine", self.sz["engine"], 200)

    def exact(self):
        return self.worker("exact", self.sz["exact"], 150, {"MEGACLIP_TF32": "0"})

    def train_convert_eval(self):
        t = self.sz["train"]
        data, run = self.work / "demo_data", self.work / "demo_run"
        py = sys.executable
        if not (data / "manifest.json").is_file():
            self.sh([py, "-m", "megaclip.cli.main", "data", "make-demo", str(data)], 120)
        import shutil

        shutil.rmtree(run, ignore_errors=True)
        self.sh(
            [
                py,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node=1",
                "--nnodes=1",
                "--master_addr=127.0.0.1",
                f"--master_port={29600 + os.getpid() % 300}",
                "-m",
                "megaclip.cli.main",
                "train",
                "--config",
                "configs/demo.yaml",
                "deepspeed=null",
                "parallel.dp=1",
                "parallel.zero_stage=1",
                "parallel.precision=" + ("fp32" if self.dry else "bf16"),
                f"parallel.micro_batch_size={t['micro']}",
                f"data.train={data}/train-{{000000..000003}}.tar",
                f"data.workers={t['workers']}",
                f"zeroshot.data={data}/val-000000.tar",
                f"zeroshot.classnames={data}/classnames.txt",
                f"zeroshot.templates={data}/templates.txt",
                f"zeroshot.every={t['every']}",
                f"train.steps={t['steps']}",
                f"train.save_every={t['every']}",
                f"train.log_every={t['every']}",
                "train.tensorboard=false",
                f"train.out_dir={run}",
            ],
            240,
        )
        records = [
            json.loads(x)
            for x in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
            if x.strip()
        ]
        steps = [r for r in records if "loss" in r]
        zs = [r for r in records if "zeroshot_top1" in r]
        export = run / "converted_open_clip.pt"
        convert = [py, "-m", "megaclip.cli.main", "convert", str(run / "checkpoints")]
        self.sh([*convert, "--to", "open_clip", "--out", str(export)], 120)
        evaluate = [
            py, "-m", "megaclip.cli.main", "eval", "zeroshot", "--checkpoint", str(export),
            "--data", f"{data}/val-000000.tar", "--classnames", f"{data}/classnames.txt",
            "--templates", f"{data}/templates.txt", "--device", self.device,
            "--precision", "fp32" if self.dry else "bf16", "--json",
        ]  # fmt: skip
        out = self.sh(evaluate, 120)
        ev = json.loads([x for x in out.splitlines() if x.startswith("{")][-1])
        return {
            "last_step": steps[-1] if steps else None,
            "zeroshot_during_training": zs,
            "eval_after_convert": ev,
            "export_mib": export.stat().st_size / 2**20,
        }

    def _vs_open_clip(self, idx: int):
        model, batch, steps, warmup = self.sz["vs_open_clip"][idx]
        path = self.work / f"vs_open_clip_{idx}.json"
        self.sh(
            [
                sys.executable,
                "benchmarks/vs_open_clip.py",
                "--model",
                model,
                "--batch",
                str(batch),
                "--precision",
                self.bench_precision,
                "--steps",
                str(steps),
                "--warmup",
                str(warmup),
                "--device",
                self.device,
                "--threads",
                str(self.sz["threads"]),
                "--probe-size",
                str(self.sz["probe"]),
                "--json",
                str(path),
            ],
            200,
        )
        r = json.loads(path.read_text(encoding="utf-8"))[0]
        m, o = r["megaclip"], r["open_clip"]
        return {
            "model": model,
            "batch": batch,
            "megaclip_step_s": m["step_s"],
            "open_clip_step_s": o["step_s"],
            "ratio_step": r["ratio_step"],
            "megaclip_mfu_probe": m["mfu_step"],
            "open_clip_mfu_probe": o["mfu_step"],
            "megaclip_mfu_datasheet": m.get("mfu_datasheet"),
            "open_clip_mfu_datasheet": o.get("mfu_datasheet"),
            "probe_tflops": r["peak_tflops"],
            "datasheet_peak_tflops": r.get("datasheet_peak_tflops"),
            "device_name": r.get("device_name"),
            "losses": [m["last_loss"], o["last_loss"]],
        }

    def vs_open_clip_b32(self):
        return self._vs_open_clip(0)

    def vs_open_clip_l14(self):
        return self._vs_open_clip(1)

    def bigG(self):  # noqa: N802
        b = self.sz["bigG"]
        out = self.sh(
            [
                sys.executable,
                "benchmarks/real_scale.py",
                "--model",
                b["model"],
                "--layout",
                "dp1-zero1",
                "--bench",
                "--recompute",
                "--precision",
                self.bench_precision,
                "--micro-batch",
                str(b["micro"]),
                "--steps",
                str(b["steps"]),
                "--warmup",
                str(b["warmup"]),
                "--threads",
                str(self.sz["threads"]),
                "--out",
                str(self.work / "real_scale"),
            ],
            300,
        )
        return json.loads([x for x in out.splitlines() if x.startswith("{")][-1])

    # ------------------------------------------------------------------------------------------
    def env_info(self) -> dict:
        code = (
            "import json, platform, torch\n"
            "info = {'python': platform.python_version(), 'torch': torch.__version__,\n"
            "        'cuda_available': torch.cuda.is_available()}\n"
            "if torch.cuda.is_available():\n"
            "    info['gpu'] = torch.cuda.get_device_name(0)\n"
            "    info['cuda'] = torch.version.cuda\n"
            "for m in ('deepspeed', 'megatron.core', 'open_clip'):\n"
            "    try:\n"
            "        mod = __import__(m, fromlist=['x'])\n"
            "        info[m] = getattr(mod, '__version__', 'present')\n"
            "    except Exception as err:\n"
            "        info[m] = f'missing: {err}'\n"
            "print(json.dumps(info))\n"
        )
        out = self.sh([sys.executable, "-c", code], 120)
        return json.loads([x for x in out.splitlines() if x.startswith("{")][-1])

    def run(self, only: list[str]) -> int:
        report: dict = {"dry_run": self.dry, "stages": {}}
        try:
            report["env"] = self.env_info()
        except Exception as err:
            report["env"] = {"error": str(err)[-2000:]}
        report["deadline_s"] = round(self.deadline, 1)
        if self.probe_gflops is not None:
            report["dry_probe_gflops"] = round(self.probe_gflops, 1)
        for name in STAGE_NAMES:
            if only and name not in only:
                continue
            entry: dict = {}
            if self.left() < 10:
                entry = {"ok": False, "skipped": "deadline"}
            else:
                t0 = time.monotonic()
                try:
                    entry = {"ok": True, "result": getattr(self, name)()}
                except Exception as err:
                    entry = {"ok": False, "error": f"{type(err).__name__}: {str(err)[-3000:]}"}
                entry["seconds"] = round(time.monotonic() - t0, 1)
            report["stages"][name] = entry
            print(
                f"[gpu_check] {name}: {'ok' if entry['ok'] else 'FAILED'} "
                f"({entry.get('seconds', 0)} s)",
                flush=True,
            )
            self._write(report)
        report["wall_s"] = round(time.monotonic() - self.t0, 1)
        report["summary"] = summarize(report)
        self._write(report)
        print(json.dumps(report["summary"], indent=1), flush=True)
        failed = [n for n, e in report["stages"].items() if not e["ok"]]
        if failed:
            print(f"[gpu_check] failed: {', '.join(failed)} (see {self.out}/gpu_check.log)")
        return 1 if failed else 0

    def _write(self, report: dict) -> None:
        path = self.out / "gpu_check.json"
        path.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")


def summarize(report: dict) -> dict:
    """The headline figures of a report (pure)."""
    st = report["stages"]

    def res(name):
        e = st.get(name, {})
        return e.get("result") if e.get("ok") else None

    out: dict = {"ok": all(e["ok"] for e in st.values()), "wall_s": report.get("wall_s")}
    if (r := res("engine")) is not None:
        out["engine"] = {
            f"zero{z}": {
                "step_s": round(v["median_step_s"], 4),
                "samples_per_s": round(v["samples_per_s"], 1),
                "host_reads_per_step": sorted(set(v["host_reads_per_step"])),
                "peak_memory_gib": v["peak_memory_gib"],
            }
            for z, v in r["zero"].items()
        }
        out["collectives"] = r.get("collectives")
    if (r := res("exact")) is not None:
        out["exact_max_rel_loss_diff"] = {
            k: v["max_rel_loss_diff"] for k, v in r.items() if isinstance(v, dict)
        }
    if (r := res("train_convert_eval")) is not None:
        out["eval_top1_after_convert"] = r["eval_after_convert"].get("top1")
    for name in ("vs_open_clip_b32", "vs_open_clip_l14"):
        if (r := res(name)) is not None:
            out[name] = {
                k: r[k]
                for k in (
                    "model",
                    "megaclip_step_s",
                    "open_clip_step_s",
                    "ratio_step",
                    "megaclip_mfu_datasheet",
                    "open_clip_mfu_datasheet",
                    "megaclip_mfu_probe",
                )
            }
    if (r := res("bigG")) is not None:
        out["bigG"] = {
            k: r.get(k)
            for k in ("model", "samples_per_s", "mfu", "peak_gib_per_rank", "planned_gib_per_rank")
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU accelerator, tiny sizes")
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check")
    p.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--only", default="", help=f"comma list of stages: {','.join(STAGE_NAMES)}")
    p.add_argument("--deadline-s", type=float, default=0.0, help="0: the mode's default")
    p.add_argument("--stage", help=argparse.SUPPRESS)  # worker entry
    p.add_argument("--sizes", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:
        run_worker(args.stage, args.sizes, args.result)
        return 0
    if args.work is None:
        import tempfile

        args.work = tempfile.mkdtemp(prefix="megaclip-gpu-check-")
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(STAGE_NAMES)
    if unknown:
        p.error(f"unknown stage(s) {sorted(unknown)}; valid: {', '.join(STAGE_NAMES)}")
    return Driver(args).run(only)


if __name__ == "__main__":
    sys.exit(main())
